"""queue.enqueue: only registered jobs, resolved by task name; the task id is returned."""

from __future__ import annotations

import pytest

from releasemgr.celery import app as celery_app
from releases.models import Release, ReleaseStatus
from tools.handlers import queue_enqueue
from tools.handlers.queue_enqueue import JOBS, Job, register_job, resolve_task, unregister_job
from tools.kernel import ToolCall, ToolContext, run_tool, tool_kernel
from tools.models import ToolTranscript

from .test_tools_support import make_tenant

pytestmark = pytest.mark.django_db

probe_calls: list[dict] = []


@celery_app.task(name="tests.tools_probe_task")
def tools_probe_task(release_pk: int) -> int:
    probe_calls.append({"release_pk": release_pk, "task_id": tools_probe_task.request.id})
    return release_pk


@pytest.fixture(autouse=True)
def eager_celery():
    """Run tasks in-process whatever CELERY_BROKER_URL says (a worker test lives elsewhere)."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    probe_calls.clear()
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def probe_job():
    job = register_job(
        Job(name="tools_probe", task="tests.tools_probe_task", build_kwargs=queue_enqueue._release_kwargs)
    )
    yield job
    unregister_job(job.name)


@pytest.fixture
def setup(sqlite_database_factory):
    return make_tenant("acme", sqlite_database_factory)


@pytest.fixture
def other(sqlite_database_factory):
    return make_tenant("globex", sqlite_database_factory)


def make_release(setup, release_id="rel_20260101_0000", status=ReleaseStatus.PREPARED) -> Release:
    return Release.objects.create(
        tenant=setup.tenant,
        release_id=release_id,
        from_environment=setup.environment("dev"),
        to_environment=setup.environment("staging"),
        bundle={"database": {"changes": []}, "feature_flags": {}},
        bundle_sha256="0" * 64,
        status=status,
    )


@pytest.fixture
def enqueue(django_capture_on_commit_callbacks):
    """Call queue.enqueue as an admin; the test's transaction 'commits' so on_commit sends run."""

    def call(setup, dry_run=False, **args):
        with django_capture_on_commit_callbacks(execute=True):
            return tool_kernel.execute(
                ToolCall(id="job_1", tool="queue.enqueue", args=args),
                ToolContext(setup.tenant, user=setup.admin, dry_run=dry_run),
            )

    return call


def test_queue_enqueue__registered_job__task_runs_with_release_pk_and_id_returned(setup, probe_job, enqueue):
    release = make_release(setup)
    result = enqueue(setup, queue="default", job="tools_probe", payload={"release_id": release.release_id})
    assert result.ok is True, result.error
    assert probe_calls == [{"release_pk": release.pk, "task_id": result.data["task_id"]}]
    assert result.data["task"] == "tests.tools_probe_task"
    assert result.data["kwargs"] == {"release_pk": release.pk}
    assert result.data["enqueued"] is True
    transcript = ToolTranscript.objects.get()
    assert transcript.ok is True
    assert transcript.result["task_id"] == result.data["task_id"]


def test_queue_enqueue__dry_run__nothing_enqueued_plan_returned(setup, probe_job, enqueue):
    release = make_release(setup)
    result = enqueue(setup, dry_run=True, job="tools_probe", payload={"release_pk": release.pk})
    assert result.ok is True, result.error
    assert probe_calls == []
    assert result.data == {
        "job": "tools_probe",
        "task": "tests.tools_probe_task",
        "queue": "default",
        "kwargs": {"release_pk": release.pk},
        "task_id": None,
        "enqueued": False,
    }


def test_queue_enqueue__unknown_job__validation_error_naming_job(setup, enqueue):
    result = enqueue(setup, job="rm_rf", payload={})
    assert result.ok is False
    assert result.error_code == "validation_error"
    assert list(result.details) == ["job"]
    assert "Unknown job 'rm_rf'" in result.error
    assert "post_deployment_task" in result.error
    assert ToolTranscript.objects.get().ok is False


def test_queue_enqueue__unknown_queue__validation_error_naming_queue(setup, probe_job, enqueue):
    result = enqueue(setup, queue="celery-admin", job="tools_probe", payload={"release_pk": 1})
    assert result.ok is False
    assert list(result.details) == ["queue"]


def test_queue_enqueue__job_whose_task_is_not_registered__clear_error(setup, enqueue):
    register_job(Job(name="ghost", task="releases.tasks.no_such_task", build_kwargs=lambda payload, ctx: {}))
    try:
        result = enqueue(setup, job="ghost")
    finally:
        unregister_job("ghost")
    assert result.ok is False
    assert result.error_code == "job_unavailable"
    assert (
        result.error
        == "Job 'ghost' runs task 'releases.tasks.no_such_task', which is not registered with Celery."
    )


