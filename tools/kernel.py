"""The tool kernel: agents and the release services call tools through it, and every call leaves a transcript.

    result = tool_kernel.execute(ToolCall(id="mig_1", tool="db.migrate", args={...}), ToolContext(tenant=t))

`execute` never raises for a bad call: it returns `ToolResult(ok=False, error=..., error_code=...)`
and stores a `ToolTranscript` for every call, failed ones included. Order of checks: the tool must
exist, the environment and release must be the tenant's, the caller's role must suffice (before
the arguments are looked at, so a caller without the role learns nothing from validation), the
arguments must validate; then the handler runs. Handler exceptions are recorded with their
message scrubbed of hosts, users and passwords, never a traceback.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from releasemgr.core.errors import ErrorCode
from releasemgr.core.scrub import scrub
from tenants.models import Membership

from .errors import ToolFailure, ToolRefused, ToolValidationError
from .ids import new_call_id, new_transcript_id
from .models import ToolTranscript
from .redaction import redact
from .registry import Tool, ToolRegistry, registry

if TYPE_CHECKING:
    from releases.models import Release
    from tenants.models import Environment, Tenant

logger = logging.getLogger(__name__)

# Error codes a ToolResult carries: validation_error (bad tool name or arguments), forbidden (role,
# tenant, or an apply outside the executor), not_found, tool_error (the handler failed), or an
# engine code (schema_drift, lock_timeout, apply_failed, ...) passed through from db.migrate.


@dataclass
class ToolCall:
    """One request to run a tool: a caller-chosen id, the tool's name and its arguments."""

    id: str
    tool: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolContext:
    """Who calls, for which tenant, environment and release; dry_run unless said otherwise.

    `user=None` means an in-process caller (the release services, Celery tasks) that has
    already checked the role. `executor=True` is set only by the release executor: it is the one
    place where `db.migrate` may apply (`dry_run: false`), because only there have approvals,
    lint and the prod gate been checked.
    """

    tenant: Tenant
    environment: Environment | None = None
    user: Any = None
    release: Release | None = None
    dry_run: bool = True
    executor: bool = False


@dataclass
class ToolResult:
    """The outcome of a call; `transcript_id` names the stored transcript."""

    ok: bool
    data: Any = None
    error: str | None = None
    transcript_id: str = ""
    error_code: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class ToolKernel:
    """Validates, checks the role, runs the handler, stores the transcript."""

    def __init__(self, tool_registry: ToolRegistry | None = None) -> None:
        self.registry = tool_registry if tool_registry is not None else registry

    def execute(self, call: ToolCall, ctx: ToolContext) -> ToolResult:
        if getattr(ctx, "tenant", None) is None or getattr(ctx.tenant, "pk", None) is None:
            # A programming error, not a bad call: without a tenant there is nowhere to record it.
            raise ValueError("ToolContext.tenant must be a saved Tenant")
        started = time.perf_counter()
        transcript_id = new_transcript_id()
        call_id = str(call.id) if call.id not in (None, "") else new_call_id()
        dry_run = bool(ctx.dry_run)
        if isinstance(call.args, dict) and isinstance(call.args.get("dry_run"), bool):
            dry_run = call.args["dry_run"]  # what the call asked for, even if it is refused
        data: Any = None
        error: str | None = None
        error_code: str | None = None
        details: dict[str, Any] = {}
        tool: Tool | None = None
        try:
            if not isinstance(call.args, dict):
                message = "args must be a JSON object."
                raise ToolValidationError(message, details={"args": [message]})
            tool = self.registry.get(call.tool)
            _check_context(ctx)
            _check_role(tool, ctx)
            args = tool.validate(call.args)
            requested = args.pop("dry_run", None)
            dry_run = bool(ctx.dry_run) if requested is None else bool(requested)
            data = tool.run(args, ctx, call=ToolCall(id=call_id, tool=call.tool, args=args), dry_run=dry_run)
        except ToolFailure as exc:
            error, error_code, details = scrub(exc.message, _secrets(ctx)), exc.code, exc.details
            data = exc.data
        except Exception as exc:  # a handler bug or an outside failure: recorded, never raised
            error = scrub(f"{type(exc).__name__}: {exc}", _secrets(ctx))
            error_code = ErrorCode.TOOL_ERROR
            logger.warning("tool %s call %s failed: %s", call.tool, call_id, error)
        ok = error is None
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        stored_result: Any
        if ok:
            stored_result = redact(tool.summarize(data) if tool and tool.summarize else data)
        else:
            failure = {"details": details, "data": data}
            stored_result = redact({key: value for key, value in failure.items() if value}) or None
        ToolTranscript.objects.create(
            transcript_id=transcript_id,
            tenant=ctx.tenant,
            environment=ctx.environment if _same_tenant(ctx.environment, ctx) else None,
            release=ctx.release if _same_tenant(ctx.release, ctx) else None,
            user=ctx.user if getattr(ctx.user, "pk", None) is not None else None,
            call_id=call_id[:100],
            tool=str(call.tool)[:64],
            args=redact(call.args) if isinstance(call.args, dict) else {"_invalid": redact(call.args)},
            ok=ok,
            result=stored_result,
            error=error or "",
            error_code=error_code or "",
            dry_run=dry_run,
            duration_ms=duration_ms,
        )
        return ToolResult(
            ok=ok,
            data=data,
            error=error,
            transcript_id=transcript_id,
            error_code=error_code,
            details=details,
        )


