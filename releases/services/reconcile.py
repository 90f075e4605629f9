"""Reconciliation: settle releases from the target's `_rm_history`, where the control database says otherwise.

The target decides, as Flyway's schema history does. A promotion whose transaction is in the
target's history is promoted, one that is not failed; likewise for rollbacks. That settles the
releases a dead worker left in flight, and corrects settled ones the control database got wrong
(its connection lost while the target committed, by a version without the retry of
`control_db`): a `failed` release whose apply the history shows as its last transaction becomes
`promoted` (flags set, notified, checked after; `promoted_at` is when the target committed it), a
`promoted` release whose last transaction is its rollback becomes `rolled_back` (flags put back).
Each correction is audited as `release.reconciled` with the status before and after. History rows
match a release by primary key, release id and bundle hash, so a control database rebuilt with
reused keys never claims another's rows. A release is only touched when no live lease covers its
environment and the target's release lock is free, so a running promotion is never disturbed.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db.models import Q
from django.utils import timezone

from releasemgr.core.errors import ErrorCode
from tenants.models import Environment
from tenants.targets import open_environment

from .. import engine
from ..models import Release, ReleaseStatus
from ..recorded import last_direction
from ..selectors import live_release
from .leases import lease_clear_expired, lease_is_live, target_lock_key
from .transitions import (
    IN_FLIGHT,
    settle_failed,
    settle_promoted,
    settle_rollback_refused,
    settle_rolled_back,
)

logger = logging.getLogger("releases.services")  # one logger name for operators

# A failed release with one of these codes never reached COMMIT on its target (failed at prepare,
# drift found before any statement, rolled back by the post-validation, no backup, lock held by
# another session): its history is not read again.
FAILED_BEFORE_COMMIT = (
    ErrorCode.DRY_RUN_FAILED,
    ErrorCode.SCHEMA_DRIFT,
    ErrorCode.POST_VALIDATION_FAILED,
    ErrorCode.BACKUP_FAILED,
    ErrorCode.ENVIRONMENT_BUSY,
    ErrorCode.TARGET_REFUSED,
)
# A promoted release whose rollback was refused with one of these codes: the rollback never started
# (or was rolled back whole), so the target's history is not read again.
ROLLBACK_REFUSED_BEFORE_COMMIT = (
    ErrorCode.SCHEMA_DRIFT,
    ErrorCode.ROLLBACK_BLOCKED,
    ErrorCode.POST_VALIDATION_FAILED,
    ErrorCode.ENVIRONMENT_BUSY,
    ErrorCode.TARGET_REFUSED,
    ErrorCode.BROKER_UNAVAILABLE,
)


def _suspects() -> Q:
    """Settled releases the control database may have recorded wrongly: failed during a promotion
    that may have committed, or promoted with a refused rollback that may have committed."""
    failed = Q(status=ReleaseStatus.FAILED, failed_at__isnull=False) & ~Q(error_code__in=FAILED_BEFORE_COMMIT)
    promoted = (
        Q(status=ReleaseStatus.PROMOTED)
        & ~Q(error_code="")
        & ~Q(error_code__in=ROLLBACK_REFUSED_BEFORE_COMMIT)
    )
    return failed | promoted


def release_reconcile(*, environment: Environment) -> list[Release]:
    """Settle the environment's releases left in flight by a dead worker, and correct settled ones
    its target's `_rm_history` contradicts; returns the releases it looked at."""
    now = timezone.now()
    related = ("tenant", "to_environment__tenant", "from_environment")
    stuck = list(
        Release.objects.filter(to_environment=environment, status__in=IN_FLIGHT).select_related(*related)
    )
    suspects = list(
        Release.objects.filter(_suspects(), to_environment=environment)
        .select_related(*related)
        .order_by("created_at", "id")
    )
    if not (stuck or suspects) or lease_is_live(environment, at=now):
        return []
    try:
        with open_environment(environment) as target:
            with engine.target_lock(target, target_lock_key(environment)) as locked:
                if not locked:
                    return []
                history = engine.history(target)
                native = engine.native_fingerprint(target)
                for release in stuck:
                    _settle_from_history(release, last_direction(history, release), native)
                corrected = _correct_from_history(environment, target, suspects, history, native)
    except engine.TargetError as exc:
        if stuck:
            raise  # a release in flight cannot be settled without its target: say why
        # Only settled releases to re-check: they wait for the next pass; the caller goes on.
        logger.warning(
            "reconcile of %s skipped: its target cannot be read (%s)",
            environment,
            exc.code,
            extra={"error_code": exc.code},
        )
        return []
    lease_clear_expired(environment, before=now)
    return stuck + corrected


