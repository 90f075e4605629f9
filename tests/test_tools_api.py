"""POST /api/tools/execute: admin only, dry_run by default, the API's envelope and refusals; the admin."""

from __future__ import annotations

import pytest
from django.core import mail
from rest_framework.test import APIClient

from releases.models import Release
from tools.models import ToolTranscript

from .test_tools_support import make_tenant

pytestmark = pytest.mark.django_db

URL = "/api/tools/execute"
EMAIL_CALL = {
    "id": "email_1",
    "tool": "email.send",
    "args": {
        "template": "release_notification",
        "to": "admin@company.com",
        "payload": {"release_id": "rel_20240115_1200", "status": "promoted"},
    },
}


@pytest.fixture
def setup(sqlite_database_factory):
    return make_tenant("acme", sqlite_database_factory)


@pytest.fixture
def other(sqlite_database_factory):
    return make_tenant("globex", sqlite_database_factory)


def make_release(setup, release_id="rel_20260101_0000") -> Release:
    return Release.objects.create(
        tenant=setup.tenant,
        release_id=release_id,
        from_environment=setup.environment("dev"),
        to_environment=setup.environment("staging"),
        bundle={"database": {"changes": []}, "feature_flags": {}},
        bundle_sha256="0" * 64,
    )


# --- refusals --------------------------------------------------------------------------------------


def test_execute_api__anonymous__401_nothing_recorded(setup):
    response = APIClient().post(URL, EMAIL_CALL, format="json")
    assert response.status_code == 401
    assert response.json()["success"] is False
    assert response.json()["error"]["code"] == "unauthorized"
    assert ToolTranscript.objects.count() == 0
    assert mail.outbox == []


