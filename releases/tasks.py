"""Celery tasks: they take ids, and the release's state in the database decides what they do.

Every task runs with `request_id` set to `celery:<pid>:<task id>`, so the audit events it writes
say which worker process and which task wrote them (in-process eager runs say so too, with the
web process's pid).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from celery import shared_task

from releasemgr.context import request_id_var

from . import services


@contextlib.contextmanager
def _task_context(task) -> Iterator[None]:
    task_id = getattr(task.request, "id", None) or "local"
    token = request_id_var.set(f"celery:{os.getpid()}:{task_id}"[:64])
    try:
        yield
    finally:
        request_id_var.reset(token)


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True)
def promote_task(self, release_pk: int, owner: str, actor_pk: int | None = None) -> None:
    with _task_context(self):
        services.promote_execute(release_pk=release_pk, owner=owner, actor_pk=actor_pk)


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True)
def rollback_task(self, release_pk: int, owner: str, actor_pk: int | None = None) -> None:
    with _task_context(self):
        services.rollback_execute(release_pk=release_pk, owner=owner, actor_pk=actor_pk)


@shared_task(bind=True, acks_late=True)
def post_deployment_task(self, release_pk: int) -> dict:
    with _task_context(self):
        return services.post_deployment_check(release_pk=release_pk)


@shared_task(bind=True)
def reconcile_task(self) -> list[str]:
    with _task_context(self):
        return [release.release_id for release in services.reconcile_all()]


# Mail is sent at most once (acks early): a lost worker may lose a notification, never repeat one.
# The approval request is also safe to run twice (approvers who already have a link are skipped).
@shared_task(bind=True)
def notify_task(self, release_pk: int, event: str) -> list[str]:
    from . import notifications
    from .models import Release

    with _task_context(self):
        release = (
            Release.objects.select_related("tenant", "to_environment", "from_environment", "created_by")
            .filter(pk=release_pk)
            .first()
        )
        if release is None:
            return []
        return notifications.release_notify(release=release, event=event)