def _same_tenant(obj: Any, ctx: ToolContext) -> bool:
    return obj is not None and getattr(obj, "tenant_id", None) == ctx.tenant.pk


def _check_context(ctx: ToolContext) -> None:
    """The environment and release must be the tenant's own, and agree with each other."""
    if ctx.environment is not None and not _same_tenant(ctx.environment, ctx):
        raise ToolRefused("The environment does not belong to this tenant.")
    if ctx.release is not None:
        if not _same_tenant(ctx.release, ctx):
            raise ToolRefused("The release does not belong to this tenant.")
        if ctx.environment is None:
            ctx.environment = ctx.release.to_environment


def _check_role(tool: Tool, ctx: ToolContext) -> None:
    user = ctx.user
    if user is None:
        return  # in-process caller (release services, tasks): the service checked the role
    if not getattr(user, "is_authenticated", False) or not getattr(user, "is_active", False):
        raise ToolRefused("Authentication is required to run tools.")
    if user.is_superuser:
        return
    membership = Membership.objects.filter(tenant=ctx.tenant, user=user).first()
    if membership is None:
        raise ToolRefused(f"{user.get_username()} is not a member of tenant {ctx.tenant.slug}.")
    if not membership.has_role(tool.min_role):
        raise ToolRefused(
            f"{tool.name} needs the {tool.min_role} role; {user.get_username()} is {membership.role} "
            f"in {ctx.tenant.slug}."
        )


def _secrets(ctx: ToolContext) -> list[str]:
    """Strings to blank out of error messages: the target URL, its password and host.

    User names are left to `scrub`'s patterns (`user "x"`, `role "x"`): a plain replace of a
    user like `postgres` would mangle words such as `postgresql`.
    """
    environment = ctx.environment
    if environment is None or not getattr(environment, "database_url_encrypted", ""):
        return []
    try:
        url = environment.database_url
    except Exception:  # a key problem must not hide the original error
        return []
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return [
        value
        for value in (url, parts.password, parts.hostname)
        if value and len(value) >= 3 and value not in ("localhost",)
    ]


tool_kernel = ToolKernel()


def run_tool(
    tool: str,
    args: dict[str, Any],
    *,
    tenant: Tenant,
    environment: Environment | None = None,
    user: Any = None,
    release: Release | None = None,
    dry_run: bool = False,
    executor: bool = False,
) -> ToolResult:
    """Run one tool for the release services (their side effects go through here).

    Not dry-run by default: the services mean it. The transcript is linked to `release`, so the
    manifest's `tools_transcript_ids` can list it (`tools.selectors.transcript_ids_for_release`).
    """
    ctx = ToolContext(
        tenant=tenant, environment=environment, user=user, release=release, dry_run=dry_run, executor=executor
    )
    return tool_kernel.execute(ToolCall(id=new_call_id(), tool=tool, args=dict(args)), ctx)
