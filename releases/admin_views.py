"""Admin views for releases: confirmation pages of the four operations and the pipeline view.

Every operation calls the release services (the same code path as the API); a refusal
(`ApiError`) becomes an error message. Role checks happen here before the service is called:
`approver` for approve/reject, `admin` for promote/rollback, superusers for everything.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from django.contrib import messages
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch
from django.http import HttpRequest
from django.urls import reverse

from releasemgr.api import ApiError
from tenants.admin import has_tenant_role
from tenants.models import PIPELINE, Environment, Role, Tenant
from tenants.selectors import flags_of
from tenants.targets import open_environment

from . import engine
from .models import Approval, Release, ReleaseStatus
from .selectors import live_release
from .services import approval_record, approvals_missing, release_promote, release_rollback, unsafe_rules

logger = logging.getLogger(__name__)

# How long an admin request waits for a promotion or rollback run by a worker before it answers
# "still running" (with no broker the task has already run when the service returns).
ADMIN_WAIT_SECONDS = 30


@dataclass(frozen=True)
class Operation:
    name: str
    label: str
    role: str
    statuses: tuple[str, ...]
    verb: str


OPERATIONS: dict[str, Operation] = {
    "approve": Operation("approve", "Approve", Role.APPROVER, (ReleaseStatus.PREPARED,), "approved"),
    "reject": Operation("reject", "Reject", Role.APPROVER, (ReleaseStatus.PREPARED,), "rejected"),
    "promote": Operation("promote", "Promote", Role.ADMIN, (ReleaseStatus.PREPARED,), "promoted"),
    "rollback": Operation(
        "rollback", "Rollback", Role.ADMIN, (ReleaseStatus.PROMOTED, ReleaseStatus.FAILED), "rolled back"
    ),
}


def operation_allowed(request: HttpRequest, release: Release, operation: Operation) -> bool:
    """Does the user hold the role the operation needs in the release's tenant?"""
    return has_tenant_role(request, release.tenant_id, operation.role)


def operation_buttons(request: HttpRequest, release: Release) -> list[dict[str, str]]:
    """The object buttons this user may use on this release in its current status."""
    buttons = []
    for operation in OPERATIONS.values():
        if release.status in operation.statuses and operation_allowed(request, release, operation):
            buttons.append(
                {
                    "name": operation.name,
                    "label": operation.label,
                    "url": reverse(f"admin:releases_release_{operation.name}", args=[release.pk]),
                }
            )
    return buttons


def release_for_operation(release: Release) -> Release:
    """A fresh copy with what the services and the confirmation page read."""
    return (
        Release.objects.select_related(
            "tenant", "from_environment__tenant", "to_environment__tenant", "created_by"
        )
        .prefetch_related(
            "migrations",
            Prefetch("approvals", queryset=Approval.objects.select_related("approver")),
        )
        .get(pk=release.pk)
    )


def confirmation_item(release: Release, operation: Operation) -> dict[str, Any]:
    """What will happen: environment, SQL, approvals missing, lint errors, flags, warnings."""
    migrations = list(release.migrations.all())
    if operation.name == "rollback":
        statements = [
            {"position": m.position, "operation": m.operation, "table": m.table, "sql": m.rollback_sql}
            for m in reversed(migrations)
        ]
    else:
        statements = [
            {
                "position": m.position,
                "operation": m.operation,
                "table": m.table,
                "sql": m.sql,
                "rollback_sql": m.rollback_sql,
            }
            for m in migrations
        ]
    missing = approvals_missing(release)
    blocking = unsafe_rules(release)
    warnings = []
    if release.status not in operation.statuses:
        allowed = " or ".join(operation.statuses)
        warnings.append(f"The release is {release.status}; only a {allowed} release can be {operation.verb}.")
    if operation.name == "promote":
        if missing and missing["rejected"]:
            warnings.append("The release was rejected: it cannot be promoted.")
        elif missing:
            warnings.append(
                f"Approvals missing: {missing['approvals_required']} required, {missing['approved']} given."
            )
        if blocking:
            warnings.append(f"Lint errors block the promotion: {', '.join(blocking)}.")
    if operation.name == "rollback" and release.status == ReleaseStatus.FAILED:
        warnings.append(
            "This release failed: rollback checks that the target is at its pre-release schema and "
            "restores feature flags; no SQL runs."
        )
    return {
        "release": release,
        "change_url": reverse("admin:releases_release_change", args=[release.pk]),
        "environment": release.to_environment,
        "from_environment": release.from_environment,
        "statements": statements,
        "lint_findings": release.lint_findings,
        "lint_errors": [f for f in release.lint_findings if f.get("severity") == "error"],
        "unsafe_rules": blocking,
        "allow_unsafe": release.allow_unsafe,
        "approvals_required": release.to_environment.approvals_required,
        "approvals_missing": missing,
        "approvals": list(release.approvals.all()),
        "lint_warnings": [f for f in release.lint_findings if f.get("severity") != "error"],
        "feature_flags": _json(release.bundle.get("feature_flags", {})),
        "flag_changes": _json(release.flag_changes),
        "dry_run": _json(release.dry_run_summary),
        "warnings": warnings,
    }


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True) if value else ""


