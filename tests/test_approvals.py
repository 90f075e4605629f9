"""Approval policy: who may approve or reject, through the service and the API, and what blocks promote.

Releases here are prepared through the real service (plan, lint, dry-run against SQLite targets),
so promote refusals can be checked against the real target: nothing applied.
"""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from releasemgr.core.errors import Conflict, Forbidden
from releases import engine, services
from releases.models import Approval, ApprovalDecision, AuditEvent, Release, ReleaseStatus
from tenants.models import Environment, Role
from tenants.services import membership_set, tenant_setup, token_issue, user_ensure

pytestmark = pytest.mark.django_db

ADD_NOTES = {
    "database": {
        "changes": [{"type": "add_column", "table": "accounts", "column": {"name": "notes", "type": "text"}}]
    },
    "feature_flags": {},
}


def client_for(token: str, slug: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client


def create_accounts(url: str) -> None:
    with engine.open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email varchar(100))")
        cursor.execute("INSERT INTO accounts (id, email) VALUES (1, 'a@example.com')")


def target_state(url: str) -> tuple[str, list]:
    with engine.open_target(url) as target:
        native = engine.native_fingerprint(target)
        with target.connection.cursor() as cursor:
            cursor.execute("SELECT id, email FROM accounts ORDER BY id")
            rows = cursor.fetchall()
    return native, rows


@pytest.fixture
def world(sqlite_database_factory):
    """Tenant acme (admin, two approvers, a viewer) and tenant other (its own approver)."""

    def setup(slug: str) -> dict:
        urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
        for url in urls.values():
            create_accounts(url)
        tenant = tenant_setup(
            slug=slug,
            environments=urls,
            admins=[f"{slug}-admin"],
            approvers=[f"{slug}-approver", f"{slug}-approver2"],
        )
        viewer = user_ensure(username=f"{slug}-viewer")
        membership_set(tenant=tenant, user=viewer, role=Role.VIEWER)
        users = {u.username: u for u in get_user_model().objects.filter(username__startswith=f"{slug}-")}
        tokens = {name: token_issue(tenant=tenant, user=user)[1] for name, user in users.items()}
        return {"tenant": tenant, "urls": urls, "users": users, "tokens": tokens}

    return {"acme": setup("acme"), "other": setup("other")}


def prepare_to_prod(acme: dict) -> Release:
    """A real prepared release staging -> prod (staging first gets the column, for the prod gate)."""
    tenant, admin = acme["tenant"], acme["users"]["acme-admin"]
    with engine.open_target(acme["urls"]["staging"]) as target, target.connection.cursor() as cursor:
        cursor.execute("ALTER TABLE accounts ADD COLUMN notes text")
    release = services.release_prepare(
        tenant=tenant, user=admin, from_env="staging", to_env="prod", bundle_data=ADD_NOTES
    )
    assert release.status == ReleaseStatus.PREPARED, release.error_message
    return release


def api(acme: dict, username: str) -> APIClient:
    return client_for(acme["tokens"][username], acme["tenant"].slug)


def counts() -> tuple[int, int]:
    return Approval.objects.count(), AuditEvent.objects.filter(event__startswith="release.appro").count()


def test_environment_policy__defaults__prod_needs_one_and_forbids_self_approval(world):
    policy = {
        env.stage: (env.approvals_required, env.allow_self_approval)
        for env in Environment.objects.filter(tenant=world["acme"]["tenant"])
    }
    assert policy == {"dev": (0, True), "staging": (0, True), "prod": (1, False)}


def test_approval_record__author_on_prod__refused_and_nothing_recorded(world):
    acme = world["acme"]
    release = prepare_to_prod(acme)
    before = counts()
    with pytest.raises(Forbidden, match="author"):
        services.approval_record(release=release, user=acme["users"]["acme-admin"], decision="approved")
    assert counts() == before
    assert services.approvals_missing(release) == {"approvals_required": 1, "approved": 0, "rejected": 0}


