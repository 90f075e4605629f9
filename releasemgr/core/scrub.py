"""Secrets out of text: database URLs masked for display, error messages scrubbed before storing.

Part of the model-free core: the engine, the tool kernel and the log filter all import it.
"""

from __future__ import annotations

import re

# A URL's scheme (`postgres://`), in linear time: a match starts only where a run of scheme characters
# starts, and no part backtracks. `[a-z][a-z0-9+.-]*://` retried from every letter of a long word: one
# 500 kB tool argument held the GIL, and so the whole web process, for minutes.
URL_SCHEME = r"(?<![a-z0-9+.-])[0-9+.-]*+[a-z][a-z0-9+.-]*+://"
_URL_CREDENTIALS = re.compile(rf"(?P<scheme>{URL_SCHEME})(?P<userinfo>[^@/\s]*@)?(?P<host>[^/\s:?]*)")


def mask_url(url: str) -> str:
    """A database URL with user, password and host replaced: safe to show and log."""
    if not url:
        return ""
    if url.startswith("sqlite:"):
        return "sqlite:///***" + (url.rsplit("/", 1)[-1][-24:] if "/" in url else "")
    masked = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***@***", url, count=1)
    # libpq also takes user, password and host from the query string (?password=...): hide all of it.
    base, query, _ = masked.partition("?")
    return base + ("?***" if query else "")


def scrub(message: str, secrets: list[str] | None = None) -> str:
    """Remove URLs, hosts and user names from an error message before it is stored or shown."""
    text = _URL_CREDENTIALS.sub(lambda m: f"{m.group('scheme')}***", message)
    for secret in secrets or []:
        if secret:
            text = text.replace(secret, "***")
    text = re.sub(r'(host|user|password|dbname)(\s*=\s*|\s+")[^"\s]+', r"\1\2***", text, flags=re.I)
    text = re.sub(r'(for user|role|database) "[^"]+"', r'\1 "***"', text)
    text = re.sub(r'(server at|to server at) "[^"]+"', r'\1 "***"', text)
    return text
