"""Audit: domain events of every release step (who, what, where from, when), append-only, in the
transaction of the change; django-auditlog history of the models without their secrets."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from auditlog.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.contenttypes.models import ContentType
from django.db import transaction
from django.utils import timezone
from rest_framework.test import APIClient

from releases import engine
from releases.models import AuditEvent, Release, ReleaseStatus
from releases.services import audit_record
from tenants.models import ApiToken, Environment
from tenants.services import environment_set, tenant_setup, token_issue

pytestmark = pytest.mark.django_db

CLIENT_ADDRESS = "203.0.113.7"  # TEST-NET-3: only a value in REMOTE_ADDR, never contacted


def widgets_bundle(table: str = "widgets") -> dict:
    return {
        "database": {
            "changes": [{"type": "create_table", "table": table, "columns": [{"name": "n", "type": "text"}]}]
        },
        "feature_flags": {},
    }


@pytest.fixture
def setup(sqlite_database_factory):
    slug = f"audit{uuid.uuid4().hex[:8]}"
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(
        slug=slug, environments=urls, admins=[f"{slug}-admin"], approvers=[f"{slug}-approver"]
    )
    users = get_user_model().objects
    clients = {}
    for role in ("admin", "approver"):
        _, token = token_issue(tenant=tenant, user=users.get(username=f"{slug}-{role}"))
        client = APIClient(REMOTE_ADDR=CLIENT_ADDRESS)
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
        clients[role] = client
    return tenant, urls, clients


def prepare(client, bundle: dict, request_id: str) -> dict:
    response = client.post(
        "/api/releases/prepare",
        {"from_env": "dev", "to_env": "staging", "bundle_data": bundle},
        format="json",
        HTTP_X_REQUEST_ID=request_id,
    )
    assert response.status_code == 201, response.content
    return response.json()["data"]


@pytest.mark.django_db(transaction=True)
def test_audit__release_lifecycle_over_the_api__events_name_actor_tenant_release_address_request_time(setup):
    tenant, urls, clients = setup
    admin, approver = clients["admin"], clients["approver"]
    started = timezone.now()

    first = prepare(admin, widgets_bundle(), "req-audit-prepare")
    approved = approver.post(
        f"/api/releases/{first['release_id']}/approve",
        {"comment": "ok"},
        format="json",
        HTTP_X_REQUEST_ID="req-ap",
    )
    assert approved.status_code == 200, approved.content
    promoted = admin.post("/api/releases/promote", {"release_id": first["release_id"]}, format="json")
    assert promoted.json()["data"]["status"] == "promoted", promoted.content
    rolled_back = admin.post("/api/releases/rollback", {"release_id": first["release_id"]}, format="json")
    assert rolled_back.json()["data"]["status"] == "rolled_back", rolled_back.content
    second = prepare(admin, widgets_bundle("gadgets"), "req-audit-second")
    rejected = approver.post(
        f"/api/releases/{second['release_id']}/reject",
        {"comment": "no"},
        format="json",
        HTTP_X_REQUEST_ID="req-rj",
    )
    assert rejected.status_code == 200, rejected.content

    events = list(AuditEvent.objects.filter(tenant=tenant).select_related("release", "environment"))
    assert [(event.event, event.release.release_id) for event in events] == [
        ("release.prepared", first["release_id"]),
        ("release.approved", first["release_id"]),
        ("release.promoted", first["release_id"]),
        ("release.rollback", first["release_id"]),
        ("release.prepared", second["release_id"]),
        ("release.rejected", second["release_id"]),
    ]
    by_name = {(event.event, event.release.release_id): event for event in events}
    slug = tenant.slug
    for event in events:
        assert event.tenant_id == tenant.pk and event.environment.stage == "staging"
        assert event.client_address == CLIENT_ADDRESS
        assert event.request_id
        assert started - timedelta(seconds=1) <= event.created_at <= timezone.now()
    prepared = by_name[("release.prepared", first["release_id"])]
    assert prepared.actor.username == prepared.actor_username == f"{slug}-admin"
    assert prepared.request_id == "req-audit-prepare"
    assert prepared.payload["bundle_sha256"] == first["bundle_sha256"]
    assert (prepared.payload["from_env"], prepared.payload["to_env"]) == ("dev", "staging")
    approval = by_name[("release.approved", first["release_id"])]
    assert approval.actor_username == f"{slug}-approver" and approval.request_id == "req-ap"
    assert approval.payload["comment"] == "ok" and approval.payload["via"] == "api"
    rejection = by_name[("release.rejected", second["release_id"])]
    assert rejection.actor_username == f"{slug}-approver" and rejection.request_id == "req-rj"
    assert by_name[("release.promoted", first["release_id"])].actor_username == f"{slug}-admin"
    assert by_name[("release.rollback", first["release_id"])].actor_username == f"{slug}-admin"
    text = json.dumps([event.payload for event in events])
    for url in urls.values():
        assert url.removeprefix("sqlite:///") not in text


@pytest.mark.django_db(transaction=True)
def test_audit__promotion_fails_on_drift__release_failed_event_with_phase_and_code(setup):
    tenant, urls, clients = setup
    release = prepare(clients["admin"], widgets_bundle(), "req-drift")
    with engine.open_target(urls["staging"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE unexpected (id integer PRIMARY KEY)")  # someone changed the target
        if target.vendor == "sqlite":
            target.connection.commit()

    promoted = clients["admin"].post(
        "/api/releases/promote", {"release_id": release["release_id"]}, format="json"
    )

    assert promoted.json()["data"]["status"] == "failed", promoted.content
    [failed] = AuditEvent.objects.filter(tenant=tenant, event="release.failed")
    assert failed.release.release_id == release["release_id"]
    assert failed.payload["phase"] == "promote" and failed.payload["code"] == "schema_drift"
    assert failed.actor_username == f"{tenant.slug}-admin"


def test_audit_event__saved_again_or_deleted__refused_and_unchanged(setup):
    tenant, _, _ = setup
    event = audit_record(event="release.prepared", tenant=tenant, payload={"n": 1})

    event.payload = {"n": 2}
    with pytest.raises(ValueError, match="append-only"):
        event.save()
    with pytest.raises(ValueError, match="append-only"):
        event.delete()

    stored = AuditEvent.objects.get(pk=event.pk)
    assert stored.payload == {"n": 1}


def test_audit_record__transaction_fails_after_the_write__event_and_change_roll_back_together(setup):
    tenant, _, clients = setup
    release = Release.objects.get(
        release_id=prepare(clients["admin"], widgets_bundle(), "req-tx")["release_id"]
    )
    events_before = AuditEvent.objects.count()

    with pytest.raises(RuntimeError), transaction.atomic():
        Release.objects.filter(pk=release.pk).update(
            status=ReleaseStatus.PROMOTED, promoted_at=timezone.now()
        )
        audit_record(event="release.promoted", tenant=tenant, release=release, payload={"x": 1})
        assert AuditEvent.objects.count() == events_before + 1
        raise RuntimeError("the change failed after its audit event was written")

    assert AuditEvent.objects.count() == events_before
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PREPARED and release.promoted_at is None


def log_entries_text(model, pk) -> str:
    entries = LogEntry.objects.filter(
        content_type=ContentType.objects.get_for_model(model), object_pk=str(pk)
    )
    assert entries.exists(), f"django-auditlog recorded nothing for {model.__name__} {pk}"
    return json.dumps(
        [
            [
                entry.changes,
                entry.changes_text,
                entry.object_repr,
                entry.serialized_data,
                entry.additional_data,
            ]
            for entry in entries
        ],
        default=str,
    )


def test_auditlog__environment_created_and_changed__history_without_url_or_ciphertext(setup):
    tenant, _, _ = setup
    secret_url = "postgres://deploy:env-secret-pw@db.internal:5432/app"
    environment = Environment.objects.get(tenant=tenant, stage="prod")
    old_ciphertext = environment.database_url_encrypted
    environment_set(tenant=tenant, stage="prod", database_url=secret_url)
    environment.refresh_from_db()
    environment.approvals_required = 2
    environment.save()

    text = log_entries_text(Environment, environment.pk)

    assert "approvals_required" in text
    for secret in (
        secret_url,
        "env-secret-pw",
        "db.internal",
        old_ciphertext,
        environment.database_url_encrypted,
    ):
        assert secret not in text
    assert "database_url_encrypted" not in text


def test_auditlog__api_token_issued_and_revoked__history_without_hash_or_token(setup):
    tenant, _, _ = setup
    user = get_user_model().objects.get(username=f"{tenant.slug}-admin")
    token, raw = token_issue(tenant=tenant, user=user, name="ci")
    token.revoked_at = timezone.now()
    token.save()

    text = log_entries_text(ApiToken, token.pk)

    assert "revoked_at" in text
    assert raw not in text and token.token_hash not in text and "token_hash" not in text


SECRET_FIELDS = {
    ("tenants", "environment"): {"database_url_encrypted"},
    ("tenants", "apitoken"): {"token_hash"},
    ("releases", "approvallink"): {"nonce"},
}


def test_auditlog__every_project_model__registered_with_secret_fields_excluded():
    from auditlog.registry import auditlog
    from django.apps import apps

    for app_label in ("tenants", "releases", "tools"):
        for model in apps.get_app_config(app_label).get_models():
            assert auditlog.contains(model), f"{model.__name__} has no django-auditlog history"
            excluded = set(auditlog.get_model_fields(model)["exclude_fields"])
            secrets = SECRET_FIELDS.get((app_label, model._meta.model_name), set())
            assert secrets <= excluded, f"{model.__name__} logs {secrets - excluded}"


@pytest.mark.django_db
def test_audit_events__bulk_update_or_delete__refused():
    from releases.models import AuditEvent

    with pytest.raises(ValueError, match="append-only"):
        AuditEvent.objects.all().update(event="release.tampered")
    with pytest.raises(ValueError, match="append-only"):
        AuditEvent.objects.filter(event="release.prepared").delete()
