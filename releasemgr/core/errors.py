"""releasemgr's one error vocabulary: `ApplicationError` carrying an `ErrorCode`.

Every layer raises these, from the engine up to the services; none of them knows HTTP. Each edge renders
the code its own way:
- the API: `releasemgr.api.STATUS_BY_CODE` maps every code to one HTTP status, in the envelope
  `{"success": false, "error": {"code", "message", "details"}}`;
- commands: `error: <code>: <message>` on stderr, exit code 1;
- the admin: an error message naming the code;
- the tool kernel: `ToolResult(ok=False, error_code=<code>)`;
- the approval-link pages: the page for the code, with the API's status.

`message` is always safe to show (scrubbed of secrets by whoever raised it); `details` maps field paths
(or other keys) to JSON-serialisable values.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    """Every code a refusal or failure can carry. A member equals its string, so stored codes
    (`Release.error_code`, audit payloads, `ToolResult.error_code`) compare with members directly."""

    # The request or bundle is wrong.
    VALIDATION_ERROR = "validation_error"
    UNSUPPORTED_TABLE = "unsupported_table"
    UNSAFE_MIGRATION = "unsafe_migration"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_ACCEPTABLE = "not_acceptable"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    # Who may do what.
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    RATE_LIMITED = "rate_limited"
    # The state does not allow it now.
    CONFLICT = "conflict"
    ENVIRONMENT_BUSY = "environment_busy"
    SCHEMA_DRIFT = "schema_drift"
    GATE = "gate"
    APPROVALS_MISSING = "approvals_missing"
    ROLLBACK_BLOCKED = "rollback_blocked"
    TARGET_REFUSED = "target_refused"
    # A dependency is down or busy.
    TARGET_UNREACHABLE = "target_unreachable"
    LOCK_TIMEOUT = "lock_timeout"
    BROKER_UNAVAILABLE = "broker_unavailable"
    JOB_UNAVAILABLE = "job_unavailable"
    # Work that ran and failed (also a failed release's `error_code`).
    APPLY_FAILED = "apply_failed"
    POST_VALIDATION_FAILED = "post_validation_failed"
    BACKUP_FAILED = "backup_failed"
    DRY_RUN_FAILED = "dry_run_failed"
    WORKER_LOST = "worker_lost"
    TIMEOUT = "timeout"
    TOOL_ERROR = "tool_error"
    MISCONFIGURED = "misconfigured"
    INTERNAL_ERROR = "internal_error"
    ERROR = "error"
    # Approval links (the page a person sees says which).
    LINK_INVALID = "invalid"
    LINK_FOREIGN = "foreign"
    LINK_STALE = "stale"
    LINK_UNKNOWN = "unknown"
    LINK_USED = "used"
    LINK_EXPIRED = "expired"
    LINK_INACTIVE = "inactive"
    LINK_OTHER_USER = "other_user"
    LINK_CLOSED = "closed"

    @classmethod
    def of(cls, value: str, default: ErrorCode) -> ErrorCode:
        """The member a stored code names (e.g. `Release.error_code`), or `default` for "" or an old one."""
        return cls._value2member_map_.get(value, default)  # type: ignore[return-value]


class ApplicationError(Exception):
    """A refusal or failure with a code, a message safe to show and details. No HTTP status."""

    code: ErrorCode = ErrorCode.ERROR

    def __init__(self, message: str, *, code: ErrorCode | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = ErrorCode(code)
        self.details: Any = details if details is not None else {}


class ValidationFailed(ApplicationError):
    code = ErrorCode.VALIDATION_ERROR


class NotFound(ApplicationError):
    code = ErrorCode.NOT_FOUND


class Forbidden(ApplicationError):
    code = ErrorCode.FORBIDDEN


class Conflict(ApplicationError):
    code = ErrorCode.CONFLICT


class PayloadTooLarge(ApplicationError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsafeMigration(ApplicationError):
    code = ErrorCode.UNSAFE_MIGRATION
