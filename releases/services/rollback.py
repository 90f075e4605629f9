"""Rollback: the latest live release of an environment goes back, its data restored, its flags put back.

A failed release is settled instead ("rollback failed migration" in the guide): nothing runs, the
target must be at the release's pre-state.
"""

from __future__ import annotations

import logging

from django.contrib.auth.models import AbstractBaseUser

from releasemgr.core.errors import Conflict, ErrorCode
from tenants.models import Environment, Tenant
from tenants.targets import open_environment

from .. import engine
from ..models import Release, ReleaseStatus
from ..recorded import approved_changes, history_has
from ..selectors import live_release
from .dispatch import ROLLBACK
from .leases import target_session
from .outcomes import TargetOutcome, outcome_of_failure, run_then_settle, target_history_last
from .reconcile import rebase_live_release, release_reconcile
from .transitions import (
    begin_and_dispatch,
    settle_rollback_refused,
    settle_rolled_back,
    wait_for,
)

logger = logging.getLogger("releases.services")  # one logger name for operators, as before the split


def release_rollback(
    *, release: Release, user: AbstractBaseUser, wait_seconds: float | None = None
) -> Release:
    """Roll back the latest live release of its environment (or settle a failed one)."""
    if release.status == ReleaseStatus.FAILED:
        return rollback_failed(release, user)
    if release.status != ReleaseStatus.PROMOTED:
        raise Conflict(
            f"Release {release.release_id} is {release.status}; only a promoted or failed release can be rolled back.",
            details={"status": release.status},
        )
    live = live_release(environment=release.to_environment)
    if live is not None and live.pk != release.pk:
        raise Conflict(
            f"Roll back {live.release_id} first: it is the latest live release on {release.to_env}.",
            details={"release_id": live.release_id},
        )
    purged = list(
        release.preservations.filter(purged_at__isnull=False).values_list("preserved_table", flat=True)
    )
    if purged:
        raise Conflict(
            "The data this rollback would restore has been purged; it cannot be rolled back.",
            code=ErrorCode.ROLLBACK_BLOCKED,
            details={"purged": purged},
        )
    release_reconcile(environment=release.to_environment)

    begin_and_dispatch(
        release,
        task=ROLLBACK,
        status_from=ReleaseStatus.PROMOTED,
        status_to=ReleaseStatus.ROLLING_BACK,
        user=user,
        phase="rollback",
        work="rollback",
    )
    release = wait_for(release, statuses=[ReleaseStatus.ROLLING_BACK], wait_seconds=wait_seconds)
    # The rollback was refused (drift, blocked, locked): its code, whether the task ran in this process
    # or on a worker we waited for.
    if release.status == ReleaseStatus.PROMOTED and release.error_code:
        raise Conflict(
            release.error_message,
            code=ErrorCode.of(release.error_code, ErrorCode.CONFLICT),
            details={"release_id": release.release_id},
        )
    return release


def rollback_execute(*, release_pk: int, owner: str, actor_pk: int | None = None) -> None:
    """The rollback itself (run by the Celery task): rollback SQL in reverse, data restored, flags back.

    As for the promotion, the work on the target and the settle are separate: a rollback the
    target committed is recorded `rolled_back` even if the control-database connection was lost
    meanwhile (`control_db_retry` reconnects), and an outcome this process could not observe is
    read back from the target's history.
    """
    run_then_settle(
        release_pk,
        owner,
        actor_pk,
        in_flight=ReleaseStatus.ROLLING_BACK,
        phase="rollback",
        on_target=rollback_on_target,
        settle=rollback_settle,
    )


