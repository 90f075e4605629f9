"""Release services: the one code path behind the admin, the API, the commands, e-mail links and tools.

prepare -> promote -> rollback, with approvals, the prod gate, the environment lease, reconciliation
of releases left in flight by a dead worker, feature flags and audit events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import UTC, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from releasemgr.api import ApiError, Conflict, Forbidden, UnsafeMigration, ValidationFailed
from releasemgr.context import client_address_var, request_id_var
from tenants.crypto import scrub
from tenants.models import NEXT_STAGE, Environment, FeatureFlag, Role, Stage, Tenant
from tenants.selectors import environment_get, flags_of, membership_get

from . import engine, metrics
from .models import (
    Approval,
    ApprovalDecision,
    AuditEvent,
    Backup,
    Migration,
    Preservation,
    Release,
    ReleaseStatus,
)
from .selectors import approval_counts, live_release

logger = logging.getLogger(__name__)

IN_FLIGHT = (ReleaseStatus.PROMOTING, ReleaseStatus.ROLLING_BACK)


# --- audit -------------------------------------------------------------------------------------


def audit_record(
    *,
    event: str,
    tenant: Tenant,
    release: Release | None = None,
    environment: Environment | None = None,
    actor: AbstractBaseUser | None = None,
    payload: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append a domain event; call it inside the transaction of the change it describes."""
    if environment is None and release is not None:
        environment = release.to_environment
    return AuditEvent.objects.create(
        tenant=tenant,
        release=release,
        environment=environment,
        event=event,
        actor=actor if actor is not None and actor.is_authenticated else None,
        actor_username=getattr(actor, "username", "") or "",
        payload=payload or {},
        client_address=client_address_var.get(),
        request_id=request_id_var.get(),
    )


# --- bundles and ids ---------------------------------------------------------------------------


def pipeline_environments(*, tenant: Tenant, from_env: str, to_env: str) -> tuple[Environment, Environment]:
    """The two environments of a one-hop release; anything but dev->staging or staging->prod is a 400."""
    errors = {}
    for field, value in (("from_env", from_env), ("to_env", to_env)):
        if not isinstance(value, str) or value not in Stage.values:
            errors[field] = f"One of {', '.join(Stage.values)}."
    if errors:
        raise ValidationFailed("Unknown environment.", details=errors)
    if NEXT_STAGE.get(from_env) != to_env:
        raise ValidationFailed(
            f"A release goes one stage down the pipeline (dev->staging, staging->prod), not {from_env}->{to_env}.",
            details={"to_env": f"From {from_env} the next stage is {NEXT_STAGE.get(from_env, 'none')}."},
        )
    return environment_get(tenant=tenant, stage=from_env), environment_get(tenant=tenant, stage=to_env)


def bundle_normalize(raw: Any) -> dict:
    try:
        return engine.normalize_bundle(raw, max_changes=settings.RELEASE_MAX_CHANGES)
    except engine.BundleError as exc:
        raise ValidationFailed(str(exc), details=exc.details)


def bundle_compute(*, from_environment: Environment, to_environment: Environment) -> dict:
    """The bundle that makes to_env like from_env: schema difference and differing flags."""
    with engine.open_target(from_environment.database_url) as source:
        source_schema = engine.introspect(source)
    with engine.open_target(to_environment.database_url) as target:
        target_schema = engine.introspect(target)
    try:
        changes = engine.diff_schemas(source_schema, target_schema)
    except engine.DiffError as exc:
        raise ValidationFailed(str(exc), details={"bundle_data": str(exc)})
    target_flags = flags_of(to_environment)
    flags = {
        name: value
        for name, value in sorted(flags_of(from_environment).items())
        if name not in target_flags or target_flags[name] != value
    }
    return bundle_normalize({"database": {"changes": changes}, "feature_flags": flags})


RELEASE_ID_RESERVED_SECONDS = 600


def next_release_id(*, tenant: Tenant) -> str:
    """rel_YYYYMMDD_hhmm in UTC, then _2, _3...: the first one neither saved nor reserved.

    The id is part of the plan (preservation table names), so it is chosen before the dry-run and
    saved after it. Concurrent prepares of one tenant would all pick the same free id, and all but
    one would plan again (after ten collisions: 409): each id handed out is reserved in the cache
    (an atomic add) for RELEASE_ID_RESERVED_SECONDS. Across processes with a per-process cache the
    unique constraint still settles races (see prepare); an id reserved but never saved is skipped.
    """
    base = "rel_" + timezone.now().astimezone(UTC).strftime("%Y%m%d_%H%M")
    taken = set(
        Release.objects.filter(tenant=tenant, release_id__startswith=base).values_list(
            "release_id", flat=True
        )
    )
    n = 1
    while True:
        candidate = base if n == 1 else f"{base}_{n}"
        if candidate not in taken and cache.add(
            f"releasemgr:release-id:{tenant.pk}:{candidate}", True, RELEASE_ID_RESERVED_SECONDS
        ):
            return candidate
        n += 1


