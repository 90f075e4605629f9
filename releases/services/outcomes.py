"""What a promote or rollback did on its target, kept apart from recording it in the control database.

The work on the target ends in a `TargetOutcome`; the settle that records it can then be run again
after a lost control-database connection. An outcome this process could not observe (an error
during or after COMMIT) is `ambiguous`, and the target's `_rm_history` decides it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

from releasemgr.core.errors import ErrorCode
from releasemgr.core.scrub import scrub
from tenants.models import Environment
from tenants.targets import open_environment

from .. import engine, metrics
from ..models import Release
from ..recorded import last_direction
from .control_db import CONTROL_DB_ERRORS, control_db_retry
from .leases import lease_acquire_for_task, lease_release
from .side_effects import metric_labels
from .transitions import actor_of, release_for_task

logger = logging.getLogger("releases.services")  # one logger name for operators, as before the split


@dataclasses.dataclass
class TargetOutcome:
    """What the target did with a promotion or rollback, as far as this process saw it."""

    result: engine.ApplyResult | None = None  # the transaction committed here
    native_after: str = ""  # the target's history already had it (a redelivered task)
    busy: bool = False  # the target's release lock was held: nothing ran
    code: str = ""  # failed with this code and message ...
    message: str = ""
    ambiguous: bool = False  # ... possibly during or after COMMIT: the target's history decides


# Engine codes raised only after the apply's transaction was rolled back: nothing was committed.
# Any other failure once the apply started (apply_failed may be a failed COMMIT; a TargetLockedError
# comes from reading the catalog, maybe after it) is checked against the target's history.
CODES_BEFORE_COMMIT = frozenset(
    {
        ErrorCode.SCHEMA_DRIFT,
        ErrorCode.POST_VALIDATION_FAILED,
        ErrorCode.ROLLBACK_BLOCKED,
        ErrorCode.LOCK_TIMEOUT,
    }
)


def outcome_of_failure(exc: Exception, *, started_apply: bool) -> TargetOutcome:
    """A failure of the work on the target, with whether the target may have committed anyway."""
    if isinstance(exc, (engine.EngineError, engine.TargetError, engine.BackupError)):
        code, message = exc.code, str(exc)
        certain = not started_apply or (
            isinstance(exc, engine.EngineError)
            and not isinstance(exc, engine.TargetLockedError)  # a catalog read, maybe after COMMIT
            and code in CODES_BEFORE_COMMIT
        )
    else:
        code, message = ErrorCode.INTERNAL_ERROR, scrub(f"{type(exc).__name__}: {exc}")
        certain = not started_apply
    return TargetOutcome(code=code, message=message, ambiguous=not certain)


def target_history_last(environment: Environment, release: Release) -> tuple[str | None, str] | None:
    """The release's last direction in the target's `_rm_history` and the target's native
    fingerprint; None when the target cannot be read (the reconciler decides later)."""
    try:
        with open_environment(environment, lock_timeout_ms=environment.apply_lock_timeout_ms) as target:
            return last_direction(engine.history(target), release), engine.native_fingerprint(target)
    except (engine.EngineError, engine.TargetError) as exc:
        logger.warning("the target's history of %s cannot be read: %s", release.release_id, exc)
        return None


def lease_release_after(environment: Environment, owner: str) -> None:
    """Give the lease back; if the control database stays away, the lease expires by itself."""
    try:
        control_db_retry(lambda: lease_release(environment, owner), what="releasing the lease")
    except CONTROL_DB_ERRORS as exc:
        logger.warning("the environment lease could not be released (%s); it expires", type(exc).__name__)


def run_then_settle(
    release_pk: int,
    owner: str,
    actor_pk: int | None,
    *,
    in_flight: str,
    phase: str,
    on_target: Callable[[Release, Environment, str], TargetOutcome],
    settle: Callable[..., None],
) -> None:
    """A promote or rollback task: under the environment's lease, do the work on the target, then
    record it (`settle`, run again by `control_db_retry` after a lost control-database connection).
    Does nothing for a release no longer `in_flight`, or when another process holds a live lease."""
    release = release_for_task(release_pk)
    if release is None or release.status != in_flight:
        return
    environment = release.to_environment
    actor = actor_of(actor_pk)
    if not lease_acquire_for_task(environment, release, owner):
        return  # another process holds a live lease on this environment; it owns the outcome
    try:
        started = time.monotonic()
        outcome = on_target(release, environment, owner)
        if outcome.result is not None:
            # Observed before the release is seen as settled: whoever waits for that status (a
            # `wait_seconds` client, a scrape right after) finds the duration recorded.
            metrics.observe(phase, time.monotonic() - started, **metric_labels(release))
        control_db_retry(
            lambda: settle(release, environment, outcome, actor=actor),
            what=f"settling the {phase} of {release.release_id}",
        )
    finally:
        lease_release_after(environment, owner)