def rollback_on_target(release: Release, environment: Environment, owner: str) -> TargetOutcome:
    """Under the lease and the target's release lock: run the rollback, or find it already run."""
    result: engine.ApplyResult | None = None
    found = False
    started_apply = False
    try:
        with target_session(environment, owner) as (target, locked):
            if not locked:
                raise engine.EngineError(
                    ErrorCode.ENVIRONMENT_BUSY, "Another session holds the target's release lock."
                )
            if history_has(target, release, "rollback"):
                found = True
            else:
                changes = approved_changes(release)
                started_apply = True
                result = engine.rollback(
                    target,
                    release_pk=release.pk,
                    release_id=release.release_id,
                    bundle_sha256=release.bundle_sha256,
                    changes=changes,
                    expected_native_after=release.native_fingerprint_after,
                    expected_fingerprint_before=release.fingerprint_before,
                    lock_timeout_ms=environment.apply_lock_timeout_ms,
                    lock_retries=environment.apply_lock_retries,
                    statement_timeout_ms=environment.apply_statement_timeout_ms,
                )
    except Exception as exc:
        if result is None and not found:
            if not isinstance(exc, (engine.EngineError, engine.TargetError)):
                logger.exception("rollback of %s failed unexpectedly", release.release_id)
            return outcome_of_failure(exc, started_apply=started_apply)
        logger.warning(
            "rollback of %s committed; closing the target session failed: %s",
            release.release_id,
            type(exc).__name__,
        )
    return TargetOutcome(result=result, native_after="found" if found else "")


def rollback_settle(
    release: Release, environment: Environment, outcome: TargetOutcome, *, actor: AbstractBaseUser | None
) -> None:
    """Record what the target did; safe to run again (every settle is a conditional move)."""
    if outcome.result is not None:
        settle_rolled_back(release, actor=actor, preservations=outcome.result.preservations)
        rebase_live_release(environment, outcome.result)
    elif outcome.native_after:
        settle_rolled_back(release, actor=actor)
    else:
        found = target_history_last(environment, release) if outcome.ambiguous else None
        if found is not None and found[0] == "rollback":
            logger.warning(
                "rollback of %s raised %s, but the target's history shows it committed",
                release.release_id,
                outcome.code,
            )
            settle_rolled_back(release, actor=actor)
        else:
            settle_rollback_refused(release, code=outcome.code, message=outcome.message, actor=actor)


def rollback_failed(release: Release, user: AbstractBaseUser) -> Release:
    """The guide's "rollback failed migration": verify the target is at its pre-state, restore flags.

    The target's history is read first: a release recorded `failed` whose promotion in fact
    committed is corrected to `promoted` (release_reconcile), and the caller is told so (409) rather
    than "schema_drift"; rolling it back again then runs its rollback."""
    environment = release.to_environment
    release_reconcile(environment=environment)
    release.refresh_from_db()
    if release.status != ReleaseStatus.FAILED:
        raise Conflict(
            f"The target's history shows that release {release.release_id} was promoted; it is now "
            f"recorded as {release.status}. Roll it back again to undo it.",
            details={"status": release.status},
        )
    if release.native_fingerprint_before:
        with open_environment(environment) as target:
            current = engine.native_fingerprint(target)
        if current != release.native_fingerprint_before:
            raise Conflict(
                "The target is not at the schema it had before this release; inspect it before settling.",
                code=ErrorCode.SCHEMA_DRIFT,
                details={"expected": release.native_fingerprint_before, "found": current},
            )
    settle_rolled_back(release, actor=user)
    release.refresh_from_db()
    return release


def release_rollback_to(*, tenant: Tenant, release: Release, user: AbstractBaseUser) -> list[Release]:
    """Roll back every release promoted on the environment after `release`, newest first, then it."""
    newer = list(
        Release.objects.filter(
            tenant=tenant,
            to_environment=release.to_environment,
            status=ReleaseStatus.PROMOTED,
            promoted_at__gte=release.promoted_at,
        )
        .exclude(pk=release.pk)
        .order_by("-promoted_at", "-id")
    )
    done = []
    for item in [*newer, release]:
        result = release_rollback(release=item, user=user, wait_seconds=3600)
        done.append(result)
        if result.status != ReleaseStatus.ROLLED_BACK:
            break
    return done