def _key(row_or_release: Any) -> tuple:
    if isinstance(row_or_release, Release):
        return (row_or_release.pk, row_or_release.release_id, row_or_release.bundle_sha256)
    return (row_or_release["release_pk"], row_or_release["release_id"], row_or_release["bundle_sha256"])


def _correct_from_history(
    environment: Environment, target: Any, suspects: list[Release], history: list[dict], native: str
) -> list[Release]:
    """Move settled releases to what the target's history says (see the module docstring)."""
    last: dict[tuple, tuple[int, dict]] = {_key(row): (index, row) for index, row in enumerate(history)}
    applied = [entry for entry in last.values() if entry[1]["direction"] == "forward"]
    top = max(applied, key=lambda entry: entry[0])[0] if applied else None
    corrected = []
    for release in suspects:
        index, row = last.get(_key(release), (None, None))
        if row is None:
            continue
        correction = {"direction": row["direction"], "applied_at": row["applied_at"]}
        if release.status == ReleaseStatus.FAILED and row["direction"] == "forward":
            # The catalog is this release's after-state only if nothing applied since is still applied.
            correction.update(
                reason="the target's history shows the promotion committed", native_after_known=index == top
            )
            settle_promoted(release, native_after=native, actor=None, correction=correction)
            corrected.append(release)
        elif release.status == ReleaseStatus.PROMOTED and row["direction"] == "rollback":
            correction.update(reason="the target's history shows the rollback committed")
            settle_rolled_back(release, actor=None, correction=correction)
            rebase_live_release(
                environment,
                _Fingerprints(engine.fingerprint(engine.introspect(target)), native),
            )
            corrected.append(release)
    return corrected


class _Fingerprints:
    def __init__(self, fingerprint_after: str, native_fingerprint_after: str) -> None:
        self.fingerprint_after = fingerprint_after
        self.native_fingerprint_after = native_fingerprint_after


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
    """Reconcile every environment with a release in flight or a settled one to re-check (the beat
    schedule runs this)."""
    settled = []
    ids = (
        Release.objects.filter(Q(status__in=IN_FLIGHT) | _suspects())
        .values_list("to_environment_id", flat=True)
        .distinct()
    )
    for environment in Environment.objects.filter(pk__in=list(ids)).select_related("tenant"):
        try:
            settled.extend(release_reconcile(environment=environment))
        except engine.TargetError as exc:  # one unreadable target must not stop the others
            logger.warning(
                "reconcile of %s failed: %s", environment, exc.code, extra={"error_code": exc.code}
            )
    return settled


def rebase_live_release(environment: Environment, result: Any) -> None:
    """After a verified rollback, the release now live is the drift baseline again, as the catalog is now.

    The rollback restores its portable schema, not the catalog byte for byte (a re-added column goes
    last, a SQLite rebuild rewrites the table's SQL), so without this rolling that release back next
    would be refused as drift. Only when the portable schema is exactly its after-state.
    `result` has the rollback's `fingerprint_after` and `native_fingerprint_after`.
    """
    live = live_release(environment=environment)
    if live is not None and live.fingerprint_after == result.fingerprint_after:
        Release.objects.filter(pk=live.pk, status=ReleaseStatus.PROMOTED).update(
            native_fingerprint_after=result.native_fingerprint_after
        )
