"""What follows a settled release: notifications, the post-deployment check, log fields.

Side effects never turn a settled release into an error: they are queued after the commit and
their failures are logged.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

from tools.kernel import run_tool

from ..models import Release
from .dispatch import NOTIFY, task_named

logger = logging.getLogger("releases.services")  # one logger name for operators, as before the split


def notify(release: Release, event: str) -> None:
    """Queue the notification task once the current transaction commits (at once outside one).

    The task mails through the tool kernel (transcripts); in eager mode it runs in-process. A
    notification must never turn a settled release into an error, so failures are only logged.
    """
    release_pk = release.pk

    def send() -> None:
        try:
            task_named(NOTIFY).delay(release_pk, event)
        except Exception:
            logger.exception("notification %s for release pk %s could not be queued", event, release_pk)

    transaction.on_commit(send)


def enqueue_post_deployment(release: Release) -> None:
    run_tool(
        "queue.enqueue",
        {"queue": "default", "job": "post_deployment_task", "payload": {"release_pk": release.pk}},
        tenant=release.tenant,
        environment=release.to_environment,
        release=release,
        dry_run=False,
        executor=True,
    )


def metric_labels(release: Release) -> dict[str, str]:
    return {"tenant": release.tenant.slug, "environment": release.to_environment.stage}


def log_extra(release: Release, **fields: Any) -> dict[str, Any]:
    """The fields a release's log lines carry (see releasemgr.logging.JsonFormatter)."""
    return {
        "release_id": release.release_id,
        "tenant": release.tenant.slug,
        "environment": release.to_environment.stage,
        "status": release.status,
        **fields,
    }
