"""Idempotency-Key on the release POSTs: a retry gets the first response and nothing runs twice."""

from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from releasemgr.idempotency import request_fingerprint
from releases.models import Approval, AuditEvent, IdempotencyRecord, Release
from tenants.models import Environment, Role
from tenants.services import membership_set, tenant_setup, token_issue, user_ensure

pytestmark = pytest.mark.django_db

BUNDLE = {
    "database": {
        "changes": [
            {
                "type": "create_table",
                "table": "widgets",
                "columns": [{"name": "name", "type": "string", "max_length": 50, "nullable": False}],
            }
        ]
    },
    "feature_flags": {},
}


def client_for(token: str, slug: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client


@pytest.fixture
def tenant(sqlite_database_factory):
    """Tenant `acme` on SQLite targets, its admin's client and an approver's client."""
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"], approvers=["acme-approver"])
    admin = get_user_model().objects.get(username="acme-admin")
    approver = get_user_model().objects.get(username="acme-approver")
    _, admin_token = token_issue(tenant=tenant, user=admin)
    _, approver_token = token_issue(tenant=tenant, user=approver)
    return tenant, client_for(admin_token, "acme"), client_for(approver_token, "acme")


def post(client, path, body, key=None):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post(path, body, format="json", **headers)


def prepare_body(**extra):
    return {"from_env": "dev", "to_env": "staging", "bundle_data": BUNDLE, **extra}


def test_prepare__retried_with_same_key_and_body__one_release_and_first_response(tenant):
    _, client, _ = tenant
    first = post(client, "/api/releases/prepare", prepare_body(), key="ci-run-41-prepare")
    assert first.status_code == 201, first.content

    retry = post(client, "/api/releases/prepare", prepare_body(), key="ci-run-41-prepare")

    assert retry.status_code == 201
    assert retry.json() == first.json()
    assert retry["Idempotent-Replayed"] == "true"
    assert Release.objects.count() == 1
    assert AuditEvent.objects.filter(event="release.prepared").count() == 1


def test_prepare__retried_with_trailing_slash__same_request_replayed(tenant):
    _, client, _ = tenant
    first = post(client, "/api/releases/prepare", prepare_body(), key="k-slash")
    retry = post(client, "/api/releases/prepare/", prepare_body(), key="k-slash")
    assert first.status_code == retry.status_code == 201
    assert retry.json()["data"]["release_id"] == first.json()["data"]["release_id"]
    assert Release.objects.count() == 1


def test_prepare__no_key__each_request_runs(tenant):
    _, client, _ = tenant
    assert post(client, "/api/releases/prepare", prepare_body()).status_code == 201
    assert post(client, "/api/releases/prepare", prepare_body()).status_code == 201
    assert Release.objects.count() == 2


def test_prepare__same_key_other_body__409_conflict_and_nothing_saved(tenant):
    _, client, _ = tenant
    assert post(client, "/api/releases/prepare", prepare_body(), key="k1").status_code == 201

    response = post(client, "/api/releases/prepare", prepare_body(reason="changed"), key="k1")

    assert response.status_code == 409
    error = response.json()["error"]
    assert response.json()["success"] is False
    assert error["code"] == "conflict" and error["details"]["reason"] == "idempotency_key_reused"
    assert Release.objects.count() == 1


def test_key__reused_on_another_endpoint__409_conflict(tenant):
    _, client, _ = tenant
    release_id = post(client, "/api/releases/prepare", prepare_body(), key="k2").json()["data"]["release_id"]

    response = post(client, "/api/releases/promote", {"release_id": release_id}, key="k2")

    assert response.status_code == 409
    assert response.json()["error"]["details"]["reason"] == "idempotency_key_reused"
    assert Release.objects.get(release_id=release_id).status == "prepared"


def test_body__key_order_and_whitespace__same_canonical_request(tenant):
    _, client, _ = tenant
    bundle = json.dumps(BUNDLE, separators=(",", ":"))
    compact = f'{{"to_env":"staging","bundle_data":{bundle},"from_env":"dev"}}'
    spaced = json.dumps(prepare_body(), indent=2)
    first = client.post(
        "/api/releases/prepare", compact, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k3"
    )
    retry = client.post(
        "/api/releases/prepare", spaced, content_type="application/json", HTTP_IDEMPOTENCY_KEY="k3"
    )
    assert first.status_code == 201, first.content
    assert retry.status_code == 201 and retry["Idempotent-Replayed"] == "true"
    assert Release.objects.count() == 1


def test_request_in_flight__duplicate__409_in_progress_and_nothing_run(tenant):
    tenant_obj, client, _ = tenant
    admin = get_user_model().objects.get(username="acme-admin")
    body = prepare_body()
    # What the first request leaves while its view runs: a reservation without a response.
    IdempotencyRecord.objects.create(
        tenant=tenant_obj,
        user=admin,
        key="k-flight",
        path="/api/releases/prepare",
        request_sha256=request_fingerprint(method="POST", path="/api/releases/prepare", body=body),
    )

    response = post(client, "/api/releases/prepare", body, key="k-flight")

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    assert response.json()["error"]["details"]["reason"] == "idempotency_request_in_progress"
    assert Release.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_prepare__concurrent_duplicates__one_release_others_replay_or_409(tenant):
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        # Threads share an in-memory database through SQLite's shared cache, which answers "table is
        # locked" instead of waiting; `make test` runs this again with PostgreSQL as the control database.
        pytest.skip("needs a control database that serves concurrent connections (PostgreSQL)")
    _, client, _ = tenant
    credentials = client._credentials
    results: list[tuple[int, dict]] = []
    barrier = threading.Barrier(4)

    def worker():
        own = APIClient()
        own.credentials(**credentials)
        barrier.wait()
        try:
            response = post(own, "/api/releases/prepare", prepare_body(), key="k-race")
            results.append((response.status_code, response.json()))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(results) == 4
    assert Release.objects.count() == 1
    created = [body for status, body in results if status == 201]
    assert created, results
    assert all(body == created[0] for body in created)
    for status, body in results:
        if status != 201:
            assert status == 409 and body["error"]["details"]["reason"] == "idempotency_request_in_progress"


def test_key__older_than_24h__purged_and_usable_again(tenant):
    _, client, _ = tenant
    assert post(client, "/api/releases/prepare", prepare_body(), key="k-old").status_code == 201
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(hours=25))

    response = post(client, "/api/releases/prepare", prepare_body(reason="next day"), key="k-old")

    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert Release.objects.count() == 2
    assert IdempotencyRecord.objects.count() == 1


