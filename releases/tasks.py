"""Celery tasks: they take ids, and the release's state in the database decides what they do."""

from __future__ import annotations

from celery import shared_task

from . import services


@shared_task(acks_late=True, reject_on_worker_lost=True)
def promote_task(release_pk: int, owner: str, actor_pk: int | None = None) -> None:
    services.promote_execute(release_pk=release_pk, owner=owner, actor_pk=actor_pk)


@shared_task(acks_late=True, reject_on_worker_lost=True)
def rollback_task(release_pk: int, owner: str, actor_pk: int | None = None) -> None:
    services.rollback_execute(release_pk=release_pk, owner=owner, actor_pk=actor_pk)


@shared_task(acks_late=True)
def post_deployment_task(release_pk: int) -> dict:
    return services.post_deployment_check(release_pk=release_pk)


@shared_task
def reconcile_task() -> list[str]:
    return [release.release_id for release in services.reconcile_all()]
