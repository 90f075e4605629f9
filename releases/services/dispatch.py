"""Celery tasks dispatched by name, so the services never import `releases.tasks` (which imports them).

In-process mode (no broker: CELERY_TASK_ALWAYS_EAGER) runs a task at once, in the caller's
transaction; with a broker it is queued once the caller's transaction commits, so a worker never
starts on rows it cannot see yet.

A broker that cannot be reached is a refusal, not a crash: publishing is bounded by
BROKER_TIMEOUT_SECONDS (settings), the caller's `on_unavailable` undoes what it did for the task
(promote and rollback put the release back and free the lease), and the request answers 503
`broker_unavailable`. Nothing was queued, so no worker will ever run it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from celery import Task, current_app
from django.conf import settings
from django.db import transaction
from kombu.exceptions import OperationalError

from releasemgr.core.errors import ApplicationError, ErrorCode

PROMOTE = "releases.tasks.promote_task"
ROLLBACK = "releases.tasks.rollback_task"
NOTIFY = "releases.tasks.notify_task"

# What publishing raises when the broker cannot be reached: Celery re-raises the transport's
# connection errors as kombu's OperationalError; a socket error that escapes it is an OSError.
PUBLISH_ERRORS = (OperationalError, OSError)


class BrokerUnavailable(ApplicationError):
    """`broker_unavailable` (the API answers 503): the task could not be queued; nothing was started."""

    code = ErrorCode.BROKER_UNAVAILABLE


def task_named(name: str) -> Task:
    """The registered task `name` ("package.module.function"), importing its module if needed."""
    tasks = current_app.tasks
    if name not in tasks:
        importlib.import_module(name.rpartition(".")[0])
    return tasks[name]


def in_process() -> bool:
    """True when tasks run in this process as they are dispatched (no broker configured)."""
    return bool(settings.CELERY_TASK_ALWAYS_EAGER)


def dispatch(name: str, *args, on_unavailable: Callable[[Exception], object] | None = None) -> None:
    """Run the task now in-process, or queue it when the current transaction commits.

    When the broker cannot be reached, `on_unavailable(exc)` runs (after the commit, outside any
    transaction of the caller's) and BrokerUnavailable is raised: at once outside a transaction,
    else from the commit of the outermost one.
    """
    task = task_named(name)
    if in_process():
        task.apply(args=args)
        return

    def publish() -> None:
        try:
            task.apply_async(args=args)
        except PUBLISH_ERRORS as exc:
            if on_unavailable is not None:
                on_unavailable(exc)
            raise BrokerUnavailable(
                "The task queue (broker) cannot be reached, so nothing was started; try again later.",
                details={"task": name.rpartition(".")[2]},
            ) from None

    transaction.on_commit(publish)