@pytest.mark.parametrize("key", ["", "x" * 201, "has space", "naïve"])
def test_key__malformed__400_and_nothing_run(tenant, key):
    _, client, _ = tenant
    response = client.post(
        "/api/releases/prepare",
        prepare_body(),
        format="json",
        headers={"Idempotency-Key": key.encode("utf-8").decode("latin-1")},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "validation_error"
    assert "Idempotency-Key" in response.json()["error"]["details"]
    assert Release.objects.count() == 0 and IdempotencyRecord.objects.count() == 0


def test_key__200_characters__accepted(tenant):
    _, client, _ = tenant
    key = "k" * 200
    assert post(client, "/api/releases/prepare", prepare_body(), key=key).status_code == 201
    assert post(client, "/api/releases/prepare", prepare_body(), key=key)["Idempotent-Replayed"] == "true"
    assert Release.objects.count() == 1


def test_key__same_key_other_user_or_tenant__independent(tenant, sqlite_database_factory):
    tenant_obj, client, _ = tenant
    second_admin = user_ensure(username="acme-admin-2")
    membership_set(tenant=tenant_obj, user=second_admin, role=Role.ADMIN)
    _, token = token_issue(tenant=tenant_obj, user=second_admin)
    other_urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    other = tenant_setup(slug="other", environments=other_urls, admins=["acme-admin"])
    _, other_token = token_issue(tenant=other, user=get_user_model().objects.get(username="acme-admin"))

    for each in (client, client_for(token, "acme"), client_for(other_token, "other")):
        response = post(each, "/api/releases/prepare", prepare_body(), key="shared-key")
        assert response.status_code == 201 and "Idempotent-Replayed" not in response

    assert Release.objects.count() == 3


def test_promote__retried__promoted_once_and_first_response(tenant):
    _, client, _ = tenant
    release_id = post(client, "/api/releases/prepare", prepare_body()).json()["data"]["release_id"]
    body = {"release_id": release_id}

    first = post(client, "/api/releases/promote", body, key="promote-1")
    retry = post(client, "/api/releases/promote", body, key="promote-1")
    fresh = post(client, "/api/releases/promote", body, key="promote-2")

    assert first.status_code == 200 and first.json()["data"]["status"] == "promoted", first.content
    assert retry.status_code == 200 and retry.json() == first.json()
    assert fresh.status_code == 409, "without the same key the second promote is refused: the test can fail"
    assert AuditEvent.objects.filter(event="release.promoted").count() == 1


def test_rollback__retried__rolled_back_once(tenant):
    _, client, _ = tenant
    release_id = post(client, "/api/releases/prepare", prepare_body()).json()["data"]["release_id"]
    assert post(client, "/api/releases/promote", {"release_id": release_id}).status_code == 200

    first = post(client, "/api/releases/rollback", {"release_id": release_id}, key="rb-1")
    retry = post(client, "/api/releases/rollback", {"release_id": release_id}, key="rb-1")

    assert first.status_code == 200 and first.json()["data"]["rolled_back"] is True, first.content
    assert retry.status_code == 200 and retry.json() == first.json()
    assert AuditEvent.objects.filter(event="release.rollback").count() == 1


@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_decision__retried__recorded_once(tenant, decision):
    tenant_obj, client, approver_client = tenant
    body = prepare_body(
        from_env="staging",
        to_env="prod",
        bundle_data={"database": {"changes": []}, "feature_flags": {"beta": True}},
    )
    # A prod release of a flag: staging and prod are both empty, so the gate passes.
    response = post(client, "/api/releases/prepare", body)
    assert response.status_code == 201, response.content
    release_id = response.json()["data"]["release_id"]
    path = f"/api/releases/{release_id}/{decision}"

    first = post(approver_client, path, {"comment": "ok"}, key=f"{decision}-1")
    retry = post(approver_client, path, {"comment": "ok"}, key=f"{decision}-1")
    other = post(approver_client, path, {"comment": "changed my mind"}, key=f"{decision}-1")

    assert first.status_code == 200, first.content
    assert retry.status_code == 200 and retry.json() == first.json()
    assert other.status_code == 409
    assert Approval.objects.filter(release__release_id=release_id).count() == 1
    assert Environment.objects.filter(tenant=tenant_obj).count() == 3


def test_refusal__stored_and_replayed__but_environment_busy_is_not(tenant):
    _, client, _ = tenant
    missing = {"release_id": "rel_20200101_0000"}
    first = post(client, "/api/releases/promote", missing, key="nf-1")
    retry = post(client, "/api/releases/promote", missing, key="nf-1")
    assert first.status_code == retry.status_code == 404
    assert retry["Idempotent-Replayed"] == "true"

    release_id = post(client, "/api/releases/prepare", prepare_body()).json()["data"]["release_id"]
    environment = Environment.objects.get(tenant__slug="acme", stage="staging")
    Environment.objects.filter(pk=environment.pk).update(
        lock_owner="someone-else", lock_expires_at=timezone.now() + timedelta(minutes=5)
    )
    busy = post(client, "/api/releases/promote", {"release_id": release_id}, key="busy-1")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "environment_busy", busy.content
    assert not IdempotencyRecord.objects.filter(key="busy-1").exists()

    Environment.objects.filter(pk=environment.pk).update(lock_owner="", lock_expires_at=None)
    retried = post(client, "/api/releases/promote", {"release_id": release_id}, key="busy-1")
    assert retried.status_code == 200 and retried.json()["data"]["status"] == "promoted", retried.content


# --- The lease: a key whose process died may be retried once its lease lapsed, and runs once -------


def dead_reservation(tenant_obj, *, key: str, body: dict, lapsed: bool, path: str = "/api/releases/prepare"):
    """What a web process killed mid-request leaves: a reservation without a response, its lease
    lapsed (or not yet) because no heartbeat extends it any more."""
    admin = get_user_model().objects.get(username="acme-admin")
    offset = timedelta(seconds=-5 if lapsed else 45)
    return IdempotencyRecord.objects.create(
        tenant=tenant_obj,
        user=admin,
        key=key,
        path=path,
        request_sha256=request_fingerprint(method="POST", path=path, body=body),
        owner="web-1:4242:deadbeef",
        lease_expires_at=timezone.now() + offset,
    )


def test_lease__live__retry_is_409_in_progress_with_retry_after_and_nothing_run(tenant):
    tenant_obj, client, _ = tenant
    dead_reservation(tenant_obj, key="k-live", body=prepare_body(), lapsed=False)

    response = post(client, "/api/releases/prepare", prepare_body(), key="k-live")

    assert response.status_code == 409 and response.json()["success"] is False
    assert response.json()["error"]["details"]["reason"] == "idempotency_request_in_progress"
    assert 40 <= int(response["Retry-After"]) <= 45
    assert Release.objects.count() == 0
    assert IdempotencyRecord.objects.get(key="k-live").owner == "web-1:4242:deadbeef"


def test_lease__lapsed__retry_takes_the_key_over_runs_once_and_stores_its_answer(tenant):
    tenant_obj, client, _ = tenant
    dead_reservation(tenant_obj, key="k-dead", body=prepare_body(), lapsed=True)

    first = post(client, "/api/releases/prepare", prepare_body(), key="k-dead")
    again = post(client, "/api/releases/prepare", prepare_body(), key="k-dead")

    assert first.status_code == 201, first.content
    assert "Idempotent-Replayed" not in first
    assert again.status_code == 201 and again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert Release.objects.count() == 1
    assert AuditEvent.objects.filter(event="release.prepared").count() == 1
    record = IdempotencyRecord.objects.get(key="k-dead")
    assert record.status_code == 201 and record.owner != "web-1:4242:deadbeef"


def test_lease__lapsed_reservation_of_another_request__not_taken_over_409_reused(tenant):
    tenant_obj, client, _ = tenant
    dead_reservation(tenant_obj, key="k-other", body=prepare_body(reason="first"), lapsed=True)

    response = post(client, "/api/releases/prepare", prepare_body(reason="second"), key="k-other")

    assert response.status_code == 409
    assert response.json()["error"]["details"]["reason"] == "idempotency_key_reused"
    assert Release.objects.count() == 0
    assert IdempotencyRecord.objects.get(key="k-other").owner == "web-1:4242:deadbeef"


def test_lease__refusal_in_a_taken_over_run__stored_for_the_next_retry(tenant):
    tenant_obj, client, _ = tenant
    missing = {"release_id": "rel_20200101_0000"}
    dead_reservation(tenant_obj, key="k-nf", body=missing, lapsed=True, path="/api/releases/promote")

    first = post(client, "/api/releases/promote", missing, key="k-nf")
    retry = post(client, "/api/releases/promote", missing, key="k-nf")

    assert first.status_code == retry.status_code == 404
    assert retry["Idempotent-Replayed"] == "true"


def test_purge__a_day_old_key_whose_request_still_holds_a_live_lease__kept(tenant):
    tenant_obj, client, _ = tenant
    record = dead_reservation(tenant_obj, key="k-long", body=prepare_body(), lapsed=False)
    IdempotencyRecord.objects.filter(pk=record.pk).update(created_at=timezone.now() - timedelta(hours=25))

    response = post(client, "/api/releases/prepare", prepare_body(), key="k-long")

    assert response.status_code == 409
    assert response.json()["error"]["details"]["reason"] == "idempotency_request_in_progress"
    assert IdempotencyRecord.objects.filter(pk=record.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_lease__lapsed__concurrent_retries__exactly_one_takes_over_and_runs(tenant):
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip("needs a control database that serves concurrent connections (PostgreSQL)")
    tenant_obj, client, _ = tenant
    dead_reservation(tenant_obj, key="k-herd", body=prepare_body(), lapsed=True)
    credentials = client._credentials
    results: list[tuple[int, dict, str | None]] = []
    threads_count = 8
    barrier = threading.Barrier(threads_count)

    def worker():
        own = APIClient()
        own.credentials(**credentials)
        barrier.wait()
        try:
            response = post(own, "/api/releases/prepare", prepare_body(), key="k-herd")
            results.append((response.status_code, response.json(), response.get("Idempotent-Replayed")))
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(results) == threads_count
    assert Release.objects.count() == 1
    assert AuditEvent.objects.filter(event="release.prepared").count() == 1
    ran = [body for status, body, replayed in results if status == 201 and replayed is None]
    assert len(ran) == 1, results
    for status, body, _replayed in results:
        if status == 201:
            assert body == ran[0]
        else:
            assert status == 409 and body["error"]["details"]["reason"] == "idempotency_request_in_progress"
    record = IdempotencyRecord.objects.get(key="k-herd")
    assert record.status_code == 201 and record.owner != "web-1:4242:deadbeef"
