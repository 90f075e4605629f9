"""A release's status moves by conditional UPDATEs: from the statuses it may leave, to the next one.

`begin` takes the environment's lease and moves a release in flight, atomically. `settle` is the
one conditional move out of flight: it updates the row only if the release is still where the
caller expects it, and then, in the same transaction, runs the move's effects (preservations,
flags) and writes its audit event. A redelivered task, a reconciler and a live worker can all
try to settle one release; exactly one moves it. The `settle_*` functions name the outcomes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from releasemgr.core.errors import Conflict, ErrorCode
from releasemgr.core.scrub import scrub
from tenants.models import Environment

from ..models import Preservation, Release, ReleaseStatus
from .audit import audit_record
from .dispatch import BrokerUnavailable, dispatch
from .flags import flags_apply, flags_restore
from .leases import lease_acquire, lease_owner, lease_release
from .side_effects import enqueue_post_deployment, log_extra, notify

logger = logging.getLogger("releases.services")  # one logger name for operators, as before the split

IN_FLIGHT = (ReleaseStatus.PROMOTING, ReleaseStatus.ROLLING_BACK)


def begin(
    release: Release,
    *,
    status_from: str,
    status_to: str,
    check: Callable[[Release], None] | None = None,
) -> str:
    """Lock the release, re-check it, take the lease and move it in flight, atomically; 409 otherwise.

    The release row is locked (SELECT ... FOR UPDATE) for the whole move, the lock `approval_record`
    takes to record a decision. `check(locked)` runs under it on a fresh copy of the row and refuses
    by raising (promote: approvals and lint, the request's own pre-check): a decision committed
    before the lock is seen here, one that comes after waits for it and finds the release no longer
    `prepared`. A refusal rolls everything back: status unchanged, no lease taken.
    """
    environment = release.to_environment
    owner = lease_owner()
    with transaction.atomic():
        locked = Release.objects.select_for_update().filter(pk=release.pk).first()
        if locked is None or locked.status != status_from:
            raise Conflict(f"Release {release.release_id} is no longer {status_from}.")
        if check is not None:
            check(locked)
        if not lease_acquire(environment, release, owner):
            holder = Environment.objects.filter(pk=environment.pk).values_list(
                "lock_release__release_id", flat=True
            )
            raise Conflict(
                f"Environment {environment.stage} is busy with another release; try again when it is done.",
                code=ErrorCode.ENVIRONMENT_BUSY,
                details={"release_id": holder.first() or ""},
            )
        moved = Release.objects.filter(pk=release.pk, status=status_from).update(
            status=status_to, status_changed_at=timezone.now(), error_code="", error_message=""
        )
        if not moved:
            raise Conflict(f"Release {release.release_id} is no longer {status_from}.")
    return owner


def begin_and_dispatch(
    release: Release,
    *,
    task: str,
    status_from: str,
    status_to: str,
    user: AbstractBaseUser | None,
    phase: str,
    work: str,
    check: Callable[[Release], None] | None = None,
) -> None:
    """`begin`, then queue `task` (or run it in-process). A broker that cannot be reached undoes the
    begin (status back, lease freed, logged) and raises BrokerUnavailable: nothing was started."""
    owner = begin(release, status_from=status_from, status_to=status_to, check=check)
    actor_pk = user.pk if user is not None else None
    dispatch(
        task,
        release.pk,
        owner,
        actor_pk,
        on_unavailable=lambda exc: begin_undo(
            release,
            owner,
            status_from=status_to,
            status_to=status_from,
            code=BrokerUnavailable.code,
            message=f"The broker could not be reached ({type(exc).__name__}); the {work} was not started.",
            phase=phase,
        ),
    )


def begin_undo(
    release: Release, owner: str, *, status_from: str, status_to: str, code: str, message: str, phase: str
) -> bool:
    """Undo `begin` when its task never started (it could not be queued): the release goes back to
    `status_to` with `code` and `message` on it, and the lease `owner` took is freed, in one
    transaction. False when the release had already left `status_from` (nothing is changed then)."""
    with transaction.atomic():
        moved = Release.objects.filter(pk=release.pk, status=status_from).update(
            status=status_to, status_changed_at=timezone.now(), error_code=code, error_message=message
        )
        if moved:
            lease_release(release.to_environment, owner)
    if moved:
        logger.warning(
            "%s of release %s not started: %s",
            phase,
            release.release_id,
            message,
            extra=log_extra(release, phase=phase, status=status_to, error_code=code),
        )
    return bool(moved)


def settle(
    release: Release,
    *,
    from_statuses: Iterable[str],
    to_status: str,
    fields: dict[str, Any] | None = None,
    stamp: str | None = None,
    event: str | None = None,
    payload: dict[str, Any] | None = None,
    effects: Callable[[], dict[str, Any]] | None = None,
    actor: AbstractBaseUser | None = None,
) -> dict[str, Any] | None:
    """Move the release from one of `from_statuses` to `to_status`, or do nothing.

    In one transaction: the conditional UPDATE (with `fields`, and `stamp` set to now), then
    `effects()` whose result joins the audit payload, then the audit `event`. Returns the payload
    when this call moved the release, None when it was no longer in `from_statuses`.
    """
    now = timezone.now()
    values = {"status": to_status, "status_changed_at": now, **(fields or {})}
    if stamp:
        values[stamp] = now
    with transaction.atomic():
        moved = Release.objects.filter(pk=release.pk, status__in=list(from_statuses)).update(**values)
        if not moved:
            return None
        recorded = {**(payload or {}), **(effects() if effects else {})}
        release.refresh_from_db()
        if event:
            audit_record(event=event, tenant=release.tenant, release=release, actor=actor, payload=recorded)
    return recorded


def preservations_record(release: Release, preservations: list[dict], *, direction: str) -> None:
    Preservation.objects.bulk_create(
        Preservation(
            release=release,
            position=item["position"],
            direction=item.get("direction", direction),
            kind=item["kind"],
            source_table=item["source_table"],
            source_column=item.get("source_column") or "",
            preserved_table=item["preserved_table"],
            row_count=item.get("row_count") or 0,
        )
        for item in preservations
    )


def settle_promoted(
    release: Release,
    *,
    native_after: str,
    actor: AbstractBaseUser | None,
    preservations: list[dict] | None = None,
    duration_ms: float | None = None,
    correction: dict[str, Any] | None = None,
) -> None:
    """The target has the release (its `_rm_history` says so): promoted, flags set, checked after.

    `correction` (from the reconciler) moves a release recorded `failed` whose apply the target's
    history shows: {"reason", "applied_at", "native_after_known"}. It is recorded as promoted at the
    time the target committed it, and the correction is audited as `release.reconciled`.
    """

    def effects() -> dict[str, Any]:
        preservations_record(release, preservations or [], direction="forward")
        flag_changes = flags_apply(environment=release.to_environment, flags=release.bundle["feature_flags"])
        Release.objects.filter(pk=release.pk).update(flag_changes=flag_changes)
        if correction is not None:
            reconciled_record(
                release, before=ReleaseStatus.FAILED, after=ReleaseStatus.PROMOTED, correction=correction
            )
        return {"bundle_sha256": release.bundle_sha256, "duration_ms": duration_ms, "flags": flag_changes}

    fields: dict[str, Any] = {"error_code": "", "error_message": ""}
    if correction is None:
        from_statuses: Iterable[str]
        from_statuses, stamp = IN_FLIGHT, "promoted_at"
        fields["native_fingerprint_after"] = native_after
    else:
        from_statuses, stamp = [ReleaseStatus.FAILED], None
        fields.update(promoted_at=correction["applied_at"], failed_at=None)
        if correction.get("native_after_known", True):
            fields["native_fingerprint_after"] = native_after
    settled = settle(
        release,
        from_statuses=from_statuses,
        to_status=ReleaseStatus.PROMOTED,
        stamp=stamp,
        fields=fields,
        event="release.promoted",
        payload={"reconciled": True} if correction is not None else None,
        effects=effects,
        actor=actor,
    )
    if settled is None:
        return
    logger.info("release %s promoted", release.release_id, extra=log_extra(release, phase="promote"))
    notify(release, "promoted")
    enqueue_post_deployment(release)


def reconciled_record(release: Release, *, before: str, after: str, correction: dict[str, Any]) -> None:
    """Audit a settled release corrected from the target's `_rm_history` (in the settle's transaction)."""
    applied_at = correction.get("applied_at")
    audit_record(
        event="release.reconciled",
        tenant=release.tenant,
        release=release,
        payload={
            "before": before,
            "after": after,
            "reason": correction["reason"],
            "error_code_before": release.error_code,
            "history": {
                "direction": correction["direction"],
                "applied_at": applied_at.isoformat() if applied_at else None,
            },
        },
    )


def settle_promote_busy(release: Release) -> None:
    """Another session holds the target's release lock (another control database, a purge): nothing
    was run, so the release goes back to `prepared` (409 environment_busy in-process) instead of failing."""
    settled = settle(
        release,
        from_statuses=[ReleaseStatus.PROMOTING],
        to_status=ReleaseStatus.PREPARED,
        fields={
            "error_code": "environment_busy",
            "error_message": "Another session holds the target's release lock; nothing was run. Try again when it is done.",
        },
    )
    if settled is not None:
        logger.warning(
            "promotion of %s deferred: the target's release lock is held",
            release.release_id,
            extra=log_extra(release, phase="promote", status=ReleaseStatus.PREPARED),
        )


def settle_failed(release: Release, *, code: str, message: str, actor: AbstractBaseUser | None) -> None:
    """The promotion did not commit: failed, with the engine's code and a scrubbed message."""
    message = scrub(message)
    settled = settle(
        release,
        from_statuses=[ReleaseStatus.PROMOTING],
        to_status=ReleaseStatus.FAILED,
        stamp="failed_at",
        fields={"error_code": code, "error_message": message},
        event="release.failed",
        payload={"phase": "promote", "code": code, "error": message},
        actor=actor,
    )
    if settled is None:
        return
    logger.warning(
        "release %s failed: %s", release.release_id, code, extra=log_extra(release, phase="promote")
    )
    notify(release, "failed")