def operation_run(request: HttpRequest, release: Release, operation: Operation, comment: str = "") -> bool:
    """Call the service; report the outcome as a message. Refuses (403) a user without the role."""
    if not operation_allowed(request, release, operation):
        raise PermissionDenied(f"You may not {operation.name} releases of {release.tenant}.")
    name = release.release_id
    try:
        if operation.name in ("approve", "reject"):
            approval_record(
                release=release,
                user=request.user,
                decision=operation.verb,
                via="admin",
                comment=comment,
            )
            release.refresh_from_db()
            messages.success(request, f"You {operation.verb} {name}.")
            if operation.name == "approve":
                missing = approvals_missing(release_for_operation(release))
                if missing:
                    messages.info(
                        request,
                        f"{name} still needs {missing['approvals_required'] - missing['approved']} approval(s).",
                    )
            return True
        if operation.name == "promote":
            result = release_promote(release=release, user=request.user, wait_seconds=ADMIN_WAIT_SECONDS)
        else:
            result = release_rollback(release=release, user=request.user, wait_seconds=ADMIN_WAIT_SECONDS)
    except ApiError as exc:
        messages.error(request, f"{name}: {exc.message}")
        return False
    return _report(request, result, operation)


def _report(request: HttpRequest, release: Release, operation: Operation) -> bool:
    name, stage = release.release_id, release.to_environment.stage
    if operation.name == "promote":
        if release.status == ReleaseStatus.PROMOTED:
            messages.success(request, f"{name} was promoted to {stage}.")
            return True
        if release.status == ReleaseStatus.PROMOTING:
            messages.info(request, f"{name} is being promoted to {stage} by a worker; reload to follow it.")
            return True
        messages.error(request, f"{name} failed on {stage}: {release.error_message or release.status}")
        return False
    if release.status == ReleaseStatus.ROLLED_BACK:
        messages.success(request, f"{name} was rolled back on {stage}.")
        return True
    if release.status == ReleaseStatus.ROLLING_BACK:
        messages.info(request, f"{name} is being rolled back on {stage} by a worker; reload to follow it.")
        return True
    messages.error(
        request, f"{name} was not rolled back on {stage}: {release.error_message or release.status}"
    )
    return False


# --- pipeline ---------------------------------------------------------------------------------------


def schema_fingerprint(environment: Environment) -> dict[str, str]:
    """The target's current portable fingerprint, or "unreachable" with a scrubbed reason."""
    try:
        with open_environment(environment) as target:
            return {"fingerprint": engine.fingerprint(engine.introspect(target)), "error": ""}
    except engine.TargetError as exc:
        return {"fingerprint": "", "error": str(exc) or "unreachable"}
    except Exception:  # a broken URL or key must not take the whole page down
        logger.warning("fingerprint of %s failed", environment, exc_info=True)
        return {"fingerprint": "", "error": "could not be read"}


def flag_differences(left: dict[str, Any], right: dict[str, Any]) -> list[dict[str, Any]]:
    """Flags whose value differs between two neighbouring environments (absent counts as a difference)."""
    missing = object()
    rows = []
    for name in sorted(set(left) | set(right)):
        a, b = left.get(name, missing), right.get(name, missing)
        if a != b:
            rows.append(
                {
                    "name": name,
                    "left": "(absent)" if a is missing else json.dumps(a),
                    "right": "(absent)" if b is missing else json.dumps(b),
                }
            )
    return rows


def pipeline_context(tenant: Tenant) -> dict[str, Any]:
    environments = {
        environment.stage: environment
        for environment in Environment.objects.filter(tenant=tenant).prefetch_related("flags")
    }
    columns = []
    flags = {}
    for stage in PIPELINE:
        environment = environments.get(stage)
        if environment is None:
            columns.append({"stage": stage, "environment": None})
            continue
        flags[stage] = flags_of(environment)
        waiting = list(
            Release.objects.filter(
                to_environment=environment,
                status__in=[ReleaseStatus.PREPARED, ReleaseStatus.PROMOTING, ReleaseStatus.ROLLING_BACK],
            )
            .select_related("to_environment", "from_environment", "created_by")
            .prefetch_related(Prefetch("approvals", queryset=Approval.objects.select_related("approver")))
            .order_by("created_at", "id")
        )
        live = live_release(environment=environment)
        columns.append(
            {
                "stage": stage,
                "environment": environment,
                "live": live,
                "live_url": reverse("admin:releases_release_change", args=[live.pk]) if live else "",
                "schema": schema_fingerprint(environment),
                "flags": {name: json.dumps(value) for name, value in sorted(flags[stage].items())},
                "waiting": [
                    {
                        "release": release,
                        "url": reverse("admin:releases_release_change", args=[release.pk]),
                        "missing": approvals_missing(release),
                        "unsafe_rules": unsafe_rules(release),
                    }
                    for release in waiting
                ],
            }
        )
    differences = []
    for left, right in zip(PIPELINE, PIPELINE[1:], strict=False):
        if left in flags and right in flags:
            differences.append(
                {"left": left, "right": right, "rows": flag_differences(flags[left], flags[right])}
            )
    return {"tenant": tenant, "columns": columns, "flag_differences": differences}
