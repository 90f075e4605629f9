"""Notifications: approval requests with personal links, promoted/failed/rolled back mails to admins.

Mail goes through the real path: the service queues `notify_task` on commit, the task (eager here)
calls the tool kernel's email.send, Django's locmem backend collects the messages.
"""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from releases import engine, links, services, tasks
from releases.models import ApprovalLink, Release, ReleaseStatus
from tenants.models import Environment
from tenants.services import tenant_setup
from tools.models import ToolTranscript

pytestmark = pytest.mark.django_db

ADD_NOTES = {
    "database": {
        "changes": [{"type": "add_column", "table": "accounts", "column": {"name": "notes", "type": "text"}}]
    },
    "feature_flags": {"custom_domains": True},
}
LINK = re.compile(r"http://mail\.example\.test(/approvals/\d+/[^/\s\"<>]+/)")


def create_accounts(url: str, *extra_sql: str) -> None:
    with engine.open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email varchar(100))")
        for sql in extra_sql:
            cursor.execute(sql)


@pytest.fixture
def acme(sqlite_database_factory, settings):
    settings.SITE_URL = "http://mail.example.test"
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    create_accounts(urls["dev"], "ALTER TABLE accounts ADD COLUMN notes text")
    create_accounts(urls["staging"])
    create_accounts(urls["prod"])
    tenant = tenant_setup(
        slug="acme", environments=urls, admins=["acme-admin", "ops"], approvers=["alice", "bob"]
    )
    for user in get_user_model().objects.all():
        user.email = f"{user.username}@example.com"
        user.save(update_fields=["email"])
    return {"tenant": tenant, "urls": urls, "admin": get_user_model().objects.get(username="acme-admin")}


def prepare(acme: dict, *, to_env: str = "prod") -> Release:
    from_env = {"prod": "staging", "staging": "dev"}[to_env]
    if to_env == "prod":  # the prod gate: staging runs the column already
        with engine.open_target(acme["urls"]["staging"]) as target, target.connection.cursor() as cursor:
            cursor.execute("ALTER TABLE accounts ADD COLUMN notes text")
    release = services.release_prepare(
        tenant=acme["tenant"], user=acme["admin"], from_env=from_env, to_env=to_env, bundle_data=ADD_NOTES
    )
    assert release.status == ReleaseStatus.PREPARED, release.error_message
    return release


def html_of(message) -> str:
    [(html, mimetype)] = message.alternatives
    assert mimetype == "text/html"
    return html