def _validate_allow_unsafe(allow_unsafe: Any, reason: Any) -> tuple[list[str], str]:
    if allow_unsafe in (None, []):
        return [], reason if isinstance(reason, str) else ""
    if not isinstance(allow_unsafe, list) or not all(isinstance(rule, str) for rule in allow_unsafe):
        raise ValidationFailed(
            "allow_unsafe must be a list of rule ids.", details={"allow_unsafe": "A list."}
        )
    unknown = sorted(set(allow_unsafe) - set(engine.LINT_RULES))
    if unknown:
        raise ValidationFailed(
            f"Unknown lint rule ids: {', '.join(unknown)}.",
            details={"allow_unsafe": f"Known rules: {', '.join(sorted(engine.LINT_RULES))}."},
        )
    if not isinstance(reason, str) or not reason.strip():
        raise ValidationFailed(
            "allow_unsafe needs a reason.", details={"reason": "Say why these rules are overridden."}
        )
    return sorted(set(allow_unsafe)), reason.strip()


# --- prepare -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _target_refusal() -> Iterator[None]:
    """A target that cannot be opened, or stays locked, refuses the request in the envelope: 503 with
    the TargetError's code (`target_unreachable`, `lock_timeout`) and its message, scrubbed of the
    URL, user, password and host. 503: the client may retry, and no Idempotency-Key keeps it."""
    try:
        yield
    except engine.TargetError as exc:
        raise ApiError(exc.message, code=exc.code, status_code=503) from None


@_target_refusal()
def release_prepare(
    *,
    tenant: Tenant,
    user: AbstractBaseUser,
    from_env: str,
    to_env: str,
    bundle_data: Any = None,
    allow_unsafe: Any = None,
    reason: Any = "",
) -> Release:
    """Validate, plan, lint and dry-run a bundle against to_env, then save the manifest.

    Refusals (bad input, dependency errors, the prod gate) save nothing. A dry-run that fails is
    saved as a `failed` release with its error.
    """
    started = time.monotonic()
    from_environment, to_environment = pipeline_environments(tenant=tenant, from_env=from_env, to_env=to_env)
    allowed, reason = _validate_allow_unsafe(allow_unsafe, reason)
    computed = bundle_data is None
    if computed:
        bundle = bundle_compute(from_environment=from_environment, to_environment=to_environment)
    else:
        bundle = bundle_normalize(bundle_data)
    changes = bundle["database"]["changes"]
    if not changes and not bundle["feature_flags"]:
        raise ValidationFailed(
            f"Nothing to release: {to_env} already has {from_env}'s schema and flags."
            if computed
            else "The bundle has no changes and no feature flags.",
            details={"bundle_data": "Empty."},
        )
    bundle_sha = engine.sha256_hex(bundle)

    with engine.open_target(
        to_environment.database_url, lock_timeout_ms=to_environment.dry_run_lock_timeout_ms
    ) as target:
        schema = engine.introspect(target)
        try:
            engine.check_dependencies(schema, changes)
        except engine.PlanError as exc:
            raise ApiError(str(exc), code=exc.code, status_code=400, details=exc.details)
        findings = engine.lint(changes, schema)
        for _attempt in range(10):
            release_id = next_release_id(tenant=tenant)
            plan = engine.plan(
                target,
                changes,
                release_id=release_id,
                lock_timeout_ms=to_environment.dry_run_lock_timeout_ms,
                statement_timeout_ms=to_environment.dry_run_statement_timeout_ms,
            )
            if to_environment.stage == Stage.PROD and plan.forward_ok and plan.rollback_verified:
                prod_gate_check(
                    staging=from_environment,
                    fingerprint_after=plan.fingerprint_after,
                    schema_after=plan.schema_after,
                )
            try:
                release = _release_save(
                    tenant=tenant,
                    user=user,
                    release_id=release_id,
                    from_environment=from_environment,
                    to_environment=to_environment,
                    bundle=bundle,
                    bundle_sha=bundle_sha,
                    computed=computed,
                    findings=findings,
                    allowed=allowed,
                    reason=reason,
                    plan=plan,
                )
                break
            except IntegrityError:
                continue  # another prepare took this id between our read and our insert
        else:  # pragma: no cover - ten collisions in a row
            raise Conflict("Could not allocate a release id; try again.")

    labels = {"tenant": tenant.slug, "environment": to_environment.stage}
    metrics.observe("prepare", time.monotonic() - started, **labels)
    if release.status == ReleaseStatus.FAILED:
        logger.warning(
            "release %s failed its dry-run", release.release_id, extra=_log_extra(release, phase="prepare")
        )
        _notify(release, "failed")
    else:
        logger.info("release %s prepared", release.release_id, extra=_log_extra(release, phase="prepare"))
        _notify(release, "prepared")
    return release


