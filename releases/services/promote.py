"""Promote: check what can be checked in the request, take the lease, and run the promotion task.

The task (`promote_execute`) checks drift, takes a verified backup, applies the recorded
statements in one transaction, and settles the release from what the target recorded.
"""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.utils import timezone

from releasemgr.core.errors import Conflict, ErrorCode
from releasemgr.core.scrub import scrub
from tenants.models import Environment, Stage
from tenants.targets import open_environment

from .. import engine, metrics
from ..models import Backup, Release, ReleaseStatus
from ..recorded import approved_changes, history_has, release_apply_recorded
from .approvals import promotion_check
from .dispatch import PROMOTE, BrokerUnavailable, dispatch
from .leases import lease_acquire_for_task, lease_release, target_session
from .reconcile import release_reconcile
from .side_effects import metric_labels, notify
from .targets import prod_gate_check, target_verify
from .transitions import (
    actor_of,
    begin,
    begin_undo,
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
    owner = begin(
        release, status_from=ReleaseStatus.PREPARED, status_to=ReleaseStatus.PROMOTING, check=promotion_check
    )
    actor_pk = user.pk if user is not None else None
    dispatch(
        PROMOTE,
        release.pk,
        owner,
        actor_pk,
        on_unavailable=lambda exc: begin_undo(
            release,
            owner,
            status_from=ReleaseStatus.PROMOTING,
            status_to=ReleaseStatus.PREPARED,
            code=BrokerUnavailable.code,
            message=f"The broker could not be reached ({type(exc).__name__}); the promotion was not started.",
            phase="promote",
        ),
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
    target's `_rm_history` and settles it without applying anything again.
    """
    release = release_for_task(release_pk)
    if release is None or release.status != ReleaseStatus.PROMOTING:
        return
    environment = release.to_environment
    actor = actor_of(actor_pk)
    if not lease_acquire_for_task(environment, release, owner):
        return  # another process holds a live lease on this environment; it owns the outcome
    started = time.monotonic()
    try:
        with target_session(environment, owner) as (target, locked):
            if not locked:
                settle_promote_busy(release)  # nothing ran: the release can be promoted again
                return
            if history_has(target, release, "forward"):
                settle_promoted(release, native_after=engine.native_fingerprint(target), actor=actor)
                return
            changes = approved_changes(release)
            release_backup(release, environment)
            result = release_apply_recorded(target, release, changes=changes)
        # Observed before the release is seen as promoted: whoever waits for that status (a
        # `wait_seconds` client, a scrape right after) finds the duration recorded.
        metrics.observe("promote", time.monotonic() - started, **metric_labels(release))
        settle_promoted(
            release,
            native_after=result.native_fingerprint_after,
            actor=actor,
            preservations=result.preservations,
            duration_ms=result.duration_ms,
        )
    except (engine.EngineError, engine.TargetError, engine.BackupError) as exc:
        settle_failed(release, code=getattr(exc, "code", "apply_failed"), message=str(exc), actor=actor)
    except Exception as exc:
        logger.exception("promotion of %s failed unexpectedly", release.release_id)
        settle_failed(
            release, code=ErrorCode.INTERNAL_ERROR, message=scrub(f"{type(exc).__name__}: {exc}"), actor=actor
        )
    finally:
        lease_release(environment, owner)


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
    return Backup.objects.create(
        release=release,
        environment=environment,
        path=str(info.path or ""),
        format=info.format,
        tables=list(info.tables),
        size_bytes=info.size_bytes,
        sha256=info.sha256,
        verified=info.verified,
        note=info.note,
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
