"""E-mail approval links: GET shows the release and decides nothing; only the page's POST decides, once.

The links are the ones mailed by the real notification (locmem backend), for a release prepared
through the real service against SQLite targets.
"""

from __future__ import annotations

import re
import time
from datetime import timedelta
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.middleware.csrf import _get_new_csrf_string
from django.test import Client
from django.utils import timezone

from releases import engine, links, services, tasks
from releases.models import Approval, ApprovalLink, AuditEvent, Release, ReleaseStatus
from tenants.models import Membership, Role
from tenants.services import tenant_setup, user_ensure

pytestmark = pytest.mark.django_db

ADD_NOTES = {
    "database": {
        "changes": [
            {"type": "add_column", "table": "accounts", "column": {"name": "notes", "type": "text"}},
            {
                "type": "add_column",
                "table": "accounts",
                "column": {
                    "name": "plan",
                    "type": "string",
                    "max_length": 20,
                    "nullable": False,
                    "default": "free",
                },
            },
        ]
    },
    "feature_flags": {"custom_domains": True},
}
LINK = re.compile(r"http://testserver(/approvals/\d+/[^/\s\"<>]+/)")


def create_accounts(url: str, *extra_sql: str) -> None:
    with engine.open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email varchar(100))")
        for sql in extra_sql:
            cursor.execute(sql)


@pytest.fixture
def acme(sqlite_database_factory, settings):
    settings.SITE_URL = "http://testserver"
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    create_accounts(urls["dev"])
    create_accounts(
        urls["staging"],
        "ALTER TABLE accounts ADD COLUMN notes text",
        "ALTER TABLE accounts ADD COLUMN plan varchar(20) NOT NULL DEFAULT 'free'",
    )
    create_accounts(urls["prod"])
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"], approvers=["alice", "bob"])
    for user in get_user_model().objects.all():
        user.email = f"{user.username}@example.com"
        user.save(update_fields=["email"])
    return {"tenant": tenant, "urls": urls, "admin": get_user_model().objects.get(username="acme-admin")}


def prepare(acme: dict, mailoutbox) -> tuple[Release, dict[str, str]]:
    """Prepare staging -> prod, run the notification as the task would, return the mailed link paths."""
    release = services.release_prepare(
        tenant=acme["tenant"], user=acme["admin"], from_env="staging", to_env="prod", bundle_data=ADD_NOTES
    )
    assert release.status == ReleaseStatus.PREPARED, release.error_message
    mailoutbox.clear()
    tasks.notify_task(release.pk, "prepared")
    paths = {}
    for message in mailoutbox:
        [address] = message.to
        paths[address.split("@")[0]] = LINK.search(message.body).group(1)
    return release, paths


def csrf_client(user=None) -> Client:
    client = Client(enforce_csrf_checks=True)
    if user is not None:
        client.force_login(user)
    return client


def post_decision(client: Client, path: str, decision: str, comment: str = ""):
    """What a browser does: load the page (it sets the CSRF cookie), then submit its form.

    A refused page has no form; the POST then carries a valid CSRF pair of its own, so the refusal
    seen is the link's, not CSRF's.
    """
    page = client.get(path)
    match = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    if match:
        token = match.group(1)
    else:
        token = _get_new_csrf_string()
        client.cookies["csrftoken"] = token
    return page, client.post(path, {"decision": decision, "comment": comment, "csrfmiddlewaretoken": token})


def nothing_decided(release: Release) -> bool:
    return (
        not Approval.objects.filter(release=release).exists()
        and not AuditEvent.objects.filter(
            release=release, event__in=["release.approved", "release.rejected"]
        ).exists()
    )