def prod_gate_check(
    *, staging: Environment, fingerprint_after: str, schema_after: dict | None = None
) -> None:
    """Prod only ever becomes a schema that staging already runs (409 `gate` otherwise)."""
    with engine.open_target(staging.database_url) as target:
        staging_schema = engine.introspect(target)
    staging_fingerprint = engine.fingerprint(staging_schema)
    if staging_fingerprint != fingerprint_after:
        details: dict[str, Any] = {
            "staging_fingerprint": staging_fingerprint,
            "prod_fingerprint_after": fingerprint_after,
        }
        if schema_after is not None:
            details["difference"] = engine.schema_difference(staging_schema, schema_after)
        raise Conflict(
            "Prod gate: after this release prod would not have the schema staging runs now.",
            code="gate",
            details=details,
        )


@transaction.atomic
def _release_save(
    *,
    tenant: Tenant,
    user: AbstractBaseUser,
    release_id: str,
    from_environment: Environment,
    to_environment: Environment,
    bundle: dict,
    bundle_sha: str,
    computed: bool,
    findings: list[dict],
    allowed: list[str],
    reason: str,
    plan,
) -> Release:
    # A tenant's releases commit in created_at order: the tenant's row is written first (a row lock
    # on PostgreSQL, the database's write lock on SQLite) and the timestamp taken after, so a
    # release that commits after another never has an older created_at. The release list keeps its
    # count under the newest created_at (selectors.ReleaseSummaries._count_kept) and relies on it.
    Tenant.objects.filter(pk=tenant.pk).update(slug=F("slug"))
    now = timezone.now()
    failed = not (plan.forward_ok and plan.rollback_verified)
    error = ""
    if failed:
        error = plan.error or "The rollback plan does not restore the original schema."
    release = Release.objects.create(
        tenant=tenant,
        release_id=release_id,
        from_environment=from_environment,
        to_environment=to_environment,
        status=ReleaseStatus.FAILED if failed else ReleaseStatus.PREPARED,
        bundle=bundle,
        bundle_sha256=bundle_sha,
        sql_sha256=plan.sql_sha256,
        bundle_computed=computed,
        lint_findings=findings,
        allow_unsafe=allowed,
        unsafe_reason=reason,
        dry_run_summary={
            "forward_ok": plan.forward_ok,
            "rollback_verified": plan.rollback_verified,
            "fingerprint_before": plan.fingerprint_before,
            "fingerprint_after": plan.fingerprint_after,
            "error": plan.error,
        },
        fingerprint_before=plan.fingerprint_before,
        fingerprint_after=plan.fingerprint_after,
        native_fingerprint_before=plan.native_fingerprint_before,
        created_by=user,
        created_at=now,
        status_changed_at=now,
        failed_at=now if failed else None,
        error_code="dry_run_failed" if failed else "",
        error_message=error,
    )
    Migration.objects.bulk_create(
        Migration(
            release=release,
            position=planned["position"],
            operation=planned["operation"],
            table=planned["table"],
            change=planned["change"],
            sql=planned["sql"],
            statements=planned["statements"],
            rollback_sql=planned["rollback_sql"],
            rollback_statements=planned["rollback_statements"],
            dry_run_result=planned["dry_run_result"],
        )
        for planned in plan.changes
    )
    audit_record(
        event="release.prepared",
        tenant=tenant,
        release=release,
        actor=user,
        payload={
            "bundle_sha256": bundle_sha,
            "from_env": from_environment.stage,
            "to_env": to_environment.stage,
            "changes": len(plan.changes),
            "allow_unsafe": allowed,
            "reason": reason,
        },
    )
    if failed:
        audit_record(
            event="release.failed",
            tenant=tenant,
            release=release,
            actor=user,
            payload={"phase": "prepare", "error": error},
        )
    return release


# --- approvals ---------------------------------------------------------------------------------


def approvals_missing(release: Release) -> dict[str, Any] | None:
    """None when the approvals of the release's environment are satisfied, else what is missing."""
    counts = approval_counts(release)
    required = release.to_environment.approvals_required
    if counts["rejected"] or counts["approved"] < required:
        return {"approvals_required": required, **counts}
    return None


def unsafe_rules(release: Release) -> list[str]:
    """Lint errors not overridden by allow_unsafe."""
    return sorted(
        {
            finding["rule"]
            for finding in release.lint_findings
            if finding["severity"] == "error" and finding["rule"] not in release.allow_unsafe
        }
    )


