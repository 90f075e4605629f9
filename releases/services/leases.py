"""The environment lease: one promote or rollback per environment at a time, across processes.

A compare-and-set on the Environment row (owner, expiry), kept alive by a heartbeat thread while
the work runs, plus an advisory lock in the target itself (`target_lock_key`), so two control
databases, or a purge, cannot work on one target at once either.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import Q
from django.utils import timezone

from tenants.models import Environment
from tenants.targets import open_environment

from .. import engine
from ..models import Release

logger = logging.getLogger("releases.services")  # one logger name for operators, as before the split


def lease_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def lease_acquire(environment: Environment, release: Release, owner: str) -> bool:
    """Compare-and-set: take the environment's lease when it is free or expired."""
    now = timezone.now()
    return bool(
        Environment.objects.filter(pk=environment.pk)
        .filter(Q(lock_owner="") | Q(lock_expires_at__lt=now) | Q(lock_expires_at__isnull=True))
        .update(
            lock_owner=owner,
            lock_release=release,
            lock_expires_at=now + timedelta(seconds=settings.RELEASE_LEASE_SECONDS),
        )
    )


def lease_release(environment: Environment, owner: str) -> None:
    Environment.objects.filter(pk=environment.pk, lock_owner=owner).update(
        lock_owner="", lock_release=None, lock_expires_at=None
    )


def lease_extend(environment_pk: int, owner: str) -> bool:
    return bool(
        Environment.objects.filter(pk=environment_pk, lock_owner=owner).update(
            lock_expires_at=timezone.now() + timedelta(seconds=settings.RELEASE_LEASE_SECONDS)
        )
    )


def lease_acquire_for_task(environment: Environment, release: Release, owner: str) -> bool:
    """The task runs under the lease its request took; a redelivery after expiry takes it again."""
    if Environment.objects.filter(pk=environment.pk, lock_owner=owner).exists():
        return lease_extend(environment.pk, owner)
    return lease_acquire(environment, release, owner)


def lease_is_live(environment: Environment, *, at: datetime) -> bool:
    """Does a lease that has not expired at `at` cover the environment?"""
    environment.refresh_from_db()
    return bool(environment.lock_owner and environment.lock_expires_at and environment.lock_expires_at > at)


def lease_clear_expired(environment: Environment, *, before: datetime) -> None:
    """Clear the environment's lease if it had expired by `before` (its holder is gone)."""
    Environment.objects.filter(pk=environment.pk, lock_expires_at__lt=before).update(
        lock_owner="", lock_release=None, lock_expires_at=None
    )


class Heartbeat:
    """Keeps the lease alive while a long promote or rollback runs in this process."""

    def __init__(self, environment_pk: int, owner: str) -> None:
        self.environment_pk = environment_pk
        self.owner = owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="release-lease-heartbeat")

    def _run(self) -> None:
        interval = max(1.0, settings.RELEASE_LEASE_SECONDS / 3)
        try:
            while not self._stop.wait(interval):
                try:
                    lease_extend(self.environment_pk, self.owner)
                except Exception:  # the next beat retries; the lease outlives one missed beat
                    logger.warning("lease heartbeat failed", exc_info=True)
                    connection.close()  # a lost connection would fail every later beat: reconnect
        finally:
            connection.close()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def target_lock_key(environment: Environment) -> str:
    """The advisory lock every writer of the environment's target takes (promote, rollback, purge)."""
    return f"releasemgr:{environment.tenant.slug}:{environment.stage}"


@contextlib.contextmanager
def target_session(environment: Environment, owner: str) -> Iterator[tuple[Any, bool]]:
    """Keep the lease alive, open the target with the apply lock timeout and try its release lock."""
    with (
        Heartbeat(environment.pk, owner),
        open_environment(environment, lock_timeout_ms=environment.apply_lock_timeout_ms) as target,
        engine.target_lock(target, target_lock_key(environment)) as locked,
    ):
        yield target, locked
