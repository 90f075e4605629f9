"""queue.enqueue: put a registered job on a Celery queue; an unknown job is an error.

A job maps a name to a Celery task path and says how its payload becomes the task's keyword
arguments. The task is resolved by name when the call runs (`celery_app.tasks`), so a job whose
task is missing fails with a clear message instead of an import error at start-up. The task is
sent when the surrounding transaction commits (a worker must see the rows it is given); its id is
chosen up front so the call can return it.
"""

from __future__ import annotations

import contextlib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.utils import uuid as celery_uuid
from django.conf import settings
from django.db import transaction
from rest_framework import serializers

from releasemgr.core.errors import ErrorCode

from ..errors import ToolFailure, ToolNotFound, ToolValidationError

if TYPE_CHECKING:
    from ..kernel import ToolCall, ToolContext

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class Job:
    """A job agents may enqueue: the task it runs and how its payload becomes keyword arguments."""

    name: str
    task: str
    build_kwargs: Callable[[dict[str, Any], ToolContext], dict[str, Any]]
    description: str = ""


def _release_kwargs(payload: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    """`release_id` (rel_...) or `release_pk` of the tenant's own release, else the context's release."""
    from releases.models import Release

    releases = Release.objects.filter(tenant=ctx.tenant)
    if payload.get("release_pk") not in (None, ""):
        try:
            release_pk = int(payload["release_pk"])
        except (TypeError, ValueError):
            raise ToolValidationError(
                "payload.release_pk must be an integer.",
                details={"payload.release_pk": ["Must be an integer."]},
            )
        release = releases.filter(pk=release_pk).first()
    elif payload.get("release_id") not in (None, ""):
        release = releases.filter(release_id=str(payload["release_id"])).first()
    elif ctx.release is not None:
        release = ctx.release if ctx.release.tenant_id == ctx.tenant.pk else None
    else:
        raise ToolValidationError(
            "payload needs release_id (or release_pk), or the call must be made for a release.",
            details={"payload.release_id": ["This field is required."]},
        )
    if release is None:
        raise ToolNotFound("No such release in this tenant.", details={"payload.release_id": ["Not found."]})
    return {"release_pk": release.pk}


JOBS: dict[str, Job] = {}


def register_job(job: Job) -> Job:
    JOBS[job.name] = job
    return job


def unregister_job(name: str) -> None:
    JOBS.pop(name, None)


register_job(
    Job(
        name="post_deployment_task",
        task="releases.tasks.post_deployment_task",
        build_kwargs=_release_kwargs,
        description="Check the target's schema against the release's expected fingerprint; notify on mismatch.",
    )
)


def allowed_queues() -> list[str]:
    default = getattr(settings, "CELERY_TASK_DEFAULT_QUEUE", "default") or "default"
    extra = list(getattr(settings, "TOOL_QUEUES", []))
    return sorted({default, *extra})


class QueueEnqueueArgs(serializers.Serializer):
    queue = serializers.CharField(max_length=64, required=False, default="default")
    job = serializers.CharField(max_length=100)
    payload = serializers.DictField(required=False, default=dict)
    dry_run = serializers.BooleanField(required=False)

    def validate_queue(self, value: str) -> str:
        queues = allowed_queues()
        if not QUEUE_NAME.match(value) or value not in queues:
            raise serializers.ValidationError(f"Unknown queue {value!r}; queues: {', '.join(queues)}.")
        return value

    def validate_job(self, value: str) -> str:
        if value not in JOBS:
            raise serializers.ValidationError(
                f"Unknown job {value!r}; registered jobs: {', '.join(sorted(JOBS)) or 'none'}."
            )
        return value


def resolve_task(job: Job) -> Any:
    """The Celery task of `job`, looked up by name in the app's registry.

    Celery imports autodiscovered task modules only when a worker starts, so in a web process
    the job's module (from our own registry, never from the caller) is imported on first use.
    """
    from releasemgr.celery import app

    if job.task not in app.tasks:
        module_name = job.task.rpartition(".")[0]
        with contextlib.suppress(ImportError):  # reported below as the task not being registered
            importlib.import_module(module_name)
    try:
        return app.tasks[job.task]
    except KeyError:
        raise ToolFailure(
            f"Job {job.name!r} runs task {job.task!r}, which is not registered with Celery.",
            code=ErrorCode.JOB_UNAVAILABLE,
        )


def handle(args: dict[str, Any], ctx: ToolContext, *, call: ToolCall, dry_run: bool) -> dict[str, Any]:
    job = JOBS[args["job"]]
    task = resolve_task(job)
    kwargs = job.build_kwargs(args["payload"], ctx)
    result: dict[str, Any] = {"job": job.name, "task": task.name, "queue": args["queue"], "kwargs": kwargs}
    if dry_run:
        return {**result, "task_id": None, "enqueued": False}
    task_id = celery_uuid()

    def send() -> Any:
        return task.apply_async(kwargs=kwargs, queue=args["queue"], task_id=task_id)

    connection = transaction.get_connection()
    if connection.in_atomic_block:
        # Sent after commit; a broker failure then is logged by Django, the commit stands.
        transaction.on_commit(send, robust=True)
        return {**result, "task_id": task_id, "enqueued": True, "sent": "on_commit"}
    async_result = send()  # a broker failure here fails the call
    return {**result, "task_id": async_result.id, "enqueued": True, "sent": "now"}