@transaction.atomic
def approval_record(
    *, release: Release, user: AbstractBaseUser, decision: str, via: str = "api", comment: str = ""
) -> Approval:
    """Record an approver's decision, bound to the bundle and SQL they saw; one service for every way in."""
    if decision not in ApprovalDecision.values:
        raise ValidationFailed("decision must be approved or rejected.", details={"decision": decision})
    membership = membership_get(tenant=release.tenant, user=user)
    if not (user.is_superuser or (membership is not None and membership.has_role(Role.APPROVER))):
        raise Forbidden("Only approvers and admins of this tenant can approve or reject releases.")
    locked = Release.objects.select_for_update().get(pk=release.pk)
    if locked.status != ReleaseStatus.PREPARED:
        raise Conflict(
            f"Release {locked.release_id} is {locked.status}; only a prepared release can be approved or rejected.",
            details={"status": locked.status},
        )
    environment = release.to_environment
    if not environment.allow_self_approval and locked.created_by_id == user.pk:
        raise Forbidden(f"On {environment.stage} the author of a release cannot approve or reject it.")
    approval, _ = Approval.objects.update_or_create(
        release=locked,
        approver=user,
        defaults={
            "decision": decision,
            "bundle_sha256": locked.bundle_sha256,
            "sql_sha256": locked.sql_sha256,
            "via": via,
            "comment": comment[:2000],
            "created_at": timezone.now(),
        },
    )
    audit_record(
        event=f"release.{decision}",
        tenant=release.tenant,
        release=locked,
        actor=user,
        payload={"bundle_sha256": locked.bundle_sha256, "via": via, "comment": comment[:2000]},
    )
    return approval


# --- the environment lease ---------------------------------------------------------------------


def lease_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def _lease_acquire(environment: Environment, release: Release, owner: str) -> bool:
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


def _lease_release(environment: Environment, owner: str) -> None:
    Environment.objects.filter(pk=environment.pk, lock_owner=owner).update(
        lock_owner="", lock_release=None, lock_expires_at=None
    )


def _lease_extend(environment_pk: int, owner: str) -> bool:
    return bool(
        Environment.objects.filter(pk=environment_pk, lock_owner=owner).update(
            lock_expires_at=timezone.now() + timedelta(seconds=settings.RELEASE_LEASE_SECONDS)
        )
    )


class _Heartbeat:
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
                    _lease_extend(self.environment_pk, self.owner)
                except Exception:  # the next beat retries; the lease outlives one missed beat
                    logger.warning("lease heartbeat failed", exc_info=True)
        finally:
            connection.close()

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _target_lock_key(environment: Environment) -> str:
    return f"releasemgr:{environment.tenant.slug}:{environment.stage}"


def _begin(release: Release, *, status_from: str, status_to: str, user: AbstractBaseUser) -> str:
    """Take the lease and move the release into its in-flight status, atomically; 409 otherwise."""
    environment = release.to_environment
    owner = lease_owner()
    with transaction.atomic():
        if not _lease_acquire(environment, release, owner):
            holder = Environment.objects.filter(pk=environment.pk).values_list(
                "lock_release__release_id", flat=True
            )
            raise Conflict(
                f"Environment {environment.stage} is busy with another release; try again when it is done.",
                code="environment_busy",
                details={"release_id": holder.first() or ""},
            )
        moved = Release.objects.filter(pk=release.pk, status=status_from).update(
            status=status_to, status_changed_at=timezone.now(), error_code="", error_message=""
        )
        if not moved:
            raise Conflict(f"Release {release.release_id} is no longer {status_from}.")
    return owner


def _dispatch(task, *args) -> None:
    """In-process mode runs the task now; with a broker it is queued once the lease is committed."""
    if settings.CELERY_TASK_ALWAYS_EAGER:
        task.apply(args=args)
    else:
        transaction.on_commit(lambda: task.delay(*args))


def _wait_for(release: Release, *, statuses: Iterable[str], wait_seconds: float | None) -> Release:
    release.refresh_from_db()
    if wait_seconds:
        deadline = time.monotonic() + min(float(wait_seconds), 3600)
        while release.status in statuses and time.monotonic() < deadline:
            time.sleep(0.25)
            release.refresh_from_db()
    return release


# --- promote -----------------------------------------------------------------------------------


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
    missing = approvals_missing(release)
    if missing:
        message = (
            "The release was rejected."
            if missing["rejected"]
            else f"The release needs {missing['approvals_required']} approval(s), it has {missing['approved']}."
        )
        raise Conflict(message, code="approvals_missing", details=missing)
    rules = unsafe_rules(release)
    if rules:
        raise UnsafeMigration(
            f"Lint errors block the promotion: {', '.join(rules)}. Prepare again with allow_unsafe and a reason.",
            details={"rules": rules},
        )
    if release.to_environment.stage == Stage.PROD:
        prod_gate_check(staging=release.from_environment, fingerprint_after=release.fingerprint_after)
    release_reconcile(environment=release.to_environment)

    from . import tasks

    owner = _begin(release, status_from=ReleaseStatus.PREPARED, status_to=ReleaseStatus.PROMOTING, user=user)
    actor_pk = user.pk if user is not None else None
    _dispatch(tasks.promote_task, release.pk, owner, actor_pk)
    release = _wait_for(release, statuses=[ReleaseStatus.PROMOTING], wait_seconds=wait_seconds)
    if (
        release.status == ReleaseStatus.PREPARED
        and release.error_code == "environment_busy"
        and settings.CELERY_TASK_ALWAYS_EAGER
    ):
        raise Conflict(
            release.error_message, code="environment_busy", details={"release_id": release.release_id}
        )
    return release