def test_execute_api__token_of_another_tenant__403_nothing_recorded(setup, other):
    client = other.client()
    client.credentials(
        HTTP_AUTHORIZATION=client._credentials["HTTP_AUTHORIZATION"], HTTP_X_TENANT_SLUG=setup.tenant.slug
    )
    response = client.post(URL, EMAIL_CALL, format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert ToolTranscript.objects.count() == 0


@pytest.mark.parametrize("role_user", ["viewer", "approver"])
def test_execute_api__below_admin__403_nothing_recorded(setup, role_user):
    response = setup.client(getattr(setup, role_user)).post(
        URL, {**EMAIL_CALL, "dry_run": False}, format="json"
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"
    assert ToolTranscript.objects.count() == 0
    assert mail.outbox == []


def test_execute_api__release_of_another_tenant__404(setup, other):
    foreign = make_release(other, release_id="rel_20260202_0000")
    response = setup.client().post(URL, {**EMAIL_CALL, "release_id": foreign.release_id}, format="json")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert ToolTranscript.objects.count() == 0


def test_execute_api__unknown_tool__400_with_transcript_id(setup):
    response = setup.client().post(URL, {"id": "x", "tool": "shell.exec", "args": {}}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert "tool" in error["details"]
    transcript = ToolTranscript.objects.get()
    assert error["details"]["transcript_id"] == transcript.transcript_id
    assert transcript.ok is False


def test_execute_api__bad_arguments__400_naming_args_fields(setup):
    body = {"id": "x", "tool": "email.send", "args": {"template": "release_notification", "to": "nope"}}
    response = setup.client().post(URL, body, format="json")
    assert response.status_code == 400
    details = response.json()["error"]["details"]
    assert set(details) == {"args.to", "transcript_id"}
    assert ToolTranscript.objects.get().transcript_id == details["transcript_id"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"args": {}}, "tool"),
        ({"tool": "email.send", "args": "x"}, "args"),
        ({"tool": "email.send", "environment": "qa"}, "environment"),
        ({"tool": "email.send", "dry_run": "maybe"}, "dry_run"),
        # The transcript's arguments could not be stored on PostgreSQL (jsonb has no NUL): a 500.
        ({**EMAIL_CALL, "args": {**EMAIL_CALL["args"], "payload": {"note": "a\x00b"}}}, "args.payload.note"),
    ],
)
def test_execute_api__malformed_body__400_naming_field(setup, body, field):
    response = setup.client().post(URL, body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["details"]
    assert ToolTranscript.objects.count() == 0


def test_execute_api__body_not_json_object__400(setup):
    response = setup.client().post(URL, "[1, 2]", content_type="application/json")
    assert response.status_code == 400
    response = setup.client().post(URL, "{not json", content_type="application/json")
    assert response.status_code == 400
    assert response.json()["success"] is False


def test_execute_api__dry_run_disagreement__400(setup):
    body = {**EMAIL_CALL, "dry_run": True, "args": {**EMAIL_CALL["args"], "dry_run": False}}
    response = setup.client().post(URL, body, format="json")
    assert response.status_code == 400
    assert "dry_run" in response.json()["error"]["details"]
    assert mail.outbox == []


def test_execute_api__db_migrate_apply__403_refused_and_transcribed(setup):
    body = {
        "id": "mig_1",
        "tool": "db.migrate",
        "environment": "staging",
        "dry_run": False,
        "args": {"op": "drop_table", "table": "users"},
    }
    response = setup.client().post(URL, body, format="json")
    assert response.status_code == 403
    error = response.json()["error"]
    assert "release executor" in error["message"]
    transcript = ToolTranscript.objects.get()
    assert error["details"]["transcript_id"] == transcript.transcript_id
    assert (transcript.ok, transcript.error_code, transcript.dry_run) == (False, "forbidden", False)


def test_execute_api__db_migrate_apply_in_args__403(setup):
    body = {
        "tool": "db.migrate",
        "environment": "staging",
        "args": {"op": "drop_table", "table": "users", "dry_run": False},
    }
    response = setup.client().post(URL, body, format="json")
    assert response.status_code == 403


# --- success -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [URL, URL + "/"])
def test_execute_api__admin_default__200_dry_run_nothing_sent(setup, url):
    response = setup.client().post(url, EMAIL_CALL, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["success"] is True
    assert set(body["data"]) == {"ok", "data", "error", "transcript_id"}
    assert body["data"]["ok"] is True
    assert body["data"]["error"] is None
    assert body["data"]["data"]["sent"] is False
    assert mail.outbox == []
    transcript = ToolTranscript.objects.get()
    assert transcript.transcript_id == body["data"]["transcript_id"]
    assert (transcript.dry_run, transcript.call_id, transcript.user_id) == (True, "email_1", setup.admin.pk)


def test_execute_api__admin_dry_run_false__mail_sent(setup):
    response = setup.client().post(URL, {**EMAIL_CALL, "dry_run": False}, format="json")
    assert response.status_code == 200
    assert response.json()["data"]["data"]["sent"] is True
    assert [m.to for m in mail.outbox] == [["admin@company.com"]]


def test_execute_api__guide_body_without_content_type__parsed_as_json(setup):
    import json

    response = setup.client().generic("POST", URL, json.dumps(EMAIL_CALL), content_type="")
    assert response.status_code == 200, response.content


def test_execute_api__for_a_release__transcript_linked(setup):
    release = make_release(setup)
    response = setup.client().post(URL, {**EMAIL_CALL, "release_id": release.release_id}, format="json")
    assert response.status_code == 200
    transcript = ToolTranscript.objects.get()
    assert (transcript.release_id, transcript.environment_id) == (release.pk, release.to_environment_id)


def test_execute_api__handler_failure__200_ok_false(setup):
    body = {"tool": "queue.enqueue", "dry_run": False, "args": {"job": "post_deployment_task"}}
    from tools.handlers.queue_enqueue import Job, register_job, unregister_job

    register_job(Job(name="ghost", task="releases.tasks.no_such_task", build_kwargs=lambda payload, ctx: {}))
    try:
        response = setup.client().post(URL, {**body, "args": {"job": "ghost"}}, format="json")
    finally:
        unregister_job("ghost")
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["ok"] is False
    assert "not registered with Celery" in data["error"]
    assert ToolTranscript.objects.get().transcript_id == data["transcript_id"]


# --- admin --------------------------------------------------------------------------------------------


def test_transcript_admin__release_filter__lists_only_that_release(setup, client):
    from tools.admin import transcripts_url
    from tools.kernel import run_tool

    first, second = make_release(setup), make_release(setup, release_id="rel_20260101_0001")
    for release in (first, second, first):
        run_tool("email.send", EMAIL_CALL["args"], tenant=setup.tenant, release=release, dry_run=True)
    setup.admin.is_superuser = True
    setup.admin.save()
    client.force_login(setup.admin)
    url = transcripts_url(first)
    assert url == f"/admin/tools/tooltranscript/?release__id__exact={first.pk}"
    response = client.get(url)
    assert response.status_code == 200
    shown = {t.transcript_id for t in response.context["cl"].result_list}
    assert shown == set(first.transcripts.values_list("transcript_id", flat=True))
    assert len(shown) == 2


def test_transcript_admin__read_only__no_add_change_delete(setup, admin_client):
    from tools.kernel import run_tool

    result = run_tool("email.send", EMAIL_CALL["args"], tenant=setup.tenant, dry_run=True)
    transcript = ToolTranscript.objects.get(transcript_id=result.transcript_id)
    assert admin_client.get("/admin/tools/tooltranscript/add/").status_code == 403
    change_url = f"/admin/tools/tooltranscript/{transcript.pk}/change/"
    page = admin_client.get(change_url)
    assert page.status_code == 200
    assert b'name="_save"' not in page.content
    assert admin_client.post(change_url, {"tool": "x"}).status_code == 403
    assert (
        admin_client.post(f"/admin/tools/tooltranscript/{transcript.pk}/delete/", {"post": "yes"}).status_code
        == 403
    )
    assert ToolTranscript.objects.get(pk=transcript.pk).tool == "email.send"


def test_transcript_admin__staff_member__sees_only_own_tenants(setup, other, client):
    from tools.kernel import run_tool

    mine = run_tool("email.send", EMAIL_CALL["args"], tenant=setup.tenant, dry_run=True)
    theirs = run_tool("email.send", EMAIL_CALL["args"], tenant=other.tenant, dry_run=True)
    client.force_login(setup.admin)  # staff, member of acme only
    response = client.get("/admin/tools/tooltranscript/")
    assert response.status_code == 200
    shown = {t.transcript_id for t in response.context["cl"].result_list}
    assert shown == {mine.transcript_id}
    foreign = ToolTranscript.objects.get(transcript_id=theirs.transcript_id)
    assert client.get(f"/admin/tools/tooltranscript/{foreign.pk}/change/").status_code in (302, 404)


def test_transcript_admin__staff_without_membership__no_access(client):
    from tenants.services import user_ensure

    stranger = user_ensure(username="stranger")
    client.force_login(stranger)
    assert client.get("/admin/tools/tooltranscript/").status_code == 403


def test_execute_api__same_idempotency_key__tool_runs_once_answer_replayed(setup):
    client = setup.client()
    body = {**EMAIL_CALL, "dry_run": False}
    first = client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="mail-once-1")
    second = client.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="mail-once-1")
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()
    assert second["Idempotent-Replayed"] == "true"
    assert len(mail.outbox) == 1
    assert ToolTranscript.objects.count() == 1
    reused = client.post(URL, {**body, "id": "other"}, format="json", HTTP_IDEMPOTENCY_KEY="mail-once-1")
    assert reused.status_code == 409
    assert len(mail.outbox) == 1


def test_execute_api__over_the_tools_rate__429_rate_limited(setup, settings):
    from django.core.cache import cache

    cache.clear()
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"releases": "100/min", "tools": "2/min"},
    }
    client = setup.client()
    statuses = [client.post(URL, EMAIL_CALL, format="json").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert ToolTranscript.objects.count() == 2
    cache.clear()


def test_release_admin__change_page__links_to_its_filtered_transcripts(setup, admin_client):
    from tools.admin import transcripts_url
    from tools.kernel import run_tool

    release = make_release(setup)
    run_tool("email.send", EMAIL_CALL["args"], tenant=setup.tenant, release=release, dry_run=True)
    page = admin_client.get(f"/admin/releases/release/{release.pk}/change/")
    assert page.status_code == 200
    assert transcripts_url(release).replace("&", "&amp;") in page.content.decode()
    listing = admin_client.get(transcripts_url(release))
    assert [t.release_id for t in listing.context["cl"].result_list] == [release.pk]
