"""Reading targets on behalf of a service: the prod gate.

A target that cannot be opened, or stays locked, raises the engine's TargetError: an ApplicationError
whose code (`target_unreachable`, `lock_timeout`) the API answers with 503, its message scrubbed of the
URL, user, password and host. 503: the client may retry, and no Idempotency-Key keeps it."""

from __future__ import annotations

from typing import Any

from releasemgr.core.errors import Conflict, ErrorCode
from tenants.models import Environment

from .. import engine


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
            code=ErrorCode.GATE,
            details=details,
        )