def test_prepare__prod_needs_approval__each_approver_mailed_a_personal_link_not_the_author(
    acme, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        release = prepare(acme)
    assert callbacks, "the notification is queued on commit"
    by_recipient = {message.to[0]: message for message in mailoutbox}
    # Approvers and admins may approve; the author (acme-admin) may not on prod.
    assert set(by_recipient) == {"alice@example.com", "bob@example.com", "ops@example.com"}
    paths = {}
    for address, message in by_recipient.items():
        assert message.to == [address], "each approver gets their own mail"
        assert message.subject == (
            f"[releasemgr acme] Approval requested: release {release.release_id} staging -> prod"
        )
        text_link = LINK.search(message.body).group(1)
        assert LINK.search(html_of(message)).group(1).replace("&amp;", "&") == text_link
        assert "add_column accounts" in message.body and release.bundle_sha256 in message.body
        assert "custom_domains = True" in message.body
        assert f"http://mail.example.test/admin/releases/release/{release.pk}/change/" in message.body
        assert "Opening the link decides nothing" in message.body
        paths[address.split("@")[0]] = text_link
    assert len(set(paths.values())) == 3
    for username, path in paths.items():
        resolved = links.approval_link_resolve(
            release_pk=release.pk, token=path.rstrip("/").rsplit("/", 1)[1]
        )
        assert resolved.approver.username == username
        page = Client().get(path)
        assert page.status_code == 200 and f"deciding as <strong>{username}</strong>" in page.content.decode()
    assert ApprovalLink.objects.filter(release=release).count() == 3


def test_approval_request__transcripts__list_each_mail_without_its_link(
    acme, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        release = prepare(acme)
    transcripts = ToolTranscript.objects.filter(release=release, tool="email.send")
    assert transcripts.count() == 3 and all(t.ok and not t.dry_run for t in transcripts)
    tokens = [LINK.search(m.body).group(1).rstrip("/").rsplit("/", 1)[1] for m in mailoutbox]
    for transcript in transcripts:
        assert transcript.args["template"] == "approval_request"
        assert transcript.args["payload"]["approval_url"] == "***"
        stored = str(transcript.args) + str(transcript.result)
        assert not any(token in stored for token in tokens), "a live link must not sit in a transcript"
    manifest_ids = set(Release.objects.get(pk=release.pk).transcripts.values_list("transcript_id", flat=True))
    assert set(transcripts.values_list("transcript_id", flat=True)) <= manifest_ids


def test_notify_task__prepared_run_twice__approvers_mailed_once(acme, mailoutbox):
    release = prepare(acme)
    first = tasks.notify_task(release.pk, "prepared")
    second = tasks.notify_task(release.pk, "prepared")
    assert len(first) == 3 and second == []
    assert len(mailoutbox) == 3
    assert ApprovalLink.objects.filter(release=release).count() == 3


def test_notify_task__release_already_decided_or_promoted__no_approval_request(acme, mailoutbox):
    release = prepare(acme)
    Release.objects.filter(pk=release.pk).update(status=ReleaseStatus.FAILED)
    assert tasks.notify_task(release.pk, "prepared") == []
    assert mailoutbox == [] and not ApprovalLink.objects.exists()


def test_prepare__no_approval_needed__approvers_informed_without_links(
    acme, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        release = prepare(acme, to_env="staging")
    [message] = mailoutbox
    assert sorted(message.to) == sorted(
        ["acme-admin@example.com", "ops@example.com", "alice@example.com", "bob@example.com"]
    )
    assert release.release_id in message.subject and "prepared" in message.subject
    assert "/approvals/" not in message.body and not ApprovalLink.objects.exists()
    # It says what is true: staging needs no approval (it used to say "waits for approval").
    assert "needs no approval" in message.body and "waits for approval" not in message.body
    assert "needs no approval" in html_of(message)


def test_approval_request__mail_backend_down__no_link_left_and_a_retry_asks_again(acme, mailoutbox, settings):
    release = prepare(acme)
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 1, 2
    with pytest.raises(RuntimeError, match="approval requests not sent"):
        tasks.notify_task(release.pk, "prepared")
    assert not ApprovalLink.objects.filter(release=release).exists()
    failed = ToolTranscript.objects.filter(release=release, tool="email.send", ok=False)
    assert failed.count() == 3 and all(t.error for t in failed)
    settings.EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
    assert len(tasks.notify_task(release.pk, "prepared")) == 3
    assert len(mailoutbox) == 3


def approve(release: Release) -> None:
    services.approval_record(
        release=release, user=get_user_model().objects.get(username="alice"), decision="approved"
    )


def admin_mails(mailoutbox) -> list:
    return [m for m in mailoutbox if sorted(m.to) == ["acme-admin@example.com", "ops@example.com"]]


def test_promote__promoted__admins_mailed_with_admin_link(
    acme, mailoutbox, django_capture_on_commit_callbacks
):
    release = prepare(acme)
    approve(release)
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.release_promote(release=Release.objects.get(pk=release.pk), user=acme["admin"])
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED, release.error_message
    [message] = admin_mails(mailoutbox)
    assert message.subject == f"[releasemgr acme] Release {release.release_id} staging -> prod: promoted"
    admin_link = f"http://mail.example.test/admin/releases/release/{release.pk}/change/"
    assert admin_link in message.body and admin_link in html_of(message)
    assert "is now: promoted" in message.body


def test_promote__schema_drift__admins_mailed_failed_with_the_error(
    acme, mailoutbox, django_capture_on_commit_callbacks
):
    release = prepare(acme)
    approve(release)
    with engine.open_target(acme["urls"]["prod"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE surprise (id integer PRIMARY KEY)")
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.release_promote(release=Release.objects.get(pk=release.pk), user=acme["admin"])
    release.refresh_from_db()
    assert release.status == ReleaseStatus.FAILED
    [message] = admin_mails(mailoutbox)
    assert message.subject.endswith(": failed")
    assert "Error: " in message.body and release.error_message[:40] in message.body


def test_rollback__rolled_back__admins_mailed(acme, mailoutbox, django_capture_on_commit_callbacks):
    Environment.objects.filter(tenant=acme["tenant"], stage="prod").update(approvals_required=0)
    release = prepare(acme)
    with django_capture_on_commit_callbacks(execute=True):
        services.release_promote(release=Release.objects.get(pk=release.pk), user=acme["admin"])
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PROMOTED
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.release_rollback(release=Release.objects.get(pk=release.pk), user=acme["admin"])
    release.refresh_from_db()
    assert release.status == ReleaseStatus.ROLLED_BACK, release.error_message
    [message] = admin_mails(mailoutbox)
    assert message.subject.endswith(": rolled_back") or "rolled" in message.subject
    assert f"/admin/releases/release/{release.pk}/change/" in message.body


def test_notify__inside_a_transaction__nothing_sent_before_commit(
    acme, mailoutbox, django_capture_on_commit_callbacks
):
    release = prepare(acme, to_env="staging")
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        services.notify(release, "failed")
    assert mailoutbox == [] and len(callbacks) == 1
    callbacks[0]()
    [message] = mailoutbox
    assert message.subject.endswith(": prepared") or release.release_id in message.subject


def test_notify_task__unknown_release__nothing_sent(acme, mailoutbox):
    assert tasks.notify_task(987654, "promoted") == []
    assert mailoutbox == []