def promote_execute(*, release_pk: int, owner: str, actor_pk: int | None = None) -> None:
    """The promotion itself (run by the Celery task): drift check, backup, one-transaction apply, flags.

    Idempotent: a redelivered task finds the release settled, or finds the promotion in the
    target's `_rm_history` and settles it without applying anything again.
    """
    release = _release_for_task(release_pk)
    if release is None or release.status != ReleaseStatus.PROMOTING:
        return
    environment = release.to_environment
    actor = _actor(actor_pk)
    if not _lease_acquire_for_task(environment, release, owner):
        return  # another process holds a live lease on this environment; it owns the outcome
    started = time.monotonic()
    try:
        with _target_session(environment, owner) as (target, locked):
            if not locked:
                _settle_promote_busy(release)  # nothing ran: the release can be promoted again
                return
            if _history_has(target, release, "forward"):
                _settle_promoted(release, native_after=engine.native_fingerprint(target), actor=actor)
                return
            changes = approved_changes(release)
            _backup(release, environment)
            result = release_apply_recorded(target, release, changes=changes)
        # Observed before the release is seen as promoted: whoever waits for that status (a
        # `wait_seconds` client, a scrape right after) finds the duration recorded.
        metrics.observe("promote", time.monotonic() - started, **_labels(release))
        _settle_promoted(
            release,
            native_after=result.native_fingerprint_after,
            actor=actor,
            preservations=result.preservations,
            duration_ms=result.duration_ms,
        )
    except (engine.EngineError, engine.TargetError, engine.BackupError) as exc:
        _settle_failed(release, code=getattr(exc, "code", "apply_failed"), message=str(exc), actor=actor)
    except Exception as exc:
        logger.exception("promotion of %s failed unexpectedly", release.release_id)
        _settle_failed(
            release, code="internal_error", message=scrub(f"{type(exc).__name__}: {exc}"), actor=actor
        )
    finally:
        _lease_release(environment, owner)


@contextlib.contextmanager
def _target_session(environment: Environment, owner: str) -> Iterator[tuple[Any, bool]]:
    """Keep the lease alive, open the target with the apply lock timeout and try its release lock."""
    with (
        _Heartbeat(environment.pk, owner),
        engine.open_target(
            environment.database_url, lock_timeout_ms=environment.apply_lock_timeout_ms
        ) as target,
        engine.target_lock(target, _target_lock_key(environment)) as locked,
    ):
        yield target, locked


def _release_for_task(release_pk: int) -> Release | None:
    # Celery's Django fixup closes stale connections around worker tasks; closing here would break
    # an in-process (eager) task running inside the caller's transaction.
    return (
        Release.objects.select_related("tenant", "to_environment__tenant", "from_environment", "created_by")
        .filter(pk=release_pk)
        .first()
    )


def _actor(actor_pk: int | None) -> AbstractBaseUser | None:
    if actor_pk is None:
        return None
    from django.contrib.auth import get_user_model

    return get_user_model().objects.filter(pk=actor_pk).first()


def _lease_acquire_for_task(environment: Environment, release: Release, owner: str) -> bool:
    """The task runs under the lease its request took; a redelivery after expiry takes it again."""
    if Environment.objects.filter(pk=environment.pk, lock_owner=owner).exists():
        return _lease_extend(environment.pk, owner)
    return _lease_acquire(environment, release, owner)


def _history_has(target, release: Release, direction: str) -> bool:
    """Did this release's last recorded transaction in the target go in `direction`?"""
    rows = [row for row in engine.history(target) if row["release_pk"] == release.pk]
    return bool(rows) and rows[-1]["direction"] == direction


def _recorded_changes(release: Release) -> list[dict]:
    return [
        {
            "position": migration.position,
            "operation": migration.operation,
            "table": migration.table,
            "change": migration.change,
            "statements": migration.statements,
            "rollback_statements": migration.rollback_statements,
        }
        for migration in release.migrations.order_by("position")
    ]


def approved_changes(release: Release) -> list[dict]:
    """The recorded statements, provided they are the ones prepared and approved (`sql_sha256`)."""
    changes = _recorded_changes(release)
    if engine.statements_sha256(changes) != release.sql_sha256:
        raise engine.EngineError(
            "schema_drift",
            "the recorded statements differ from the ones prepared and approved (sql_sha256); nothing was run",
        )
    return changes


def release_apply_recorded(target, release: Release, *, changes: list[dict]):
    """Run a release's approved forward statements on its target in one transaction (engine.apply),
    with the environment's timeouts; the promotion and the executor's db.migrate both go through here."""
    environment = release.to_environment
    return engine.apply(
        target,
        release_pk=release.pk,
        release_id=release.release_id,
        bundle_sha256=release.bundle_sha256,
        changes=changes,
        expected_native_before=release.native_fingerprint_before,
        expected_fingerprint_after=release.fingerprint_after,
        lock_timeout_ms=environment.apply_lock_timeout_ms,
        lock_retries=environment.apply_lock_retries,
        statement_timeout_ms=environment.apply_statement_timeout_ms,
    )


