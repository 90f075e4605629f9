"""Prepare: validate, plan, lint and dry-run a bundle against the target, then save the manifest.

A refusal (bad input, a dependency error, the prod gate) saves nothing; a dry-run that fails is
saved as a `failed` release with its error. The bundle is given, or computed from the difference
between the two environments.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC
from typing import TYPE_CHECKING, Any, cast

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

if TYPE_CHECKING:
    from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from releasemgr.core.errors import Conflict, ErrorCode, ValidationFailed
from tenants.models import NEXT_STAGE, Environment, Stage, Tenant
from tenants.selectors import environment_get, flags_of
from tenants.targets import open_environment

from .. import engine, metrics
from ..models import Migration, Release, ReleaseStatus
from .audit import audit_record
from .side_effects import log_extra, notify
from .targets import prod_gate_check

logger = logging.getLogger("releases.services")  # one logger name for operators, as before the split


def pipeline_environments(*, tenant: Tenant, from_env: str, to_env: str) -> tuple[Environment, Environment]:
    """The two environments of a one-hop release; anything but dev->staging or staging->prod is a 400."""
    errors = {}
    for field, value in (("from_env", from_env), ("to_env", to_env)):
        if not isinstance(value, str) or value not in Stage.values:
            errors[field] = f"One of {', '.join(Stage.values)}."
    if errors:
        raise ValidationFailed("Unknown environment.", details=errors)
    if NEXT_STAGE.get(Stage(from_env)) != to_env:
        raise ValidationFailed(
            f"A release goes one stage down the pipeline (dev->staging, staging->prod), not {from_env}->{to_env}.",
            details={
                "to_env": f"From {from_env} the next stage is {NEXT_STAGE.get(Stage(from_env), 'none')}."
            },
        )
    return environment_get(tenant=tenant, stage=from_env), environment_get(tenant=tenant, stage=to_env)


def bundle_normalize(raw: Any) -> dict:
    try:
        return engine.normalize_bundle(raw, max_changes=settings.RELEASE_MAX_CHANGES)
    except engine.BundleError as exc:
        raise ValidationFailed(str(exc), details=exc.details)


def bundle_compute(*, from_environment: Environment, to_environment: Environment) -> dict:
    """The bundle that makes to_env like from_env: schema difference and differing flags."""
    with open_environment(from_environment) as source:
        source_schema = engine.introspect(source)
    with open_environment(to_environment) as target:
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


def validate_allow_unsafe(allow_unsafe: Any, reason: Any) -> tuple[list[str], str]:
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
    allowed, reason = validate_allow_unsafe(allow_unsafe, reason)
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

    with open_environment(to_environment, lock_timeout_ms=to_environment.dry_run_lock_timeout_ms) as target:
        schema = engine.introspect(target)
        engine.check_dependencies(schema, changes)  # PlanError: validation_error / unsupported_table
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
                release = release_save(
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
            "release %s failed its dry-run", release.release_id, extra=log_extra(release, phase="prepare")
        )
        notify(release, "failed")
    else:
        logger.info("release %s prepared", release.release_id, extra=log_extra(release, phase="prepare"))
        notify(release, "prepared")
    return release


@transaction.atomic
def release_save(
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
        created_by=cast("User", user),
        created_at=now,
        status_changed_at=now,
        failed_at=now if failed else None,
        error_code=ErrorCode.DRY_RUN_FAILED if failed else "",
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
