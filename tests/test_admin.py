"""The admin: release pages, the four operations (buttons and actions), isolation between tenants.

Real releases are prepared through the service against SQLite target files, so promote and
rollback from the admin really change (and restore) a target.
"""

from __future__ import annotations

import re

import pytest
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from releases import engine
from releases.models import Approval, AuditEvent, Release, ReleaseStatus
from releases.services import release_prepare
from tenants.models import Role, Stage
from tenants.services import membership_set, tenant_setup
from tests.factories import (
    ApprovalFactory,
    AuditEventFactory,
    BackupFactory,
    MigrationFactory,
    ReleaseFactory,
    UserFactory,
)

pytestmark = pytest.mark.django_db

CREATE_WIDGETS = {
    "database": {
        "changes": [
            {
                "type": "create_table",
                "table": "widgets",
                "columns": [{"name": "label", "type": "string", "max_length": 40, "nullable": False}],
            }
        ]
    },
    "feature_flags": {"widgets": True},
}


def change_url(release: Release) -> str:
    return reverse("admin:releases_release_change", args=[release.pk])


def operation_url(release: Release, name: str) -> str:
    return reverse(f"admin:releases_release_{name}", args=[release.pk])


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def tables_of(url: str) -> set[str]:
    with engine.open_target(url) as target:
        return set(engine.introspect(target)["tables"])


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def world(sqlite_database_factory):
    """Tenants acme and other, each with dev/staging/prod SQLite targets and members of every role."""

    def make_tenant(slug: str) -> dict:
        urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
        tenant = tenant_setup(slug=slug, environments=urls)
        users = {}
        for role in (Role.ADMIN, Role.APPROVER, Role.VIEWER):
            user = UserFactory(username=f"{slug}-{role}")
            membership_set(tenant=tenant, user=user, role=role)
            users[role] = user
        return {"tenant": tenant, "urls": urls, **users}

    return {"acme": make_tenant("acme"), "other": make_tenant("other")}


def prepare(world_tenant: dict, to_env: str = "staging", bundle=CREATE_WIDGETS) -> Release:
    return release_prepare(
        tenant=world_tenant["tenant"],
        user=world_tenant[Role.ADMIN],
        from_env={"staging": "dev", "prod": "staging"}[to_env],
        to_env=to_env,
        bundle_data=bundle,
    )


# --- changelist ------------------------------------------------------------------------------------


def _releases(tenant, count: int) -> None:
    for _ in range(count):
        release = ReleaseFactory(tenant=tenant)
        MigrationFactory(release=release)
        ApprovalFactory(release=release)
        AuditEventFactory(release=release)


@pytest.mark.parametrize("count", [3, 30])
def test_release_changelist__3_or_30_releases__same_bounded_number_of_queries(
    world, count, django_assert_max_num_queries
):
    _releases(world["acme"]["tenant"], count)
    client = login(world["acme"][Role.ADMIN])
    with django_assert_max_num_queries(12):
        response = client.get(reverse("admin:releases_release_changelist"))
    assert response.status_code == 200
    assert len(re.findall(r'class="rm-badge rm-status-prepared"', response.content.decode())) == count


def test_release_changelist__statuses__badges_filters_and_search(world):
    tenant = world["acme"]["tenant"]
    promoted = ReleaseFactory(tenant=tenant, status=ReleaseStatus.PROMOTED, release_id="rel_20260102_0101")
    failed = ReleaseFactory(
        tenant=tenant, status=ReleaseStatus.FAILED, to_stage=Stage.PROD, release_id="rel_20260102_0202"
    )
    client = login(world["acme"][Role.VIEWER])
    url = reverse("admin:releases_release_changelist")

    html = client.get(url).content.decode()
    assert 'rm-status-promoted"' in html and 'rm-status-failed"' in html

    html = client.get(url, {"status__exact": "failed"}).content.decode()
    assert failed.release_id in html and promoted.release_id not in html
    html = client.get(url, {"to_environment__stage__exact": "prod"}).content.decode()
    assert failed.release_id in html and promoted.release_id not in html
    html = client.get(url, {"tenant__id__exact": tenant.pk}).content.decode()
    assert failed.release_id in html and promoted.release_id in html
    html = client.get(url, {"q": promoted.release_id}).content.decode()
    assert promoted.release_id in html and failed.release_id not in html
    html = client.get(url, {"q": failed.bundle_sha256[:20]}).content.decode()
    assert failed.release_id in html and promoted.release_id not in html


