"""Reconciliation: settle releases a dead worker left in flight, from the target's `_rm_history`.

The target decides: a promotion whose transaction is in the target's history is promoted, one
that is not failed; likewise for rollbacks. A release is only touched when no live lease covers
it and the target's release lock is free, so a running promotion is never disturbed.
"""

from __future__ import annotations

from django.utils import timezone

from releasemgr.core.errors import ErrorCode
from tenants.models import Environment
from tenants.targets import open_environment

from .. import engine
from ..models import Release, ReleaseStatus
from ..recorded import last_direction
from .leases import lease_clear_expired, lease_is_live, target_lock_key
from .transitions import (
    IN_FLIGHT,
    settle_failed,
    settle_promoted,
    settle_rollback_refused,
    settle_rolled_back,
)


def release_reconcile(*, environment: Environment) -> list[Release]:
    """Settle the environment's releases left promoting/rolling_back by a worker that died."""
    now = timezone.now()
    stuck = list(
        Release.objects.filter(to_environment=environment, status__in=IN_FLIGHT).select_related(
            "tenant", "to_environment__tenant", "from_environment"
        )
    )
    if not stuck or lease_is_live(environment, at=now):
        return []
    with open_environment(environment) as target:
        with engine.target_lock(target, target_lock_key(environment)) as locked:
            if not locked:
                return []
            history = engine.history(target)
            native = engine.native_fingerprint(target)
            for release in stuck:
                _settle_from_history(release, last_direction(history, release), native)
    lease_clear_expired(environment, before=now)
    return stuck


def _settle_from_history(release: Release, last: str | None, native: str) -> None:
    if release.status == ReleaseStatus.PROMOTING:
        if last == "forward":
            settle_promoted(release, native_after=native, actor=None)
            return
        state = "at its pre-state" if native == release.native_fingerprint_before else "changed"
        settle_failed(
            release,
            code=ErrorCode.WORKER_LOST,
            message=f"The worker running this promotion stopped; nothing was committed (target {state}).",
            actor=None,
        )
    elif last == "rollback":
        settle_rolled_back(release, actor=None)
    else:
        settle_rollback_refused(
            release,
            code=ErrorCode.WORKER_LOST,
            message="The worker running this rollback stopped; nothing was committed.",
            actor=None,
        )


def reconcile_all() -> list[Release]:
    """Reconcile every environment that has a release in flight (the beat schedule runs this)."""
    settled = []
    ids = Release.objects.filter(status__in=IN_FLIGHT).values_list("to_environment_id", flat=True).distinct()
    for environment in Environment.objects.filter(pk__in=list(ids)).select_related("tenant"):
        settled.extend(release_reconcile(environment=environment))
    return settled
