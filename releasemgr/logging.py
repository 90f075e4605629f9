"""Structured logs: one JSON line per event, request context attached, secrets scrubbed.

Wired in settings.LOGGING on the console handler, so every logger (Django's included) goes
through `RequestContextFilter` and `SecretScrubFilter` and is written by `JsonFormatter`.
Release services pass `extra={"release_id": ..., "tenant": ..., "environment": ...}`.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from releasemgr.context import client_address_var, request_id_var
from releasemgr.core.scrub import URL_SCHEME

# Credentials inside URLs (scheme://user:password@host), bearer tokens, this project's raw API
# tokens (rm_...), libpq-style password=..., Fernet ciphertexts of encrypted target URLs, and the
# signed token of an e-mail approval link (/approvals/<pk>/<token>/), a bearer credential that
# Django's own loggers (django.request, django.security.csrf, django.server) print with the path.
_SECRET_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # URL_SCHEME matches in linear time (`\b[a-z][a-z0-9+.-]*://` retried from every letter of a long
    # word: a 60 kB query string in a request log line took ~1 s, 20 kB of "a." 0.8 s).
    (re.compile(rf"(?P<scheme>{URL_SCHEME})[^\s/@'\"<>]+@", re.IGNORECASE), r"\g<scheme>***@"),
    (re.compile(r"\b(Authorization['\"]?\s*[:=]\s*['\"]?)[A-Za-z]+\s+[^\s'\",]+", re.I), r"\1***"),
    (re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE), "Bearer ***"),
    (re.compile(r"\brm_[A-Za-z0-9_-]{16,}"), "rm_***"),
    (
        re.compile(
            r"\b(password|passwd|pwd|secret|api_key|token)(\s*[=:]\s*)('[^']*'|\"[^\"]*\"|[^\s,;&]+)", re.I
        ),
        r"\1\2***",
    ),
    (re.compile(r"\bgAAAAA[A-Za-z0-9_=-]{20,}"), "***"),
    (re.compile(r"(/approvals/\d+/)[^/\s'\"<>?#]+"), r"\1***"),
]

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# Extras that are objects, not facts: Django puts the request and the socket on some records.
_SKIPPED_EXTRAS = {"request", "server_time", "socket"}
# The fields placed first, in this order, when present.
_CONTEXT_FIELDS = ("request_id", "release_id", "tenant", "environment")


def scrub_secrets(text: str) -> str:
    """The text with credentials, tokens and ciphertexts replaced by ***."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub_secrets(value)
    if isinstance(value, dict):
        return {key: _scrub_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value(item) for item in value]
    return value


class SecretScrubFilter(logging.Filter):
    """Scrub the formatted message, the extras and the traceback of every record before output."""

    _traceback_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = f"{record.msg!r} {record.args!r}"
        record.msg = scrub_secrets(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._traceback_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_secrets(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub_secrets(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_ATTRIBUTES:
                setattr(record, key, _scrub_value(value))
        return True


class RequestContextFilter(logging.Filter):
    """Attach the current request's id and client address (from releasemgr.context) when there is one."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            # Django logs 4xx/5xx responses after the middleware has left: the request still knows its id.
            request_id = request_id_var.get() or getattr(getattr(record, "request", None), "request_id", "")
            if request_id:
                record.request_id = request_id
        if not getattr(record, "client_address", None):
            address = client_address_var.get()
            if address:
                record.client_address = address
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the context and other extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extras = {
            key: value
            for key, value in vars(record).items()
            if key not in _RECORD_ATTRIBUTES and key not in _SKIPPED_EXTRAS and not key.startswith("_")
        }
        for field in _CONTEXT_FIELDS:
            if extras.get(field) not in (None, ""):
                entry[field] = extras.pop(field)
            else:
                extras.pop(field, None)
        entry.update(extras)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # Scrubbed here too, value by value: a formatter used without the filter leaks nothing either.
        return json.dumps(_scrub_value(entry), default=_json_default, ensure_ascii=False)


def _json_default(value: Any) -> str:
    return scrub_secrets(str(value))