def test_link_get__valid_link__shows_sql_rollback_lint_dry_run_and_decides_nothing(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    assert set(paths) == {"alice", "bob"}, "the author must not be asked on prod"
    response = Client().get(paths["alice"])
    assert response.status_code == 200
    page = response.content.decode()
    for migration in release.migrations.all():
        assert migration.sql.split("\n")[0][:40].replace('"', "&quot;") in page
        assert migration.rollback_sql.split("\n")[0][:40].replace('"', "&quot;") in page
    for finding in release.lint_findings:
        assert finding["rule"] in page
    assert 'rollback: <span class="ok">verified' in page.replace("\n", " ")
    assert "alice" in page and release.bundle_sha256 in page
    assert 'name="csrfmiddlewaretoken"' in page and 'value="approved"' in page and 'value="rejected"' in page
    assert response["Referrer-Policy"] == "same-origin"
    assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]
    # A scanner fetching it ten times decides nothing and uses nothing.
    for _ in range(10):
        assert Client().get(paths["alice"]).status_code == 200
    assert nothing_decided(release)
    assert not ApprovalLink.objects.filter(release=release, used_at__isnull=False).exists()


def test_link_post__approve_with_csrf__recorded_via_email_audited_and_link_used(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    _, response = post_decision(csrf_client(), paths["alice"], "approved", "ship it")
    assert response.status_code == 200, response.content.decode()
    assert "approved" in response.content.decode()
    approval = Approval.objects.get(release=release)
    assert (approval.approver.username, approval.decision, approval.via) == ("alice", "approved", "email")
    assert approval.comment == "ship it"
    assert (approval.bundle_sha256, approval.sql_sha256) == (release.bundle_sha256, release.sql_sha256)
    event = AuditEvent.objects.get(release=release, event="release.approved")
    assert event.actor_username == "alice" and event.payload["via"] == "email"
    link = ApprovalLink.objects.get(release=release, approver__username="alice")
    assert link.used_at is not None
    assert services.approvals_missing(Release.objects.get(pk=release.pk)) is None


def test_link_post__reject__blocks_promote(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    _, response = post_decision(csrf_client(), paths["bob"], "rejected", "no")
    assert response.status_code == 200
    assert AuditEvent.objects.filter(release=release, event="release.rejected", actor_username="bob").exists()
    missing = services.approvals_missing(Release.objects.get(pk=release.pk))
    assert missing["rejected"] == 1


def test_link_post__without_csrf_token__403_and_nothing_decided(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    response = csrf_client().post(paths["alice"], {"decision": "approved"})
    assert response.status_code == 403
    assert nothing_decided(release)
    assert ApprovalLink.objects.get(release=release, approver__username="alice").used_at is None


def test_link_post__used_twice__second_410_and_first_decision_stands(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    client = csrf_client()
    _, first = post_decision(client, paths["alice"], "approved")
    assert first.status_code == 200
    page, second = post_decision(client, paths["alice"], "rejected")
    assert page.status_code == 410 and "already been used" in page.content.decode()
    assert second.status_code == 410 and "already been used" in second.content.decode()
    assert list(Approval.objects.filter(release=release).values_list("decision", flat=True)) == ["approved"]
    assert AuditEvent.objects.filter(release=release, event__startswith="release.re").count() == 0


def test_link_decide__two_concurrent_uses__only_one_decides(acme, mailoutbox, monkeypatch):
    release, paths = prepare(acme, mailoutbox)
    token = paths["alice"].rstrip("/").rsplit("/", 1)[1]
    # Both requests resolved the link before either consumed it (the race the UPDATE settles).
    resolved = links.approval_link_resolve(release_pk=release.pk, token=token)
    services.approval_link_decide(release_pk=release.pk, token=token, decision="approved")
    consumed = ApprovalLink.objects.filter(nonce=resolved.link.nonce, used_at__isnull=True).update(
        used_at=timezone.now()
    )
    assert consumed == 0
    # The second request's resolve happened before the first consumed the link: it reaches the
    # conditional UPDATE, which refuses it as used.
    monkeypatch.setattr(links, "approval_link_resolve", lambda **kwargs: resolved)
    with pytest.raises(links.LinkError) as refused:
        services.approval_link_decide(release_pk=release.pk, token=token, decision="rejected")
    assert refused.value.code == "used"
    assert Approval.objects.get(release=release).decision == "approved"


def test_link__signature_older_than_max_age__410_expired_and_nothing_decided(acme, mailoutbox, settings):
    release, paths = prepare(acme, mailoutbox)
    later = time.time() + settings.APPROVAL_LINK_MAX_AGE + 60
    with mock.patch("django.core.signing.time.time", return_value=later):
        page, response = post_decision(csrf_client(), paths["alice"], "approved")
    assert page.status_code == 410 and "expired" in page.content.decode()
    assert response.status_code == 410
    assert nothing_decided(release)


def test_link__stored_expiry_passed__410_expired(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    ApprovalLink.objects.filter(release=release).update(expires_at=timezone.now() - timedelta(seconds=1))
    page, response = post_decision(csrf_client(), paths["alice"], "approved")
    assert page.status_code == 410 and response.status_code == 410
    assert "expired" in response.content.decode()
    assert nothing_decided(release)


def test_link__default_max_age__24_hours(acme, mailoutbox, settings):
    assert settings.APPROVAL_LINK_MAX_AGE == 24 * 3600
    release, _ = prepare(acme, mailoutbox)
    link = ApprovalLink.objects.filter(release=release).first()
    assert abs((link.expires_at - link.created_at) - timedelta(hours=24)) < timedelta(seconds=1)
    assert "expires in 24 hours" in mailoutbox[0].body


@pytest.mark.parametrize("position", [-3, 20, 45])
def test_link__tampered_token__400_and_nothing_decided(acme, mailoutbox, position):
    release, paths = prepare(acme, mailoutbox)
    prefix, token = paths["alice"].rstrip("/").rsplit("/", 1)
    index = position % len(token)
    swapped = "A" if token[index] != "A" else "B"
    path = f"{prefix}/{token[:index]}{swapped}{token[index + 1 :]}/"
    page, response = post_decision(csrf_client(), path, "approved")
    assert page.status_code == 400 and response.status_code == 400
    assert "not valid" in response.content.decode()
    assert nothing_decided(release)


def test_link__used_under_another_release_url__400_foreign(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    token = paths["alice"].rstrip("/").rsplit("/", 1)[1]
    other = Release.objects.create(
        tenant=release.tenant,
        release_id="rel_20260101_0000",
        from_environment=release.from_environment,
        to_environment=release.to_environment,
        bundle=release.bundle,
        bundle_sha256=release.bundle_sha256,
        sql_sha256=release.sql_sha256,
        created_by=release.created_by,
    )
    page, response = post_decision(csrf_client(), f"/approvals/{other.pk}/{token}/", "approved")
    assert page.status_code == 400 and response.status_code == 400
    assert "another release" in response.content.decode()
    assert not Approval.objects.exists()


def test_link__signed_for_another_bundle__409_foreign(acme, mailoutbox):
    release, _ = prepare(acme, mailoutbox)
    alice = get_user_model().objects.get(username="alice")
    nonce = ApprovalLink.objects.get(release=release, approver=alice).nonce
    forged_bundle = links.sign({"r": release.pk, "u": alice.pk, "b": "f" * 64, "n": nonce})
    page, response = post_decision(csrf_client(), f"/approvals/{release.pk}/{forged_bundle}/", "approved")
    assert page.status_code == 409 and response.status_code == 409
    assert "different bundle" in response.content.decode()
    assert nothing_decided(release)


def test_link__nonce_of_another_approver__404_and_nothing_decided(acme, mailoutbox):
    release, _ = prepare(acme, mailoutbox)
    alice = get_user_model().objects.get(username="alice")
    bob_nonce = ApprovalLink.objects.get(release=release, approver__username="bob").nonce
    token = links.sign({"r": release.pk, "u": alice.pk, "b": release.bundle_sha256, "n": bob_nonce})
    page, response = post_decision(csrf_client(), f"/approvals/{release.pk}/{token}/", "approved")
    assert page.status_code == 404 and response.status_code == 404
    assert nothing_decided(release)


def test_link__logged_in_as_another_user__403_on_get_and_post(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    bob = get_user_model().objects.get(username="bob")
    page, response = post_decision(csrf_client(bob), paths["alice"], "approved")
    assert page.status_code == 403 and response.status_code == 403
    assert "another user" in response.content.decode()
    assert nothing_decided(release)
    assert ApprovalLink.objects.get(release=release, approver__username="alice").used_at is None


def test_link__logged_in_as_its_own_approver__decides(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    alice = get_user_model().objects.get(username="alice")
    _, response = post_decision(csrf_client(alice), paths["alice"], "approved")
    assert response.status_code == 200
    assert Approval.objects.get(release=release).approver == alice


def test_link__approver_lost_the_role__403_and_link_still_unused(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    Membership.objects.filter(user__username="alice").update(role=Role.VIEWER)
    _, response = post_decision(csrf_client(), paths["alice"], "approved")
    assert response.status_code == 403
    assert nothing_decided(release)
    assert ApprovalLink.objects.get(release=release, approver__username="alice").used_at is None


def test_link__release_no_longer_prepared__409(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    Release.objects.filter(pk=release.pk).update(status=ReleaseStatus.FAILED)
    page, response = post_decision(csrf_client(), paths["alice"], "approved")
    assert page.status_code == 409 and response.status_code == 409
    assert "can no longer be approved" in response.content.decode()
    assert nothing_decided(release)


def test_link_post__unknown_decision__400_and_link_unused(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    _, response = post_decision(csrf_client(), paths["alice"], "maybe")
    assert response.status_code == 400
    assert nothing_decided(release)
    assert ApprovalLink.objects.get(release=release, approver__username="alice").used_at is None


def test_link__garbage_path__404_or_400_never_500(acme, mailoutbox):
    release, _ = prepare(acme, mailoutbox)
    client = Client()
    assert client.get(f"/approvals/{release.pk}/not-a-token/").status_code == 400
    assert client.get(f"/approvals/{release.pk}/{'x' * 5000}/").status_code == 400
    assert client.get("/approvals/abc/def/").status_code == 404
    assert client.put(f"/approvals/{release.pk}/x/").status_code == 405


def test_link__author_on_prod__never_mailed_and_a_link_for_them_is_refused(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    admin = acme["admin"]
    assert "acme-admin" not in paths
    token = links.approval_link_issue(release=release, approver=admin)
    _, response = post_decision(csrf_client(), f"/approvals/{release.pk}/{token}/", "approved")
    assert response.status_code == 403 and "author" in response.content.decode()
    assert nothing_decided(release)


def test_link__inactive_user__403(acme, mailoutbox):
    release, paths = prepare(acme, mailoutbox)
    get_user_model().objects.filter(username="alice").update(is_active=False)
    assert Client().get(paths["alice"]).status_code == 403
    user_ensure(username="unused")  # unrelated users change nothing
    assert nothing_decided(release)


def test_link_refused__logs__never_carry_the_token(acme, mailoutbox, caplog):
    release, paths = prepare(acme, mailoutbox)
    token = paths["alice"].rstrip("/").rsplit("/", 1)[1]
    bob = get_user_model().objects.get(username="bob")
    with caplog.at_level("INFO"):
        page, response = post_decision(csrf_client(bob), paths["alice"], "approved")  # still a live link
    assert page.status_code == 403 and response.status_code == 403
    assert any("approval link refused (other_user, 403)" in r.getMessage() for r in caplog.records)
    assert not any(token in r.getMessage() for r in caplog.records)
