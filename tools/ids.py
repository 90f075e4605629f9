"""Sortable unique ids for transcripts and calls (ULID-like: 48-bit ms time + 80 random bits)."""

from __future__ import annotations

import secrets
import threading
import time

# Crockford's base32: no I, L, O, U, so ids read unambiguously; sorts like the numbers it encodes.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_RANDOM_BITS = 80
_lock = threading.Lock()
_last_ms = -1
_last_random = 0


def _encode(value: int, length: int) -> str:
    chars = []
    for _ in range(length):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_ulid() -> str:
    """A 26-character id that sorts by creation time; monotonic within this process.

    Two ids made in the same millisecond keep their order because the second one's random
    part is the first one's plus one (the ULID spec's monotonic mode).
    """
    global _last_ms, _last_random
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _last_ms:
            now_ms = _last_ms
            random_part = (_last_random + 1) % (1 << _RANDOM_BITS)
        else:
            random_part = secrets.randbits(_RANDOM_BITS)
        _last_ms, _last_random = now_ms, random_part
    return _encode(now_ms, 10) + _encode(random_part, 16)


def new_transcript_id() -> str:
    return "tr_" + new_ulid()


def new_call_id() -> str:
    return "call_" + new_ulid()