def _backup(release: Release, environment: Environment) -> Backup:
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


def _settle_promoted(
    release: Release,
    *,
    native_after: str,
    actor: AbstractBaseUser | None,
    preservations: list[dict] | None = None,
    duration_ms: float | None = None,
) -> None:
    now = timezone.now()
    with transaction.atomic():
        moved = Release.objects.filter(pk=release.pk, status__in=IN_FLIGHT).update(
            status=ReleaseStatus.PROMOTED,
            promoted_at=now,
            status_changed_at=now,
            native_fingerprint_after=native_after,
            error_code="",
            error_message="",
        )
        if not moved:
            return
        _preservations_record(release, preservations or [], direction="forward")
        flag_changes = flags_apply(environment=release.to_environment, flags=release.bundle["feature_flags"])
        Release.objects.filter(pk=release.pk).update(flag_changes=flag_changes)
        release.refresh_from_db()
        audit_record(
            event="release.promoted",
            tenant=release.tenant,
            release=release,
            actor=actor,
            payload={
                "bundle_sha256": release.bundle_sha256,
                "duration_ms": duration_ms,
                "flags": flag_changes,
            },
        )
    logger.info("release %s promoted", release.release_id, extra=_log_extra(release, phase="promote"))
    _notify(release, "promoted")
    _enqueue_post_deployment(release)


def _settle_promote_busy(release: Release) -> None:
    """Another session holds the target's release lock (another control database, a purge): nothing
    was run, so the release goes back to `prepared` (409 environment_busy in-process) instead of failing."""
    moved = Release.objects.filter(pk=release.pk, status=ReleaseStatus.PROMOTING).update(
        status=ReleaseStatus.PREPARED,
        status_changed_at=timezone.now(),
        error_code="environment_busy",
        error_message="Another session holds the target's release lock; nothing was run. Try again when it is done.",
    )
    if moved:
        logger.warning(
            "promotion of %s deferred: the target's release lock is held",
            release.release_id,
            extra=_log_extra(release, phase="promote", status=ReleaseStatus.PREPARED),
        )


def _settle_failed(release: Release, *, code: str, message: str, actor: AbstractBaseUser | None) -> None:
    now = timezone.now()
    message = scrub(message)
    with transaction.atomic():
        moved = Release.objects.filter(pk=release.pk, status=ReleaseStatus.PROMOTING).update(
            status=ReleaseStatus.FAILED,
            failed_at=now,
            status_changed_at=now,
            error_code=code,
            error_message=message,
        )
        if not moved:
            return
        release.refresh_from_db()
        audit_record(
            event="release.failed",
            tenant=release.tenant,
            release=release,
            actor=actor,
            payload={"phase": "promote", "code": code, "error": message},
        )
    logger.warning(
        "release %s failed: %s", release.release_id, code, extra=_log_extra(release, phase="promote")
    )
    _notify(release, "failed")


def _preservations_record(release: Release, preservations: list[dict], *, direction: str) -> None:
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


def _labels(release: Release) -> dict[str, str]:
    return {"tenant": release.tenant.slug, "environment": release.to_environment.stage}


def _log_extra(release: Release, **fields: Any) -> dict[str, Any]:
    """The fields a release's log lines carry (see releasemgr.logging.JsonFormatter)."""
    return {
        "release_id": release.release_id,
        "tenant": release.tenant.slug,
        "environment": release.to_environment.stage,
        "status": release.status,
        **fields,
    }


# --- rollback ----------------------------------------------------------------------------------


def release_rollback(
    *, release: Release, user: AbstractBaseUser, wait_seconds: float | None = None
) -> Release:
    """Roll back the latest live release of its environment (or settle a failed one)."""
    if release.status == ReleaseStatus.FAILED:
        return _rollback_failed(release, user)
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
            code="rollback_blocked",
            details={"purged": purged},
        )
    release_reconcile(environment=release.to_environment)

    from . import tasks

    owner = _begin(
        release, status_from=ReleaseStatus.PROMOTED, status_to=ReleaseStatus.ROLLING_BACK, user=user
    )
    actor_pk = user.pk if user is not None else None
    _dispatch(tasks.rollback_task, release.pk, owner, actor_pk)
    release = _wait_for(release, statuses=[ReleaseStatus.ROLLING_BACK], wait_seconds=wait_seconds)
    if release.status == ReleaseStatus.PROMOTED and release.error_code and settings.CELERY_TASK_ALWAYS_EAGER:
        raise Conflict(
            release.error_message, code=release.error_code, details={"release_id": release.release_id}
        )
    return release