def test_queue_enqueue__release_of_another_tenant__not_found_and_not_run(setup, other, probe_job, enqueue):
    foreign = make_release(other)
    for payload in ({"release_pk": foreign.pk}, {"release_id": foreign.release_id}):
        result = enqueue(setup, job="tools_probe", payload=payload)
        assert (result.ok, result.error_code) == (False, "not_found")
    assert probe_calls == []


def test_queue_enqueue__no_release_given__error_names_payload_release_id(setup, probe_job, enqueue):
    result = enqueue(setup, job="tools_probe", payload={})
    assert result.ok is False
    assert list(result.details) == ["payload.release_id"]


def test_queue_enqueue__release_pk_not_a_number__error_names_it(setup, probe_job, enqueue):
    result = enqueue(setup, job="tools_probe", payload={"release_pk": "one"})
    assert list(result.details) == ["payload.release_pk"]


def test_queue_enqueue__inside_a_transaction__sent_only_on_commit(
    setup, probe_job, django_capture_on_commit_callbacks
):
    release = make_release(setup)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        result = run_tool("queue.enqueue", {"job": "tools_probe"}, tenant=setup.tenant, release=release)
    assert result.ok is True, result.error
    assert result.data["sent"] == "on_commit"
    assert probe_calls == []
    assert len(callbacks) == 1
    callbacks[0]()
    assert probe_calls == [{"release_pk": release.pk, "task_id": result.data["task_id"]}]


def test_queue_enqueue__post_deployment_task__registered_and_resolves_to_the_release_task():
    job = JOBS["post_deployment_task"]
    assert job.task == "releases.tasks.post_deployment_task"
    assert resolve_task(job).name == "releases.tasks.post_deployment_task"


def test_queue_enqueue__post_deployment_task_for_release__runs_and_records(setup, enqueue):
    # A prepared (not promoted) release: the real task runs and leaves it untouched.
    release = make_release(setup)
    result = enqueue(
        setup, queue="default", job="post_deployment_task", payload={"release_id": release.release_id}
    )
    assert result.ok is True, result.error
    assert result.data["task"] == "releases.tasks.post_deployment_task"
    release.refresh_from_db()
    assert release.post_deploy_result == {}


# --- a real broker -----------------------------------------------------------------------------------

BROKER_SCRIPT = r"""
import json, os, sys
import django

django.setup()
from django.conf import settings
from releasemgr.celery import app
from tools.handlers.queue_enqueue import Job, handle, register_job
from tools.kernel import ToolCall

assert not app.conf.task_always_eager, "the broker must be real in this process"
queue = sys.argv[1]
settings.TOOL_QUEUES = [queue]


@app.task(name="tests.remote_probe")
def remote_probe(number):
    return number


register_job(Job(name="remote_probe", task="tests.remote_probe", build_kwargs=lambda payload, ctx: {"number": payload["n"]}))
data = handle({"queue": queue, "job": "remote_probe", "payload": {"n": 7}}, None, call=ToolCall("c", "queue.enqueue"), dry_run=False)
print(json.dumps(data))
"""


@pytest.mark.redis
def test_queue_enqueue__redis_broker__message_published_with_the_returned_task_id(redis_url, tmp_path):
    import json
    import os
    import subprocess
    import sys
    import uuid

    import redis
    from django.conf import settings

    queue = f"rm_tools_test_{uuid.uuid4().hex[:10]}"
    script = tmp_path / "enqueue.py"
    script.write_text(BROKER_SCRIPT)
    environment = {
        **os.environ,
        "CELERY_BROKER_URL": redis_url,
        "DJANGO_SETTINGS_MODULE": "releasemgr.settings",
        "PYTHONPATH": str(settings.BASE_DIR),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'control.sqlite3'}",
    }
    client = redis.Redis.from_url(redis_url)
    try:
        completed = subprocess.run(
            [sys.executable, str(script), queue],
            env=environment,
            cwd=settings.BASE_DIR,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr[-2000:]
        data = json.loads(completed.stdout.strip().splitlines()[-1])
        assert data["enqueued"] is True and data["sent"] == "now"
        messages = client.lrange(queue, 0, -1)
        assert len(messages) == 1
        message = json.loads(messages[0])
        assert message["headers"]["id"] == data["task_id"]
        assert message["headers"]["task"] == "tests.remote_probe"
        assert message["properties"]["delivery_info"]["routing_key"] == queue
    finally:
        client.delete(queue)
        client.close()