def settle_rolled_back(
    release: Release,
    *,
    actor: AbstractBaseUser | None,
    preservations: list[dict] | None = None,
    correction: dict[str, Any] | None = None,
) -> dict:
    """The target is back at the release's pre-state: rolled back, flags put back where untouched.

    `correction` (from the reconciler) moves a release recorded `promoted` whose rollback the
    target's history shows as its last transaction: {"reason", "applied_at", "direction"}; audited
    as `release.reconciled`.
    """

    def effects() -> dict[str, Any]:
        preservations_record(release, preservations or [], direction="rollback")
        flags = flags_restore(environment=release.to_environment, flag_changes=release.flag_changes)
        if release.flag_changes:
            # The manifest says which flags went back and which were changed since and left alone.
            outcome = {
                name: {**change, "restored": name in flags["restored"]}
                for name, change in release.flag_changes.items()
            }
            Release.objects.filter(pk=release.pk).update(flag_changes=outcome)
        if correction is not None:
            reconciled_record(
                release, before=ReleaseStatus.PROMOTED, after=ReleaseStatus.ROLLED_BACK, correction=correction
            )
        return {"bundle_sha256": release.bundle_sha256, "flags": flags}

    settled = settle(
        release,
        from_statuses=[*IN_FLIGHT, ReleaseStatus.FAILED] if correction is None else [ReleaseStatus.PROMOTED],
        to_status=ReleaseStatus.ROLLED_BACK,
        stamp="rolled_back_at",
        fields={"error_code": "", "error_message": ""} if correction is not None else None,
        event="release.rollback",
        payload={"reconciled": True} if correction is not None else None,
        effects=effects,
        actor=actor,
    )
    if settled is None:
        return {}
    logger.info("release %s rolled back", release.release_id, extra=log_extra(release, phase="rollback"))
    notify(release, "rolled_back")
    return settled["flags"]