# --- detail page -----------------------------------------------------------------------------------


def test_release_detail__prepared_release__manifest_sql_lint_approvals_backups_and_links(world):
    release = prepare(world["acme"])
    BackupFactory(release=release, note="backup-note-visible")
    client = login(world["acme"][Role.VIEWER])

    response = client.get(change_url(release))
    html = response.content.decode()
    assert response.status_code == 200
    assert release.bundle_sha256 in html and release.sql_sha256 in html
    migration = release.migrations.get()
    assert 'class="rm-pre rm-sql"' in html
    sql_blocks = re.findall(r'<pre class="rm-pre rm-sql">(.*?)</pre>', html, re.S)
    assert any("CREATE TABLE" in block and "widgets" in block for block in sql_blocks), sql_blocks
    assert any("DROP TABLE" in block or "RENAME" in block.upper() for block in sql_blocks)
    assert migration.rollback_sql.split()[0] in html
    assert "forward_ok" in html and "rollback_verified" in html  # dry-run summary
    assert "backup-note-visible" in html
    assert f"/admin/tools/tooltranscript/?release__id__exact={release.pk}" in html
    assert f"/admin/releases/auditevent/?release__id__exact={release.pk}" in html
    assert "release.prepared" in html  # audit events inline
    assert reverse("admin:releases_release_auditlog", args=[release.pk]) in html
    assert 'name="_save"' not in html, "the manifest is read-only"
    transcripts = client.get(f"/admin/tools/tooltranscript/?release__id__exact={release.pk}")
    assert transcripts.status_code == 200
    events = client.get(f"/admin/releases/auditevent/?release__id__exact={release.pk}")
    assert events.status_code == 200 and "release.prepared" in events.content.decode()


def test_release_detail__lint_errors__listed_and_named_on_promote_confirmation(world):
    bundle = {
        "database": {
            "changes": [
                {
                    "type": "add_column",
                    "table": "accounts",
                    "column": {
                        "name": "required_code",
                        "type": "string",
                        "max_length": 10,
                        "nullable": False,
                    },
                }
            ]
        },
        "feature_flags": {},
    }
    with engine.open_target(world["acme"]["urls"]["staging"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email varchar(100))")
    with engine.open_target(world["acme"]["urls"]["dev"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email varchar(100))")
    release = prepare(world["acme"], bundle=bundle)
    rules = [f["rule"] for f in release.lint_findings if f["severity"] == "error"]
    assert rules, release.lint_findings
    client = login(world["acme"][Role.ADMIN])

    assert rules[0] in client.get(change_url(release)).content.decode()
    html = client.get(operation_url(release, "promote")).content.decode()
    assert 'id="rm-lint-errors"' in html and rules[0] in html
    response = client.post(operation_url(release, "promote"))
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PREPARED
    assert any("Lint errors block" in message for message in messages_of(response))


# --- buttons and roles -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        (Role.ADMIN, {"approve", "reject", "promote"}),
        (Role.APPROVER, {"approve", "reject"}),
        (Role.VIEWER, set()),
    ],
)
def test_release_buttons__prepared_release__only_those_the_role_allows(world, role, expected):
    release = ReleaseFactory(tenant=world["acme"]["tenant"])
    html = login(world["acme"][role]).get(change_url(release)).content.decode()
    shown = set(re.findall(r'id="rm-button-(\w+)"', html))
    assert shown == expected


def test_release_buttons__promoted_release__admin_sees_rollback_only(world):
    release = ReleaseFactory(tenant=world["acme"]["tenant"], status=ReleaseStatus.PROMOTED)
    html = login(world["acme"][Role.ADMIN]).get(change_url(release)).content.decode()
    assert set(re.findall(r'id="rm-button-(\w+)"', html)) == {"rollback"}