def rollback_execute(*, release_pk: int, owner: str, actor_pk: int | None = None) -> None:
    """The rollback itself (run by the Celery task): rollback SQL in reverse, data restored, flags back."""
    release = _release_for_task(release_pk)
    if release is None or release.status != ReleaseStatus.ROLLING_BACK:
        return
    environment = release.to_environment
    actor = _actor(actor_pk)
    if not _lease_acquire_for_task(environment, release, owner):
        return
    started = time.monotonic()
    try:
        with _target_session(environment, owner) as (target, locked):
            if not locked:
                raise engine.EngineError(
                    "environment_busy", "Another session holds the target's release lock."
                )
            if _history_has(target, release, "rollback"):
                _settle_rolled_back(release, actor=actor)
                return
            result = engine.rollback(
                target,
                release_pk=release.pk,
                release_id=release.release_id,
                bundle_sha256=release.bundle_sha256,
                changes=approved_changes(release),
                expected_native_after=release.native_fingerprint_after,
                expected_fingerprint_before=release.fingerprint_before,
                lock_timeout_ms=environment.apply_lock_timeout_ms,
                lock_retries=environment.apply_lock_retries,
                statement_timeout_ms=environment.apply_statement_timeout_ms,
            )
        metrics.observe("rollback", time.monotonic() - started, **_labels(release))
        _settle_rolled_back(release, actor=actor, preservations=result.preservations)
        _rebase_live_release(environment, result)
    except (engine.EngineError, engine.TargetError) as exc:
        _settle_rollback_refused(
            release, code=getattr(exc, "code", "rollback_failed"), message=str(exc), actor=actor
        )
    except Exception as exc:
        logger.exception("rollback of %s failed unexpectedly", release.release_id)
        _settle_rollback_refused(
            release, code="internal_error", message=scrub(f"{type(exc).__name__}: {exc}"), actor=actor
        )
    finally:
        _lease_release(environment, owner)


def _settle_rolled_back(
    release: Release, *, actor: AbstractBaseUser | None, preservations: list[dict] | None = None
) -> dict:
    now = timezone.now()
    with transaction.atomic():
        moved = Release.objects.filter(pk=release.pk, status__in=[*IN_FLIGHT, ReleaseStatus.FAILED]).update(
            status=ReleaseStatus.ROLLED_BACK, rolled_back_at=now, status_changed_at=now
        )
        if not moved:
            return {}
        _preservations_record(release, preservations or [], direction="rollback")
        flags = flags_restore(environment=release.to_environment, flag_changes=release.flag_changes)
        if release.flag_changes:
            # The manifest says which flags went back and which were changed since and left alone.
            outcome = {
                name: {**change, "restored": name in flags["restored"]}
                for name, change in release.flag_changes.items()
            }
            Release.objects.filter(pk=release.pk).update(flag_changes=outcome)
        release.refresh_from_db()
        audit_record(
            event="release.rollback",
            tenant=release.tenant,
            release=release,
            actor=actor,
            payload={"bundle_sha256": release.bundle_sha256, "flags": flags},
        )
    logger.info("release %s rolled back", release.release_id, extra=_log_extra(release, phase="rollback"))
    _notify(release, "rolled_back")
    return flags


def _rebase_live_release(environment: Environment, result: Any) -> None:
    """After a verified rollback, the release now live is the drift baseline again, as the catalog is now.

    The rollback restores its portable schema, not the catalog byte for byte (a re-added column goes
    last, a SQLite rebuild rewrites the table's SQL), so without this rolling that release back next
    would be refused as drift. Only when the portable schema is exactly its after-state.
    """
    live = live_release(environment=environment)
    if live is not None and live.fingerprint_after == result.fingerprint_after:
        Release.objects.filter(pk=live.pk, status=ReleaseStatus.PROMOTED).update(
            native_fingerprint_after=result.native_fingerprint_after
        )


def _settle_rollback_refused(
    release: Release, *, code: str, message: str, actor: AbstractBaseUser | None
) -> None:
    """A rollback that could not run leaves the target as promoted: say so on the release."""
    message = scrub(message)
    with transaction.atomic():
        moved = Release.objects.filter(pk=release.pk, status=ReleaseStatus.ROLLING_BACK).update(
            status=ReleaseStatus.PROMOTED,
            status_changed_at=timezone.now(),
            error_code=code,
            error_message=message,
        )
        if moved:
            audit_record(
                event="release.rollback",
                tenant=release.tenant,
                release=release,
                actor=actor,
                payload={"ok": False, "code": code, "error": message},
            )
    if moved:
        logger.warning(
            "rollback of release %s refused: %s",
            release.release_id,
            code,
            extra=_log_extra(release, phase="rollback", status=ReleaseStatus.PROMOTED),
        )


@_target_refusal()
def _rollback_failed(release: Release, user: AbstractBaseUser) -> Release:
    """The guide's "rollback failed migration": verify the target is at its pre-state, restore flags."""
    environment = release.to_environment
    if release.native_fingerprint_before:
        with engine.open_target(environment.database_url) as target:
            current = engine.native_fingerprint(target)
        if current != release.native_fingerprint_before:
            raise Conflict(
                "The target is not at the schema it had before this release; inspect it before settling.",
                code="schema_drift",
                details={"expected": release.native_fingerprint_before, "found": current},
            )
    _settle_rolled_back(release, actor=user)
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


