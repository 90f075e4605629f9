"""Promote: check what can be checked in the request, take the lease, and run the promotion task.

The task (`promote_execute`) checks drift, takes a verified backup, applies the recorded
statements in one transaction, and settles the release from what the target recorded.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from releasemgr.core.errors import Conflict, ErrorCode
from tenants.models import Environment, Stage
from tenants.targets import open_environment

from .. import engine
from ..models import Backup, Release, ReleaseStatus
from ..recorded import approved_changes, history_has, release_apply_recorded
from .approvals import promotion_check
from .control_db import control_db_retry
from .dispatch import PROMOTE
from .leases import target_session
from .outcomes import TargetOutcome, outcome_of_failure, run_then_settle, target_history_last
from .reconcile import release_reconcile
from .side_effects import notify
from .targets import prod_gate_check, target_verify
from .transitions import (
    begin_and_dispatch,
    release_for_task,
    settle_failed,
    settle_promote_busy,
    settle_promoted,
    wait_for,
)

logger = logging.getLogger("releases.services")  # one logger name for operators, as before the split


def release_promote(
    *, release: Release, user: AbstractBaseUser, wait_seconds: float | None = None
) -> Release:
    """Check everything that can be checked here, take the lease, and run the promotion task.

    In-process (no broker) the task has run when this returns; with a worker the release is
    `promoting` unless wait_seconds lets it finish.
    """
    if release.status != ReleaseStatus.PREPARED:
        raise Conflict(
            f"Release {release.release_id} is {release.status}; only a prepared release can be promoted.",
            details={"status": release.status},
        )
    promotion_check(release)
    target_verify(release.to_environment)  # 409 target_refused: another tenant's, or the control, database
    if release.to_environment.stage == Stage.PROD:
        prod_gate_check(staging=release.from_environment, fingerprint_after=release.fingerprint_after)
    release_reconcile(environment=release.to_environment)

    # Approvals and lint once more, under the release row's lock that moves it to `promoting`:
    # a reject committed since the check above refuses this promotion (409 approvals_missing).
    begin_and_dispatch(
        release,
        task=PROMOTE,
        status_from=ReleaseStatus.PREPARED,
        status_to=ReleaseStatus.PROMOTING,
        user=user,
        phase="promote",
        work="promotion",
        check=promotion_check,
    )
    release = wait_for(release, statuses=[ReleaseStatus.PROMOTING], wait_seconds=wait_seconds)
    # The worker found the environment busy (another session holds the target lock): the same 409
    # whether the task ran in this process or on a worker we waited for.
    if release.status == ReleaseStatus.PREPARED and release.error_code == ErrorCode.ENVIRONMENT_BUSY:
        raise Conflict(
            release.error_message, code=ErrorCode.ENVIRONMENT_BUSY, details={"release_id": release.release_id}
        )
    return release


def promote_execute(*, release_pk: int, owner: str, actor_pk: int | None = None) -> None:
    """The promotion itself (run by the Celery task): drift check, backup, one-transaction apply, flags.

    Idempotent: a redelivered task finds the release settled, or finds the promotion in the
    target's `_rm_history` and settles it without applying anything again. The work on the target
    and the settling of the release are separate steps: once the target has decided (committed or
    not), losing the control-database connection only delays the settle (`control_db_retry`
    reconnects), and an outcome this process could not observe (an error during or after COMMIT)
    is read back from the target's history. Should the control database stay away, the release
    stays `promoting` and the reconciler settles it from the target's history.
    """
    run_then_settle(
        release_pk,
        owner,
        actor_pk,
        in_flight=ReleaseStatus.PROMOTING,
        phase="promote",
        on_target=promote_on_target,
        settle=promote_settle,
    )


def promote_on_target(release: Release, environment: Environment, owner: str) -> TargetOutcome:
    """Under the lease and the target's release lock: backup and apply, or find it already applied."""
    result: engine.ApplyResult | None = None
    native_after = ""
    started_apply = False
    try:
        with target_session(environment, owner) as (target, locked):
            if not locked:
                return TargetOutcome(busy=True)  # nothing ran: the release can be promoted again
            if history_has(target, release, "forward"):
                native_after = engine.native_fingerprint(target)
            else:
                changes = approved_changes(release)
                release_backup(release, environment)
                started_apply = True
                result = release_apply_recorded(target, release, changes=changes)
    except Exception as exc:
        if result is None and not native_after:
            if not isinstance(exc, (engine.EngineError, engine.TargetError, engine.BackupError)):
                logger.exception("promotion of %s failed unexpectedly", release.release_id)
            return outcome_of_failure(exc, started_apply=started_apply)
        # Committed (or found committed): closing the target session afterwards does not undo it.
        logger.warning(
            "promotion of %s committed; closing the target session failed: %s",
            release.release_id,
            type(exc).__name__,
        )
    return TargetOutcome(result=result, native_after=native_after)