def test_approve_api__author_on_prod__403_and_nothing_recorded(world):
    acme = world["acme"]
    release = prepare_to_prod(acme)
    before = counts()
    response = api(acme, "acme-admin").post(f"/api/releases/{release.release_id}/approve", {}, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert counts() == before


def test_approval_record__author_where_self_approval_allowed__recorded(world):
    acme = world["acme"]
    Environment.objects.filter(tenant=acme["tenant"], stage="prod").update(allow_self_approval=True)
    release = prepare_to_prod(acme)
    release.refresh_from_db()
    approval = services.approval_record(
        release=release, user=acme["users"]["acme-admin"], decision="approved"
    )
    assert approval.decision == ApprovalDecision.APPROVED
    assert services.approvals_missing(release) is None


def test_approve_api__viewer__403_and_nothing_recorded(world):
    acme = world["acme"]
    release = prepare_to_prod(acme)
    before = counts()
    response = api(acme, "acme-viewer").post(f"/api/releases/{release.release_id}/approve", {}, format="json")
    assert response.status_code == 403
    assert counts() == before


def test_approve_api__approver_of_another_tenant__refused_and_nothing_recorded(world):
    acme, other = world["acme"], world["other"]
    release = prepare_to_prod(acme)
    before = counts()
    # Their own tenant's header: the release is not theirs to see.
    own = client_for(other["tokens"]["other-approver"], "other")
    assert own.post(f"/api/releases/{release.release_id}/approve", {}, format="json").status_code == 404
    # Acme's header with a token of tenant other: refused before anything is read.
    foreign = client_for(other["tokens"]["other-approver"], "acme")
    assert foreign.post(f"/api/releases/{release.release_id}/approve", {}, format="json").status_code == 403
    # And the service itself refuses a non-member, whatever the caller.
    with pytest.raises(Forbidden):
        services.approval_record(release=release, user=other["users"]["other-approver"], decision="approved")
    assert counts() == before


def test_approve_api__approver__200_manifest_lists_approval_and_audit_event(world):
    acme = world["acme"]
    release = prepare_to_prod(acme)
    response = api(acme, "acme-approver").post(
        f"/api/releases/{release.release_id}/approve", {"comment": "looks fine"}, format="json"
    )
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    [approval] = data["approvals"]
    assert approval["approver"] == "acme-approver" and approval["decision"] == "approved"
    assert approval["bundle_sha256"] == release.bundle_sha256 and approval["valid"] is True
    assert approval["via"] == "api" and approval["comment"] == "looks fine"
    assert data["approvals_missing"] is None
    stored = Approval.objects.get(release=release)
    assert (stored.bundle_sha256, stored.sql_sha256) == (release.bundle_sha256, release.sql_sha256)
    event = AuditEvent.objects.get(release=release, event="release.approved")
    assert event.actor_username == "acme-approver"
    assert event.payload["bundle_sha256"] == release.bundle_sha256 and event.payload["via"] == "api"


def test_promote__without_approval__409_and_target_unchanged(world):
    acme = world["acme"]
    release = prepare_to_prod(acme)
    before = target_state(acme["urls"]["prod"])
    response = api(acme, "acme-admin").post(
        "/api/releases/promote", {"release_id": release.release_id}, format="json"
    )
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "approvals_missing"
    assert error["details"] == {"approvals_required": 1, "approved": 0, "rejected": 0}
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PREPARED
    assert target_state(acme["urls"]["prod"]) == before
    assert not AuditEvent.objects.filter(release=release, event__in=["release.promoted", "release.failed"])


def test_reject_api__then_promote__409_rejected_even_with_an_approval_and_target_unchanged(world):
    acme = world["acme"]
    release = prepare_to_prod(acme)
    assert (
        api(acme, "acme-approver")
        .post(f"/api/releases/{release.release_id}/approve", {}, format="json")
        .status_code
        == 200
    )
    response = api(acme, "acme-approver2").post(
        f"/api/releases/{release.release_id}/reject", {"comment": "not on a Friday"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert AuditEvent.objects.filter(release=release, event="release.rejected").count() == 1
    before = target_state(acme["urls"]["prod"])
    with pytest.raises(Conflict, match="rejected") as refused:
        services.release_promote(release=Release.objects.get(pk=release.pk), user=acme["users"]["acme-admin"])
    assert refused.value.details["rejected"] == 1
    response = api(acme, "acme-admin").post(
        "/api/releases/promote", {"release_id": release.release_id}, format="json"
    )
    assert response.status_code == 409
    assert target_state(acme["urls"]["prod"]) == before
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PREPARED


def test_approval__bound_to_bundle_and_sql__a_stale_approval_does_not_count(world):
    acme = world["acme"]
    release = prepare_to_prod(acme)
    services.approval_record(release=release, user=acme["users"]["acme-approver"], decision="approved")
    assert services.approvals_missing(Release.objects.get(pk=release.pk)) is None
    # An approval recorded for other SQL than the release's (e.g. the manifest was re-planned).
    Approval.objects.filter(release=release).update(sql_sha256="0" * 64)
    missing = services.approvals_missing(Release.objects.get(pk=release.pk))
    assert missing == {"approvals_required": 1, "approved": 0, "rejected": 0}


def test_approve_api__release_not_prepared__409_and_nothing_recorded(world):
    acme = world["acme"]
    release = prepare_to_prod(acme)
    Release.objects.filter(pk=release.pk).update(status=ReleaseStatus.FAILED)
    before = counts()
    response = api(acme, "acme-approver").post(
        f"/api/releases/{release.release_id}/approve", {}, format="json"
    )
    assert response.status_code == 409
    assert counts() == before


def test_approve_api__anonymous__401(world):
    release = prepare_to_prod(world["acme"])
    response = APIClient().post(f"/api/releases/{release.release_id}/approve", {}, format="json")
    assert response.status_code == 401
    assert not Approval.objects.exists()
