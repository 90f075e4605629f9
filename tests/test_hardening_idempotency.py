"""Idempotency-Key on the release POSTs: a retry gets the first response and nothing runs twice."""

from __future__ import annotations

import contextlib
import json
import threading
from datetime import timedelta
from pathlib import Path

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

REPO = Path(__file__).resolve().parent.parent

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


# --- The attack itself: a web process SIGKILLed mid-request while it holds the key -----------------
#
# Two Django processes share one control database made for the test (a SQLite file, or a fresh
# PostgreSQL database when the suite's control database is PostgreSQL), migrated by `manage.py
# migrate`: the *victim* runs a prepare whose dry-run is made to hang (engine.plan patched in that
# process only) and is SIGKILLed; the *client* retries with the same key. Each is a
# `python -c` process serving JSON commands on stdin (so a retry costs milliseconds, not a Django
# start). This test process judges from the database itself (sqlite3 or psycopg2).

LEASE_SECONDS = 3.0
RESULT_MARK = "LEASE-DRIVER:"


def lease_driver_main() -> None:
    """Entry point of a driver subprocess: one JSON command a line on stdin, one result line each."""
    import os
    import sys
    import time

    from tenants.services import token_issue

    def setup(slug: str, urls: dict) -> dict:
        tenant = tenant_setup(slug=slug, environments=urls, admins=[f"{slug}-admin"])
        _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username=f"{slug}-admin"))
        return {"token": token}

    def post_prepare(token: str, slug: str, key: str, hang: bool = False) -> dict:
        if hang:  # this process only: the dry-run never ends, the request holds the key
            import releases.engine

            def hung_plan(*args, **kwargs):
                print(RESULT_MARK + json.dumps({"in_view": True, "pid": os.getpid()}), flush=True)
                time.sleep(3600)

            releases.engine.plan = hung_plan
        response = post(client_for(token, slug), "/api/releases/prepare", prepare_body(), key=key)
        return {
            "status": response.status_code,
            "body": response.json(),
            "retry_after": response.get("Retry-After"),
            "replayed": response.get("Idempotent-Replayed"),
        }

    actions = {"setup": setup, "post_prepare": post_prepare}
    for line in sys.stdin:
        command = json.loads(line)
        result = actions[command["action"]](**command["params"])
        print(RESULT_MARK + json.dumps(result), flush=True)


class Driver:
    """A driver subprocess and the result lines it prints."""

    def __init__(self, env: dict, log_path) -> None:
        import queue
        import subprocess
        import sys

        self.log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import django; django.setup(); "
                "from tests.test_hardening_idempotency import lease_driver_main; lease_driver_main()",
            ],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith(RESULT_MARK):
                self.lines.put(line[len(RESULT_MARK) :])

    def send(self, action: str, **params) -> None:
        self.process.stdin.write(json.dumps({"action": action, "params": params}) + "\n")
        self.process.stdin.flush()

    def result(self, timeout: float = 60) -> dict:
        import queue

        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            self.log.flush()
            raise AssertionError(f"no answer from the driver:\n{self.log.name}") from None

    def call(self, action: str, **params) -> dict:
        self.send(action, **params)
        return self.result()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=20)
        self.log.close()


class ControlDatabase:
    """Read the shared control database directly, not through the processes under test."""

    def __init__(self, url: str) -> None:
        self.url = url

    def one(self, sql: str) -> tuple:
        if self.url.startswith("sqlite:"):
            import sqlite3

            with contextlib.closing(sqlite3.connect(self.url.removeprefix("sqlite:///"))) as db:
                return db.execute(sql).fetchone()
        import psycopg2

        with contextlib.closing(psycopg2.connect(self.url)) as db, db.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchone()

    def counts(self) -> tuple[int, int]:
        (releases,) = self.one("SELECT count(*) FROM releases_release")
        (prepared,) = self.one("SELECT count(*) FROM releases_auditevent WHERE event = 'release.prepared'")
        return releases, prepared


def test_web_process_sigkilled_mid_request__409_while_its_lease_lives_then_one_retry_runs_once(
    tmp_path, sqlite_database_factory, request
):
    import os
    import signal
    import subprocess
    import sys
    import time

    if (
        connection.vendor == "postgresql"
    ):  # the suite's PostgreSQL pass: the shared database is PostgreSQL too
        control_url = request.getfixturevalue("pg_database_factory")()
    else:
        control_url = f"sqlite:///{tmp_path / 'control.sqlite3'}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "releasemgr.settings",
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": control_url,
        "IDEMPOTENCY_LEASE_SECONDS": str(LEASE_SECONDS),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "BACKUP_DIR": str(tmp_path / "backups"),
        "LOG_LEVEL": "WARNING",
    }
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrate.returncode == 0, migrate.stderr
    database = ControlDatabase(control_url)
    client = Driver(env, tmp_path / "client.log")
    victim = Driver(env, tmp_path / "victim.log")
    try:
        urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
        token = client.call("setup", slug="acme", urls=urls)["token"]

        # The victim reserves the key and hangs inside the prepare's dry-run.
        victim.send("post_prepare", token=token, slug="acme", key="ci-41", hang=True)
        assert victim.result(timeout=120)["in_view"] is True
        (owner,) = database.one("SELECT owner FROM releases_idempotencyrecord WHERE key = 'ci-41'")
        assert owner.split(":")[1] == str(victim.process.pid)

        # Alive and past its first lease: its heartbeat keeps the key; a retry is refused.
        time.sleep(2 * LEASE_SECONDS)
        alive = client.call("post_prepare", token=token, slug="acme", key="ci-41")
        assert alive["status"] == 409, alive
        assert alive["body"]["error"]["details"]["reason"] == "idempotency_request_in_progress"
        assert 1 <= int(alive["retry_after"]) <= LEASE_SECONDS

        os.kill(victim.process.pid, signal.SIGKILL)
        assert victim.process.wait(timeout=20) == -signal.SIGKILL

        # Dead, but its lease has not lapsed yet: still 409, nothing run.
        early = client.call("post_prepare", token=token, slug="acme", key="ci-41")
        assert early["status"] == 409, early
        assert early["body"]["error"]["details"]["reason"] == "idempotency_request_in_progress"
        assert early["retry_after"] is not None
        assert database.counts() == (0, 0)

        # After the lease lapsed: the retry takes the key over and runs the request once.
        time.sleep(LEASE_SECONDS + 0.5)
        retried = client.call("post_prepare", token=token, slug="acme", key="ci-41")
        assert retried["status"] == 201, retried
        assert retried["replayed"] is None and retried["body"]["data"]["status"] == "prepared"
        replayed = client.call("post_prepare", token=token, slug="acme", key="ci-41")
        assert replayed["status"] == 201 and replayed["replayed"] == "true"
        assert replayed["body"] == retried["body"]
    finally:
        victim.stop()
        client.stop()

    assert database.counts() == (1, 1)
    status_code, new_owner = database.one(
        "SELECT status_code, owner FROM releases_idempotencyrecord WHERE key = 'ci-41'"
    )
    assert status_code == 201 and new_owner != owner
