"""`Idempotency-Key` on POSTs: a retried request gets the first response and nothing runs twice.

The key is scoped by tenant and user. The first request with a key reserves it (a committed row
without a response) before the view runs, so a concurrent duplicate finds the reservation and is
refused with 409 instead of running in parallel. When the view answers, the response (status and
body) is stored on the row and replayed for every retry that carries the same key and the same
request (method, path without trailing slash, canonical JSON body). The same key with another
request is a 409 `conflict` (`idempotency_key_reused`). Keys older than IDEMPOTENCY_KEY_TTL_SECONDS
(24 h) are purged and may be used again.

Not stored: server errors and refusals that say "try again later" (environment_busy, rate_limited):
the reservation is released so a retry with the same key runs for real.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from releasemgr.core.errors import Conflict, ValidationFailed

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 200
_KEY_PATTERN = re.compile(rf"^[\x21-\x7e]{{1,{MAX_KEY_LENGTH}}}$")  # visible ASCII, no spaces
OPENAPI_PARAMETER = OpenApiParameter(
    name=HEADER,
    type=str,
    location=OpenApiParameter.HEADER,
    required=False,
    pattern=_KEY_PATTERN.pattern,
    description="Optional, 1 to 200 visible ASCII characters, scoped to the tenant and user: a retry with "
    "the same key and body gets the first response (header Idempotent-Replayed: true) and runs nothing "
    "twice; the same key with another request, or while the first is in progress, is a 409 `conflict`. "
    "Keys expire after 24 h.",
)
# Refusals a client is told to retry: storing them would make the retry fail forever.
TRANSIENT_ERROR_CODES = frozenset({"environment_busy", "rate_limited"})


def ttl() -> timedelta:
    return timedelta(seconds=getattr(settings, "IDEMPOTENCY_KEY_TTL_SECONDS", 24 * 3600))


def request_fingerprint(*, method: str, path: str, body: Any) -> str:
    """SHA-256 of method, path (trailing slash ignored) and the canonical JSON of the body."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    text = f"{method.upper()}\n{path.rstrip('/') or '/'}\n{canonical}"
    return hashlib.sha256(text.encode()).hexdigest()


def key_from(request: Request) -> str | None:
    """The request's Idempotency-Key, None without one; a malformed key is a 400."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not _KEY_PATTERN.match(key):
        raise ValidationFailed(
            f"{HEADER} must be 1 to {MAX_KEY_LENGTH} visible ASCII characters.",
            details={HEADER: f"1 to {MAX_KEY_LENGTH} visible ASCII characters, no spaces."},
        )
    return key


def purge_expired(*, older_than: timedelta | None = None, **scope: Any) -> int:
    """Delete records older than the TTL (optionally only those of a tenant/user); returns the count."""
    from releases.models import IdempotencyRecord

    cutoff = timezone.now() - (older_than if older_than is not None else ttl())
    deleted, _ = IdempotencyRecord.objects.filter(created_at__lt=cutoff, **scope).delete()
    return deleted


def _reserve(*, tenant, user, key: str, path: str, request_sha256: str):
    """Insert the reservation (committed at once) or return the existing record for that key."""
    from releases.models import IdempotencyRecord

    purge_expired(tenant=tenant, user=user)
    try:
        with transaction.atomic():
            record = IdempotencyRecord.objects.create(
                tenant=tenant, user=user, key=key, path=path[:200], request_sha256=request_sha256
            )
        return record, True
    except IntegrityError:
        existing = IdempotencyRecord.objects.filter(tenant=tenant, user=user, key=key).first()
        if existing is None:  # released or purged between the insert and this read: one more try
            return _reserve(tenant=tenant, user=user, key=key, path=path, request_sha256=request_sha256)
        return existing, False


def _refuse_or_replay(record, *, request_sha256: str) -> Response:
    if record.request_sha256 != request_sha256:
        raise Conflict(
            f"This {HEADER} was already used for another request.",
            details={"reason": "idempotency_key_reused", "path": record.path},
        )
    if record.status_code is None:
        raise Conflict(
            f"A request with this {HEADER} is still in progress; retry when it has finished.",
            details={"reason": "idempotency_request_in_progress"},
        )
    return Response(record.response_body, status=record.status_code, headers={REPLAYED_HEADER: "true"})


def _storable(response: Response) -> bool:
    if response.status_code >= 500:
        return False
    data = response.data if isinstance(response.data, dict) else {}
    error = data.get("error") if isinstance(data.get("error"), dict) else {}
    return error.get("code") not in TRANSIENT_ERROR_CODES


def idempotent(handler):
    """Decorate an APIView's `post`: honour `Idempotency-Key` for the authenticated tenant and user."""

    @functools.wraps(handler)
    def wrapper(view, request: Request, *args: Any, **kwargs: Any) -> Response:
        key = key_from(request)
        if key is None:
            return handler(view, request, *args, **kwargs)
        body = request.data  # parse first: a body that is not JSON is refused before any reservation
        request_sha256 = request_fingerprint(method=request.method, path=request.path, body=body)
        record, reserved = _reserve(
            tenant=request.tenant,
            user=request.user,
            key=key,
            path=request.path,
            request_sha256=request_sha256,
        )
        if not reserved:
            return _refuse_or_replay(record, request_sha256=request_sha256)
        try:
            try:
                response = handler(view, request, *args, **kwargs)
            except Exception as exc:
                # Render the refusal in the envelope now, so that it can be stored and replayed.
                response = view.handle_exception(exc)
        except BaseException:
            record.delete()
            raise
        if not _storable(response):
            record.delete()
            return response
        body_json = json.loads(JSONRenderer().render(response.data) or b"null")
        type(record).objects.filter(pk=record.pk).update(
            status_code=response.status_code, response_body=body_json
        )
        return response

    return extend_schema(parameters=[OPENAPI_PARAMETER])(wrapper)
