"""The release services do their side effects through the tool kernel: the manifest lists them in order."""

from __future__ import annotations

import pytest
from django.core import mail

from releasemgr.celery import app as celery_app
from releases.models import Release
from tools.models import ToolTranscript
from tools.selectors import transcript_ids_for_release

from .test_tools_support import make_tenant, target_state

pytestmark = pytest.mark.django_db

BUNDLE = {
    "database": {
        "changes": [
            {"type": "create_table", "table": "new_feature", "columns": [{"name": "name", "type": "text"}]},
        ]
    }
}


@pytest.fixture(autouse=True)
def eager_celery():
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def test_release_flow__prepare_and_promote__manifest_lists_every_tool_call_in_order(
    database_factory, django_capture_on_commit_callbacks
):
    setup = make_tenant("acme", database_factory)
    setup.approver.email = "approver@example.com"
    setup.approver.save(update_fields=["email"])
    client = setup.client()

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/api/releases/prepare",
            {"from_env": "dev", "to_env": "staging", "bundle_data": BUNDLE},
            format="json",
        )
    assert response.status_code == 201, response.content
    release_id = response.json()["data"]["release_id"]
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/api/releases/promote", {"release_id": release_id}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == "promoted"
    assert "new_feature" in target_state(setup.urls["staging"])[0]["tables"]

    release = Release.objects.get(tenant=setup.tenant, release_id=release_id)
    transcripts = list(ToolTranscript.objects.filter(release=release).order_by("created_at", "id"))
    manifest = client.get(f"/api/releases/{release_id}").json()["data"]

    # The manifest's ids are the release's calls, in the order they were made.
    assert manifest["tools_transcript_ids"] == [t.transcript_id for t in transcripts]
    assert manifest["tools_transcript_ids"] == transcript_ids_for_release(release)
    assert all(t.ok for t in transcripts), [(t.tool, t.error) for t in transcripts]
    assert all(t.dry_run is False for t in transcripts)
    tools = [t.tool for t in transcripts]
    # prepare notifies approvers, promote notifies admins and queues the post-deployment check
    assert tools.count("email.send") >= 2
    assert "queue.enqueue" in tools
    enqueue = next(t for t in transcripts if t.tool == "queue.enqueue")
    assert enqueue.args["job"] == "post_deployment_task"
    assert enqueue.result["kwargs"] == {"release_pk": release.pk}
    # every mail sent has its transcript, and the eager post-deployment task ran
    sent = [t for t in transcripts if t.tool == "email.send" and t.result["sent"]]
    assert len(sent) == len(mail.outbox)
    assert sorted(tuple(t.result["to"]) for t in sent) == sorted(tuple(m.to) for m in mail.outbox)
    release.refresh_from_db()
    assert release.post_deploy_result.get("ok") is True
