"""Reading targets on behalf of a service: the prod gate.

A target that cannot be opened, or stays locked, raises the engine's TargetError: an ApplicationError
whose code (`target_unreachable`, `lock_timeout`) the API answers with 503, its message scrubbed of the
URL, user, password and host. 503: the client may retry, and no Idempotency-Key keeps it. A target
releasemgr may not touch (TargetRefused: its own control database, another tenant's database, a
database other than the one the environment claimed, a SQLite file outside TARGETS_DIR) is
`target_refused`, 409: retrying changes nothing until the URL does."""

from __future__ import annotations

from typing import Any

from releasemgr.core.errors import Conflict, ErrorCode
from tenants.models import Environment
from tenants.targets import open_environment

from .. import engine


def target_verify(environment: Environment) -> None:
    """Open the environment's target once so that its identity is verified (and claimed) before a
    promotion or rollback is accepted: `target_refused` (TargetRefused) in the request, nothing
    started. An unreachable target is not refused here: the task reports it as it always did."""
    try:
        with open_environment(environment):
            pass
    except engine.TargetRefused:
        raise
    except engine.TargetError:
        return


def prod_gate_check(
    *, staging: Environment, fingerprint_after: str, schema_after: dict | None = None
) -> None:
    """Prod only ever becomes a schema that staging already runs (409 `gate` otherwise; staging
    refused or unreachable raises its TargetError)."""
    with open_environment(staging) as target:
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
            code=ErrorCode.GATE,
            details=details,
        )
