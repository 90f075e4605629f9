"""Errors raised by the migration engine; every message is safe to show (scrubbed of secrets).

All are `releasemgr.core.errors.ApplicationError`s: they carry an `ErrorCode` and no HTTP status.
"""

from __future__ import annotations

from typing import Any

from releasemgr.core.errors import ApplicationError, ErrorCode


class BundleError(ApplicationError, ValueError):
    """The bundle is not valid; `details` maps field paths to messages."""

    code = ErrorCode.VALIDATION_ERROR

    def __init__(self, message: str, details: dict[str, str] | None = None) -> None:
        super().__init__(message, details=dict(details or {}))


class TargetError(ApplicationError, RuntimeError):
    """The target database cannot be opened or reached (message scrubbed)."""

    code = ErrorCode.TARGET_UNREACHABLE

    def __init__(self, message: str) -> None:
        super().__init__(message)


class TargetRefused(TargetError):
    """The target is reachable but is not one releasemgr may touch (`target_refused`): releasemgr's own
    control database, a database another tenant's environment already claimed, a database other than
    the one this environment was first opened on, or a SQLite file outside TARGETS_DIR."""

    code = ErrorCode.TARGET_REFUSED


class PlanError(ApplicationError, ValueError):
    """The changes cannot be planned against this schema (`validation_error` or `unsupported_table`)."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code, details=dict(details or {}))


class EngineError(ApplicationError, RuntimeError):
    """Applying or rolling back failed; the target is unchanged unless the code says otherwise."""

    def __init__(self, code: ErrorCode, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message, code=code, details=dict(details or {}))


class TargetLockedError(EngineError, TargetError):
    """The target stayed locked by another session past the lock budget (`lock_timeout`).

    Both an EngineError and a TargetError, so callers that handle either (prepare handles target
    errors, promote and rollback engine errors) report it without a special case.
    """

    code = ErrorCode.LOCK_TIMEOUT

    def __init__(self, message: str) -> None:
        ApplicationError.__init__(self, message, code=ErrorCode.LOCK_TIMEOUT)


def is_lock_error(vendor: str, exc: BaseException) -> bool:
    """Whether a driver error means "another session holds the lock" (SQLite busy, PG lock_timeout)."""
    cause = exc.__cause__ or exc
    if vendor == "postgresql":
        return getattr(cause, "pgcode", None) == "55P03" or "lock timeout" in str(exc)
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text
