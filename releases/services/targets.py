"""Reading targets on behalf of a service: the prod gate, and target errors refused in the envelope."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from releasemgr.api import ApiError, Conflict
from tenants.models import Environment
from tenants.targets import open_environment

from .. import engine


@contextlib.contextmanager
def target_refusal() -> Iterator[None]:
    """A target that cannot be opened, or stays locked, refuses the request in the envelope: 503 with
    the TargetError's code (`target_unreachable`, `lock_timeout`) and its message, scrubbed of the
    URL, user, password and host. 503: the client may retry, and no Idempotency-Key keeps it.

    A target releasemgr may not touch (`TargetRefused`: its own control database, another tenant's
    database, a database other than the one the environment claimed, a SQLite file outside
    TARGETS_DIR) is 409 `target_refused`: retrying changes nothing until the URL does."""
    try:
        yield
    except engine.TargetRefused as exc:
        raise Conflict(exc.message, code=exc.code) from None
    except engine.TargetError as exc:
        raise ApiError(exc.message, code=exc.code, status_code=503) from None


def target_verify(environment: Environment) -> None:
    """Open the environment's target once so that its identity is verified (and claimed) before a
    promotion or rollback is accepted: 409 `target_refused` in the request, nothing started. An
    unreachable target is not refused here: the task reports it as it always did."""
    try:
        with open_environment(environment):
            pass
    except engine.TargetRefused as exc:
        raise Conflict(exc.message, code=exc.code) from None
    except engine.TargetError:
        return


def prod_gate_check(
    *, staging: Environment, fingerprint_after: str, schema_after: dict | None = None
) -> None:
    """Prod only ever becomes a schema that staging already runs (409 `gate` otherwise; staging
    refused or unreachable as `target_refusal` says)."""
    with target_refusal(), open_environment(staging) as target:
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
