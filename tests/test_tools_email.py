"""email.send: templates/emails/<template> rendered with the payload; dry_run renders without sending."""

from __future__ import annotations

import pytest
from django.core import mail

from tools.handlers.email_send import render
from tools.kernel import ToolCall, ToolContext, tool_kernel
from tools.models import ToolTranscript

from .test_tools_support import make_tenant

pytestmark = pytest.mark.django_db

PAYLOAD = {
    "release_id": "rel_20240115_1200",
    "status": "promoted",
    "from_env": "staging",
    "to_env": "prod",
    "error_message": "",
    "migrations": [{"operation": "create_table", "table": "new_feature"}],
}


@pytest.fixture
def setup(sqlite_database_factory):
    return make_tenant("acme", sqlite_database_factory)


def send(setup, **args):
    call = ToolCall(id="email_1", tool="email.send", args={"template": "release_notification", **args})
    return tool_kernel.execute(call, ToolContext(setup.tenant, user=setup.admin))


def test_email_send__guide_example_not_dry_run__sent_with_text_and_html(setup):
    result = send(setup, to="admin@company.com", payload=PAYLOAD, dry_run=False)
    assert result.ok is True, result.error
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.to == ["admin@company.com"]
    assert message.subject == "[releasemgr acme] Release rel_20240115_1200 staging -> prod: promoted"
    assert "rel_20240115_1200 (staging -> prod) is now: promoted." in message.body
    assert "1. create_table new_feature" in message.body
    ((html, mimetype),) = message.alternatives
    assert mimetype == "text/html"
    assert "<code>rel_20240115_1200</code>" in html
    assert result.data["to"] == ["admin@company.com"]
    assert result.data["sent"] is True


def test_email_send__dry_run__rendered_not_sent(setup):
    result = send(setup, to=["a@example.com", "b@example.com"], payload=PAYLOAD, dry_run=True)
    assert result.ok is True, result.error
    assert mail.outbox == []
    assert result.data["sent"] is False
    assert result.data["subject"].endswith("promoted")
    assert "promoted" in result.data["text"]
    assert result.data["html"].startswith("<!DOCTYPE html>")
    assert result.data["to"] == ["a@example.com", "b@example.com"]
    assert ToolTranscript.objects.get().dry_run is True


def test_email_send__context_default__dry_run(setup):
    result = send(setup, to="a@example.com", payload=PAYLOAD)
    assert result.ok is True
    assert mail.outbox == []


def test_email_send__unknown_template__validation_error_naming_template(setup):
    result = send(setup, to="a@example.com", payload=PAYLOAD, dry_run=False)
    assert result.ok is True
    call = ToolCall(id="e", tool="email.send", args={"template": "no_such_mail", "to": "a@example.com"})
    result = tool_kernel.execute(call, ToolContext(setup.tenant, user=setup.admin))
    assert result.ok is False
    assert result.error_code == "validation_error"
    assert result.details == {"template": ["Unknown e-mail template 'no_such_mail'."]}
    assert len(mail.outbox) == 1  # only the first one
    assert ToolTranscript.objects.filter(ok=False, tool="email.send").count() == 1


@pytest.mark.parametrize("name", ["../releases/x", "base.html", "Release_Notification", "", "a/b"])
def test_email_send__template_name_not_a_plain_name__refused(setup, name):
    call = ToolCall(id="e", tool="email.send", args={"template": name, "to": "a@example.com"})
    result = tool_kernel.execute(call, ToolContext(setup.tenant, user=setup.admin))
    assert result.ok is False
    assert "template" in result.details


@pytest.mark.parametrize("to", ["not-an-address", ["ok@example.com", "bad@"], [], 42, [None]])
def test_email_send__bad_recipients__error_names_to(setup, to):
    result = send(setup, to=to, payload=PAYLOAD, dry_run=False)
    assert result.ok is False
    assert list(result.details) == ["to"]
    assert mail.outbox == []


