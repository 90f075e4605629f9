"""Encryption at rest for target database URLs (cryptography's MultiFernet)."""

from __future__ import annotations

from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


@lru_cache(maxsize=4)
def _fernet(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(key.encode()) for key in keys])


def fernet() -> MultiFernet:
    return _fernet(tuple(settings.FIELD_ENCRYPTION_KEYS))


def encrypt(plaintext: str) -> str:
    return fernet().encrypt(plaintext.encode()).decode()


def decrypt(ciphertext: str) -> str:
    try:
        return fernet().decrypt(ciphertext.encode()).decode()
    except InvalidToken as exc:  # pragma: no cover - a wrong key is an operator error
        raise ValueError("cannot decrypt: none of FIELD_ENCRYPTION_KEYS fits") from exc


def rotate(ciphertext: str) -> str:
    """Re-encrypt with the first key (MultiFernet.rotate)."""
    return fernet().rotate(ciphertext.encode()).decode()