# --- feature flags -----------------------------------------------------------------------------


def flags_apply(*, environment: Environment, flags: dict[str, Any]) -> dict[str, dict]:
    """Set the bundle's flags on the environment, remembering the values they replace."""
    changes = {}
    existing = {flag.name: flag for flag in environment.flags.select_for_update()}
    for name, value in sorted(flags.items()):
        flag = existing.get(name)
        changes[name] = {"before": flag.value if flag else None, "existed": flag is not None, "after": value}
        if flag is None:
            FeatureFlag.objects.create(environment=environment, name=name, value=value)
        elif flag.value != value:
            flag.value = value
            flag.save(update_fields=["value", "updated_at"])
    return changes


def flags_restore(*, environment: Environment, flag_changes: dict[str, dict]) -> dict[str, list[str]]:
    """Put back the values a release replaced, but only for flags still at the value it set."""
    restored, kept = [], []
    existing = {flag.name: flag for flag in environment.flags.select_for_update()}
    for name, change in sorted(flag_changes.items()):
        flag = existing.get(name)
        if flag is None or flag.value != change["after"]:
            kept.append(name)
            continue
        if change["existed"]:
            flag.value = change["before"]
            flag.save(update_fields=["value", "updated_at"])
        else:
            flag.delete()
        restored.append(name)
    return {"restored": restored, "not_restored": kept}


# --- reconciliation ----------------------------------------------------------------------------


def release_reconcile(*, environment: Environment) -> list[Release]:
    """Settle releases left promoting/rolling_back by a worker that died, from the target's history.

    A release is only touched when no live lease covers it and the target's release lock is free,
    so a running promotion is never disturbed.
    """
    settled = []
    now = timezone.now()
    stuck = list(
        Release.objects.filter(to_environment=environment, status__in=IN_FLIGHT).select_related(
            "tenant", "to_environment__tenant", "from_environment"
        )
    )
    if not stuck:
        return settled
    environment.refresh_from_db()
    if environment.lock_owner and environment.lock_expires_at and environment.lock_expires_at > now:
        return settled
    with engine.open_target(environment.database_url) as target:
        with engine.target_lock(target, _target_lock_key(environment)) as locked:
            if not locked:
                return settled
            history = engine.history(target)
            native = engine.native_fingerprint(target)
            for release in stuck:
                rows = [row for row in history if row["release_pk"] == release.pk]
                last = rows[-1]["direction"] if rows else None
                if release.status == ReleaseStatus.PROMOTING:
                    if last == "forward":
                        _settle_promoted(release, native_after=native, actor=None)
                    else:
                        state = (
                            "at its pre-state" if native == release.native_fingerprint_before else "changed"
                        )
                        _settle_failed(
                            release,
                            code="worker_lost",
                            message=f"The worker running this promotion stopped; nothing was committed (target {state}).",
                            actor=None,
                        )
                elif last == "rollback":
                    _settle_rolled_back(release, actor=None)
                else:
                    _settle_rollback_refused(
                        release,
                        code="worker_lost",
                        message="The worker running this rollback stopped; nothing was committed.",
                        actor=None,
                    )
                settled.append(release)
    Environment.objects.filter(pk=environment.pk, lock_expires_at__lt=now).update(
        lock_owner="", lock_release=None, lock_expires_at=None
    )
    return settled


def reconcile_all() -> list[Release]:
    settled = []
    ids = Release.objects.filter(status__in=IN_FLIGHT).values_list("to_environment_id", flat=True).distinct()
    for environment in Environment.objects.filter(pk__in=list(ids)).select_related("tenant"):
        settled.extend(release_reconcile(environment=environment))
    return settled


# --- side effects through the tool kernel ------------------------------------------------------


def _notify(release: Release, event: str) -> None:
    """Queue the notification task once the current transaction commits (at once outside one).

    The task mails through the tool kernel (transcripts); in eager mode it runs in-process. A
    notification must never turn a settled release into an error, so failures are only logged.
    """
    from . import tasks

    release_pk = release.pk

    def send() -> None:
        try:
            tasks.notify_task.delay(release_pk, event)
        except Exception:
            logger.exception("notification %s for release pk %s could not be queued", event, release_pk)

    transaction.on_commit(send)


def _enqueue_post_deployment(release: Release) -> None:
    from tools.kernel import run_tool

    run_tool(
        "queue.enqueue",
        {"queue": "default", "job": "post_deployment_task", "payload": {"release_pk": release.pk}},
        tenant=release.tenant,
        environment=release.to_environment,
        release=release,
        dry_run=False,
        executor=True,
    )


def post_deployment_check(*, release_pk: int) -> dict:
    """Connect to the target, compare its fingerprint with the expected one, record and notify."""
    release = _release_for_task(release_pk)
    if release is None or release.status != ReleaseStatus.PROMOTED:
        return {}
    try:
        with engine.open_target(release.to_environment.database_url) as target:
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
        _notify(release, "post_deploy_mismatch")
    return result
