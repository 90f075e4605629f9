"""Applying a release's recorded changes: the statements saved at prepare, checked, then run.

Shared by the promotion (releases.services) and the tool kernel's `db.migrate` executor, so both
run exactly the SQL that was prepared and approved (`sql_sha256`) with the environment's timeouts,
and neither imports the other.
"""

from __future__ import annotations

from typing import Any

from releasemgr.core.errors import ErrorCode

from . import engine
from .models import Release


def recorded_changes(release: Release) -> list[dict]:
    """The changes as recorded at prepare, in order, with their forward and rollback statements."""
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
    changes = recorded_changes(release)
    if engine.statements_sha256(changes) != release.sql_sha256:
        raise engine.EngineError(
            ErrorCode.SCHEMA_DRIFT,
            "the recorded statements differ from the ones prepared and approved (sql_sha256); nothing was run",
        )
    return changes


def release_apply_recorded(target: Any, release: Release, *, changes: list[dict]) -> engine.ApplyResult:
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


def history_has(target: Any, release: Release, direction: str) -> bool:
    """Did this release's last recorded transaction in the target go in `direction`?"""
    return last_direction(engine.history(target), release) == direction


def last_direction(history: list[dict], release: Release) -> str | None:
    """The direction of the release's last row in a target's `_rm_history`, None if it has none."""
    rows = [row for row in history if row["release_pk"] == release.pk]
    return rows[-1]["direction"] if rows else None