def test_email_send__payload_not_an_object__error_names_payload(setup):
    result = send(setup, to="a@example.com", payload=["x"])
    assert result.ok is False
    assert list(result.details) == ["payload"]


def test_email_send__duplicate_recipients__sent_once_each(setup):
    result = send(
        setup, to=["a@example.com", "a@example.com", "b@example.com"], payload=PAYLOAD, dry_run=False
    )
    assert mail.outbox[0].to == ["a@example.com", "b@example.com"]
    assert result.data["to"] == ["a@example.com", "b@example.com"]


def test_email_send__markup_in_payload__escaped_in_html_verbatim_in_text(setup):
    result = send(setup, to="a@example.com", payload={**PAYLOAD, "error_message": "<script>x</script> & co"})
    assert "<script>" not in result.data["html"]
    assert "&lt;script&gt;x&lt;/script&gt; &amp; co" in result.data["html"]
    assert "Error: <script>x</script> & co" in result.data["text"]


def test_email_send__payload_names_another_tenant__mail_still_names_the_callers_tenant(setup):
    """An agent of acme cannot send a mail that presents itself as another tenant's: the tenant the
    templates name is the call's, not a payload key."""
    payload = {**PAYLOAD, "tenant": "globex"}
    result = send(setup, to="a@example.com", payload=payload, template="approval_request", dry_run=False)
    assert result.ok is True, result.error
    message = mail.outbox[0]
    assert message.subject.startswith("[releasemgr acme] ")
    assert "globex" not in message.subject + message.body + message.alternatives[0][0]


def test_email_send__approval_link_in_body__transcript_keeps_hashes_not_bodies(setup):
    link = "https://rm.example/approvals/9f8e7d6c5b4a"
    result = send(setup, to="a@example.com", payload={**PAYLOAD, "release_url": link}, dry_run=False)
    assert link in mail.outbox[0].body
    assert link in result.data["html"]
    transcript = ToolTranscript.objects.get()
    assert "9f8e7d6c5b4a" not in str(transcript.result) + str(transcript.args)
    assert set(transcript.result) == {"template", "to", "subject", "sent", "text_sha256", "html_sha256"}
    assert len(transcript.result["text_sha256"]) == 64


def test_render__services_payload__admin_link_and_failure_shown(setup):
    rendered = render(
        "release_notification",
        {
            "release_id": "rel_1",
            "status": "failed",
            "event": "failed",
            "tenant": "acme",
            "from_env": "dev",
            "to_env": "staging",
            "error_message": "schema_drift: the target changed",
            "admin_url": "http://127.0.0.1:8000/admin/releases/release/7/change/",
        },
    )
    assert rendered["subject"] == "[releasemgr acme] Release rel_1 dev -> staging: failed"
    assert "Error: schema_drift: the target changed" in rendered["text"]
    assert "Details: http://127.0.0.1:8000/admin/releases/release/7/change/" in rendered["text"]
    assert 'href="http://127.0.0.1:8000/admin/releases/release/7/change/"' in rendered["html"]
    assert "color:#cf222e" in rendered["html"]


def test_render__post_deploy_mismatch__subject_and_fingerprints(setup):
    rendered = render(
        "release_notification",
        {
            "release_id": "rel_1",
            "status": "promoted",
            "event": "post_deploy_mismatch",
            "post_deploy": {"ok": False, "expected": "a" * 64, "fingerprint": "b" * 64},
        },
    )
    assert rendered["subject"].endswith("post-deployment check failed")
    assert "MISMATCH" in rendered["text"]
    assert "b" * 64 in rendered["text"] and "a" * 64 in rendered["html"]


def test_render__empty_payload__still_renders_one_line_subject():
    rendered = render("release_notification", {})
    assert "\n" not in rendered["subject"]
    assert rendered["subject"] == "[releasemgr] Release (unknown): update"
