"""Secrets out of what transcripts store: by key name and by value shape."""

from __future__ import annotations

import datetime
import decimal
import json
import re
import uuid
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

from releasemgr.core.scrub import URL_SCHEME, scrub

REDACTED = "***"

# A key holds a secret whatever its value when one of its words (split on "_", "-", "." and
# camelCase, plural "s" dropped) is one of these: passwords, tokens, database URLs, and links
# (approval links carry a single-use nonce).
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "token",
        "secret",
        "url",
        "uri",
        "dsn",
        "apikey",
        "authorization",
        "auth",
        "credential",
        "nonce",
        "signature",
        "link",
        "cookie",
        "passphrase",
    }
)
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key")})
_WORD_SPLIT = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
# scheme://user@host or scheme://user:password@host anywhere in a string (linear time, see URL_SCHEME).
_URL_WITH_CREDENTIALS = re.compile(rf"{URL_SCHEME}[^/\s@]++@", re.IGNORECASE)


def is_secret_key(key: object) -> bool:
    words = [w.removesuffix("s") for w in _WORD_SPLIT.split(_CAMEL.sub("_", str(key)).lower()) if w]
    if any(word in _SECRET_WORDS for word in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False))


def redact(value: Any) -> Any:
    """A JSON-safe copy of `value` with secret keys replaced and credentials scrubbed from strings."""
    if isinstance(value, dict):
        return {
            str(key): (REDACTED if is_secret_key(key) and item not in (None, "") else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return scrub(value) if _URL_WITH_CREDENTIALS.search(value) else value
    return to_json_safe(value)


def to_json_safe(value: Any) -> Any:
    """Scalars a JSONField can store: dates as ISO 8601, decimals as strings, else str()."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime.datetime | datetime.date | datetime.time | decimal.Decimal | uuid.UUID):
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder))
    if isinstance(value, dict | list | tuple):
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder, default=str))
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def jsonable(value: Any) -> Any:
    """`value` as plain JSON types (for API responses): bytes as base64, other objects as str()."""

    def fallback(obj: Any) -> Any:
        if isinstance(obj, bytes | bytearray | memoryview):
            import base64

            return base64.b64encode(bytes(obj)).decode()
        if isinstance(obj, set | frozenset | tuple):
            return list(obj)
        return str(obj)

    class _Encoder(DjangoJSONEncoder):
        def default(self, obj: Any) -> Any:
            try:
                return super().default(obj)
            except TypeError:
                return fallback(obj)

    return json.loads(json.dumps(value, cls=_Encoder))
