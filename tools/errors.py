"""Failures a tool handler raises on purpose; anything else is an unexpected handler error."""

from __future__ import annotations

from typing import Any

from releasemgr.core.errors import ApplicationError, ErrorCode


class ToolFailure(ApplicationError):
    """A clean failure of a tool call: `message` is safe to show, `code` classifies it."""

    code = ErrorCode.TOOL_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        details: dict[str, Any] | None = None,
        data: Any = None,
    ) -> None:
        super().__init__(message, code=code, details=details or {})
        # What the handler found before failing (e.g. a failed dry-run's SQL and errors).
        self.data = data


class ToolValidationError(ToolFailure):
    """The call's arguments are wrong; `details` maps field paths to messages."""

    code = ErrorCode.VALIDATION_ERROR


class ToolRefused(ToolFailure):
    """The caller may not make this call (role, tenant, or an apply outside the release executor)."""

    code = ErrorCode.FORBIDDEN


class ToolNotFound(ToolFailure):
    """The call names a release or environment the tenant does not have."""

    code = ErrorCode.NOT_FOUND
