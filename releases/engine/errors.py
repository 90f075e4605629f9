"""Errors raised by the migration engine; every message is safe to show (scrubbed of secrets)."""

from __future__ import annotations

from typing import Any


class BundleError(ValueError):
    """The bundle is not valid; `details` maps field paths to messages."""

    def __init__(self, message: str, details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, str] = dict(details or {})


class TargetError(RuntimeError):
    """The target database cannot be opened or reached (message scrubbed)."""

    code = "target_unreachable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PlanError(ValueError):
    """The changes cannot be planned against this schema (`validation_error` or `unsupported_table`)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})


class EngineError(RuntimeError):
    """Applying or rolling back failed; the target is unchanged unless the code says otherwise."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})