def settle_rollback_refused(
    release: Release, *, code: str, message: str, actor: AbstractBaseUser | None
) -> None:
    """A rollback that could not run leaves the target as promoted: say so on the release."""
    message = scrub(message)
    settled = settle(
        release,
        from_statuses=[ReleaseStatus.ROLLING_BACK],
        to_status=ReleaseStatus.PROMOTED,
        fields={"error_code": code, "error_message": message},
        event="release.rollback",
        payload={"ok": False, "code": code, "error": message},
        actor=actor,
    )
    if settled is not None:
        logger.warning(
            "rollback of release %s refused: %s",
            release.release_id,
            code,
            extra=log_extra(release, phase="rollback", status=ReleaseStatus.PROMOTED),
        )


def release_for_task(release_pk: int) -> Release | None:
    # Celery's Django fixup closes stale connections around worker tasks; closing here would break
    # an in-process (eager) task running inside the caller's transaction.
    return (
        Release.objects.select_related("tenant", "to_environment__tenant", "from_environment", "created_by")
        .filter(pk=release_pk)
        .first()
    )


def actor_of(actor_pk: int | None) -> AbstractBaseUser | None:
    if actor_pk is None:
        return None
    return get_user_model().objects.filter(pk=actor_pk).first()


def wait_for(release: Release, *, statuses: Iterable[str], wait_seconds: float | None) -> Release:
    """Reload the release, polling while it is in `statuses`, for up to wait_seconds (at most 1 h)."""
    release.refresh_from_db()
    if wait_seconds:
        deadline = time.monotonic() + min(float(wait_seconds), 3600)
        while release.status in statuses and time.monotonic() < deadline:
            time.sleep(0.25)
            release.refresh_from_db()
    return release