def promote_settle(
    release: Release, environment: Environment, outcome: TargetOutcome, *, actor: AbstractBaseUser | None
) -> None:
    """Record what the target did; safe to run again (every settle is a conditional move)."""
    if outcome.busy:
        settle_promote_busy(release)
    elif outcome.result is not None:
        settle_promoted(
            release,
            native_after=outcome.result.native_fingerprint_after,
            actor=actor,
            preservations=outcome.result.preservations,
            duration_ms=outcome.result.duration_ms,
        )
    elif outcome.native_after:
        settle_promoted(release, native_after=outcome.native_after, actor=actor)
    else:
        found = target_history_last(environment, release) if outcome.ambiguous else None
        if found is not None and found[0] == "forward":
            logger.warning(
                "promotion of %s raised %s, but the target's history shows it committed",
                release.release_id,
                outcome.code,
            )
            settle_promoted(release, native_after=found[1], actor=actor)
        else:
            settle_failed(release, code=outcome.code, message=outcome.message, actor=actor)


def release_backup(release: Release, environment: Environment) -> Backup:
    tables = sorted(
        {
            migration.change.get("from") if migration.operation == "rename_table" else migration.table
            for migration in release.migrations.all()
            if migration.operation != "create_table"
        }
    )
    dest = settings.BACKUP_DIR / environment.tenant.slug / environment.stage
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # the server's paths are not the API client's business: say which setting
        raise engine.BackupError(
            f"The backup directory (BACKUP_DIR) cannot be used: {exc.strerror or type(exc).__name__}."
        ) from None
    info = engine.backup(
        environment.database_url,
        tables,
        dest,
        label=f"{release.release_id}_{release.pk}",
        lock_wait_timeout_ms=environment.apply_lock_timeout_ms,  # never wait longer than the apply would
    )
    if not info.verified:
        raise engine.BackupError(f"The backup could not be verified: {info.note}")
    # The dump may take minutes with the control connection idle: recording it survives losing it.
    return control_db_retry(
        lambda: Backup.objects.create(
            release=release,
            environment=environment,
            path=str(info.path or ""),
            format=info.format,
            tables=list(info.tables),
            size_bytes=info.size_bytes,
            sha256=info.sha256,
            verified=info.verified,
            note=info.note,
        ),
        what=f"recording the backup of {release.release_id}",
    )


def post_deployment_check(*, release_pk: int) -> dict:
    """Connect to the target, compare its fingerprint with the expected one, record and notify."""
    release = release_for_task(release_pk)
    if release is None or release.status != ReleaseStatus.PROMOTED:
        return {}
    try:
        with open_environment(release.to_environment) as target:
            fingerprint = engine.fingerprint(engine.introspect(target))
        result = {
            "ok": fingerprint == release.fingerprint_after,
            "fingerprint": fingerprint,
            "expected": release.fingerprint_after,
        }
    except engine.TargetError as exc:
        result = {"ok": False, "error": str(exc)}
    result["checked_at"] = timezone.now().isoformat()
    Release.objects.filter(pk=release.pk).update(post_deploy_result=result)
    if not result["ok"]:
        release.post_deploy_result = result
        notify(release, "post_deploy_mismatch")
    return result
