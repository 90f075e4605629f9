"""Celery tasks dispatched by name, so the services never import `releases.tasks` (which imports them).

In-process mode (no broker: CELERY_TASK_ALWAYS_EAGER) runs a task at once, in the caller's
transaction; with a broker it is queued once the caller's transaction commits, so a worker never
starts on rows it cannot see yet.
"""

from __future__ import annotations

import importlib

from celery import Task, current_app
from django.conf import settings
from django.db import transaction

PROMOTE = "releases.tasks.promote_task"
ROLLBACK = "releases.tasks.rollback_task"
NOTIFY = "releases.tasks.notify_task"


def task_named(name: str) -> Task:
    """The registered task `name` ("package.module.function"), importing its module if needed."""
    tasks = current_app.tasks
    if name not in tasks:
        importlib.import_module(name.rpartition(".")[0])
    return tasks[name]


def in_process() -> bool:
    """True when tasks run in this process as they are dispatched (no broker configured)."""
    return bool(settings.CELERY_TASK_ALWAYS_EAGER)


def dispatch(name: str, *args) -> None:
    """Run the task now in-process, or queue it when the current transaction commits."""
    task = task_named(name)
    if in_process():
        task.apply(args=args)
    else:
        transaction.on_commit(lambda: task.delay(*args))