@pytest.mark.parametrize(
    ("role", "operation"),
    [
        (Role.VIEWER, "promote"),
        (Role.APPROVER, "promote"),
        (Role.VIEWER, "approve"),
        (Role.VIEWER, "reject"),
    ],
)
def test_release_operation__crafted_post_without_role__403_nothing_changes(world, role, operation):
    release = prepare(world["acme"])
    before = (Release.objects.get(pk=release.pk).status, Approval.objects.count(), AuditEvent.objects.count())
    tables_before = tables_of(world["acme"]["urls"]["staging"])
    client = login(world["acme"][role])

    assert client.get(operation_url(release, operation)).status_code == 403
    response = client.post(operation_url(release, operation))

    assert response.status_code == 403
    after = (Release.objects.get(pk=release.pk).status, Approval.objects.count(), AuditEvent.objects.count())
    assert after == before
    assert tables_of(world["acme"]["urls"]["staging"]) == tables_before


def test_release_operation__crafted_rollback_by_approver__403_release_stays_promoted(world):
    release = prepare(world["acme"])
    admin_client = login(world["acme"][Role.ADMIN])
    admin_client.post(operation_url(release, "promote"))
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED

    response = login(world["acme"][Role.APPROVER]).post(operation_url(release, "rollback"))

    assert response.status_code == 403
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED
    assert "widgets" in tables_of(world["acme"]["urls"]["staging"])


# --- the operations ----------------------------------------------------------------------------------


def test_promote_and_rollback__admin_buttons_with_confirmation__target_follows_and_messages(world):
    release = prepare(world["acme"])
    staging = world["acme"]["urls"]["staging"]
    client = login(world["acme"][Role.ADMIN])

    page = client.get(operation_url(release, "promote")).content.decode()
    assert 'id="rm-target-env">staging<' in page and "CREATE TABLE" in page and "widgets" in page
    assert "widgets" not in tables_of(staging), "the confirmation page changes nothing"

    response = client.post(operation_url(release, "promote"), follow=True)
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED
    assert "widgets" in tables_of(staging)
    assert f"{release.release_id} was promoted to staging." in response.content.decode().lower()
    assert release.audit_events.filter(event="release.promoted", actor_username="acme-admin").exists()

    page = client.get(operation_url(release, "rollback")).content.decode()
    assert "Rollback SQL" in page and ("DROP TABLE" in page.upper() or "RENAME" in page.upper())
    response = client.post(operation_url(release, "rollback"), follow=True)
    release.refresh_from_db()
    assert release.status == ReleaseStatus.ROLLED_BACK
    assert "widgets" not in tables_of(staging)
    assert f"{release.release_id} was rolled back on staging." in response.content.decode().lower()


def test_promote__prod_release_missing_approval__error_message_nothing_applied(world):
    staging_release = prepare(world["acme"])
    client = login(world["acme"][Role.ADMIN])
    client.post(operation_url(staging_release, "promote"))
    release = prepare(world["acme"], to_env="prod")
    assert release.status == ReleaseStatus.PREPARED

    page = client.get(operation_url(release, "promote")).content.decode()
    assert 'id="rm-approvals-missing"' in page and "Approvals missing: 1 required, 0 given." in page
    response = client.post(operation_url(release, "promote"))

    assert response.status_code == 302
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PREPARED
    assert "widgets" not in tables_of(world["acme"]["urls"]["prod"])
    assert messages_of(response) == [f"{release.release_id}: The release needs 1 approval(s), it has 0."]


def test_approve__approver_button__approval_recorded_via_admin_then_admin_promotes_prod(world):
    client = login(world["acme"][Role.ADMIN])
    client.post(operation_url(prepare(world["acme"]), "promote"))
    release = prepare(world["acme"], to_env="prod")
    approver = login(world["acme"][Role.APPROVER])

    page = approver.get(operation_url(release, "approve")).content.decode()
    assert 'id="rm-target-env">prod<' in page and "CREATE TABLE" in page
    response = approver.post(operation_url(release, "approve"), {"comment": "looks right"})

    approval = Approval.objects.get(release=release)
    assert (approval.approver.username, approval.decision, approval.via, approval.comment) == (
        "acme-approver",
        "approved",
        "admin",
        "looks right",
    )
    assert messages_of(response) == [f"You approved {release.release_id}."]
    assert release.audit_events.filter(event="release.approved").exists()

    client.post(operation_url(release, "promote"))
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED
    assert "widgets" in tables_of(world["acme"]["urls"]["prod"])


def test_reject__approver_button__promote_then_refused_with_message(world):
    client = login(world["acme"][Role.ADMIN])
    client.post(operation_url(prepare(world["acme"]), "promote"))
    release = prepare(world["acme"], to_env="prod")
    login(world["acme"][Role.APPROVER]).post(operation_url(release, "reject"))
    assert Approval.objects.get(release=release).decision == "rejected"

    response = client.post(operation_url(release, "promote"))

    release.refresh_from_db()
    assert release.status == ReleaseStatus.PREPARED
    assert messages_of(response)[-1] == f"{release.release_id}: The release was rejected."


def test_approve__author_on_prod__service_refusal_shown_as_error_nothing_saved(world):
    client = login(world["acme"][Role.ADMIN])
    client.post(operation_url(prepare(world["acme"]), "promote"))
    release = prepare(world["acme"], to_env="prod")  # prepared by acme-admin

    response = client.post(operation_url(release, "approve"))

    assert Approval.objects.filter(release=release).count() == 0
    assert messages_of(response)[-1] == (
        f"{release.release_id}: On prod the author of a release cannot approve or reject it."
    )


# --- changelist actions -------------------------------------------------------------------------------


def test_promote_action__confirmation_then_post__promoted(world):
    release = prepare(world["acme"])
    client = login(world["acme"][Role.ADMIN])
    url = reverse("admin:releases_release_changelist")

    page = client.post(url, {"action": "promote_selected", "_selected_action": [release.pk]})
    html = page.content.decode()
    assert page.status_code == 200 and 'id="rm-confirm-form"' in html and "CREATE TABLE" in html
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PREPARED, "the confirmation step changes nothing"

    response = client.post(
        url, {"action": "promote_selected", "_selected_action": [release.pk], "post": "yes"}
    )

    assert response.status_code == 302
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED
    assert f"{release.release_id} was promoted to staging." in messages_of(response)


def test_actions__approver__promote_actions_not_offered_and_crafted_action_ignored(world):
    release = prepare(world["acme"])
    client = login(world["acme"][Role.APPROVER])
    url = reverse("admin:releases_release_changelist")
    html = client.get(url).content.decode()
    assert 'value="approve_selected"' in html and 'value="promote_selected"' not in html

    response = client.post(
        url, {"action": "promote_selected", "_selected_action": [release.pk], "post": "yes"}
    )

    assert response.status_code in (200, 302)
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PREPARED
    assert "widgets" not in tables_of(world["acme"]["urls"]["staging"])


def test_approve_action__two_releases__confirmation_lists_both_then_records_both(world):
    first = ReleaseFactory(tenant=world["acme"]["tenant"], to_stage=Stage.PROD)
    second = ReleaseFactory(tenant=world["acme"]["tenant"], to_stage=Stage.PROD)
    client = login(world["acme"][Role.APPROVER])
    url = reverse("admin:releases_release_changelist")
    data = {"action": "approve_selected", "_selected_action": [first.pk, second.pk]}

    html = client.post(url, data).content.decode()
    assert first.release_id in html and second.release_id in html and Approval.objects.count() == 0

    client.post(url, {**data, "post": "yes"})
    assert set(Approval.objects.values_list("release_id", flat=True)) == {first.pk, second.pk}


# --- isolation between tenants -----------------------------------------------------------------------


def test_isolation__staff_of_acme__cannot_list_open_or_act_on_other_tenants_release(world):
    theirs = prepare(world["other"])
    mine = ReleaseFactory(tenant=world["acme"]["tenant"])
    client = login(world["acme"][Role.ADMIN])

    html = client.get(reverse("admin:releases_release_changelist")).content.decode()
    assert mine.release_id in html and theirs.release_id not in html
    assert "other" not in re.findall(r"tenant__id__exact=\d+\">(\w+)<", html)

    response = client.get(change_url(theirs))
    assert response.status_code == 302 and response["Location"] == reverse("admin:index")
    for name in ("approve", "reject", "promote", "rollback"):
        assert client.get(operation_url(theirs, name)).status_code == 404
        assert client.post(operation_url(theirs, name)).status_code == 404
    assert client.get(reverse("admin:releases_release_auditlog", args=[theirs.pk])).status_code == 404
    url = reverse("admin:releases_release_changelist")
    client.post(url, {"action": "promote_selected", "_selected_action": [theirs.pk], "post": "yes"})
    client.post(url, {"action": "approve_selected", "_selected_action": [theirs.pk], "post": "yes"})

    theirs.refresh_from_db()
    assert theirs.status == ReleaseStatus.PREPARED and not theirs.approvals.exists()
    assert "widgets" not in tables_of(world["other"]["urls"]["staging"])
    events = client.get(reverse("admin:releases_auditevent_changelist")).content.decode()
    assert theirs.release_id not in events
    assert client.get(reverse("admin:releases_release_pipeline", args=["other"])).status_code == 404
    assert client.get(reverse("admin:releases_release_pipeline", args=["acme"])).status_code == 200


def test_isolation__superuser__sees_every_tenant(world):
    theirs = ReleaseFactory(tenant=world["other"]["tenant"])
    mine = ReleaseFactory(tenant=world["acme"]["tenant"])
    root = UserFactory(username="root", is_superuser=True)
    html = login(root).get(reverse("admin:releases_release_changelist")).content.decode()
    assert mine.release_id in html and theirs.release_id in html


def test_isolation__staff_without_membership__admin_index_shows_no_release_models(world):
    loner = UserFactory(username="loner")
    client = login(loner)
    assert client.get(reverse("admin:releases_release_changelist")).status_code == 403
    html = client.get(reverse("admin:index")).content.decode()
    assert 'href="/admin/releases/release/"' not in html


# --- read-only records --------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["auditevent", "migration", "backup", "approval"])
def test_read_only_admins__member_admin__no_add_change_or_delete(world, model):
    release = ReleaseFactory(tenant=world["acme"]["tenant"])
    objects = {
        "auditevent": AuditEventFactory(release=release),
        "migration": MigrationFactory(release=release),
        "backup": BackupFactory(release=release),
        "approval": ApprovalFactory(release=release),
    }
    obj = objects[model]
    client = login(world["acme"][Role.ADMIN])
    model_class = type(obj)
    count = model_class.objects.count()

    assert client.get(reverse(f"admin:releases_{model}_changelist")).status_code == 200
    view = client.get(reverse(f"admin:releases_{model}_change", args=[obj.pk]))
    assert view.status_code == 200 and 'name="_save"' not in view.content.decode()
    assert client.get(reverse(f"admin:releases_{model}_add")).status_code == 403
    assert client.post(reverse(f"admin:releases_{model}_add"), {}).status_code == 403
    assert client.post(reverse(f"admin:releases_{model}_change", args=[obj.pk]), {}).status_code == 403
    assert (
        client.post(reverse(f"admin:releases_{model}_delete", args=[obj.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert model_class.objects.count() == count


def test_release_admin__nobody_adds_changes_or_deletes_releases(world):
    release = ReleaseFactory(tenant=world["acme"]["tenant"])
    client = login(UserFactory(username="root", is_superuser=True))
    assert client.get(reverse("admin:releases_release_add")).status_code == 403
    assert (
        client.post(reverse("admin:releases_release_delete", args=[release.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert Release.objects.filter(pk=release.pk).exists()


def test_promote_action__admin_of_acme_viewer_of_other__other_release_refused_with_message(world):
    theirs = prepare(world["other"])
    user = world["acme"][Role.ADMIN]
    membership_set(tenant=world["other"]["tenant"], user=user, role=Role.VIEWER)
    client = login(user)
    url = reverse("admin:releases_release_changelist")

    assert theirs.release_id in client.get(url).content.decode(), "a viewer of other sees its releases"
    response = client.post(
        url, {"action": "promote_selected", "_selected_action": [theirs.pk], "post": "yes"}
    )

    assert f"{theirs.release_id}: you may not promote releases of other." in messages_of(response)
    theirs.refresh_from_db()
    assert theirs.status == ReleaseStatus.PREPARED
    assert "widgets" not in tables_of(world["other"]["urls"]["staging"])
    assert client.post(operation_url(theirs, "promote")).status_code == 403
