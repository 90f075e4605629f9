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

A reservation is a lease. It names its owner (host:pid:token) and expires IDEMPOTENCY_LEASE_SECONDS
(60 s) after it was taken; a heartbeat thread extends it every third of that while the view runs,
however long that is. A process that dies mid-request (SIGKILL, OOM, a lost host) stops extending it:
a retry of the same request while the lease is live is a 409 `idempotency_request_in_progress` with
Retry-After (the seconds until the lease lapses); a retry after it lapsed takes the key over with one
conditional UPDATE (still in progress, same owner, lease expired), so of concurrent retries exactly
one wins and runs the request once; the others see the new live lease. Storing the response, or
releasing the reservation, is conditional on still owning it. The price of a lease: a process that
stalls longer than the lease (its database unreachable for a minute, say) may find its request run
a second time by a retry; the release services' own conditional transitions still refuse the repeat
of a promote or rollback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import socket
import threading
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from releasemgr.core.errors import Conflict, ValidationFailed

logger = logging.getLogger(__name__)
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
    "twice; the same key with another request, or while the first is in progress, is a 409 `conflict` "
    "(in progress: with Retry-After). A request whose process died may be retried once its lease "
    "(IDEMPOTENCY_LEASE_SECONDS, 60 s) has lapsed. Keys expire after 24 h.",
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

    now = timezone.now()
    cutoff = now - (older_than if older_than is not None else ttl())
    deleted, _ = (
        IdempotencyRecord.objects.filter(created_at__lt=cutoff, **scope)
        .exclude(status_code__isnull=True, lease_expires_at__gt=now)  # a request still running keeps its key
        .delete()
    )
    return deleted


def lease_seconds() -> float:
    return float(settings.IDEMPOTENCY_LEASE_SECONDS)


def _new_owner() -> str:
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:16]}"


class _Heartbeat:
    """Extends the reservation's lease every third of IDEMPOTENCY_LEASE_SECONDS while the view runs."""

    def __init__(self, record_pk: int, owner: str) -> None:
        self.record_pk = record_pk
        self.owner = owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="idempotency-lease-heartbeat")

    def _run(self) -> None:
        from releases.models import IdempotencyRecord

        try:
            while not self._stop.wait(lease_seconds() / 3):
                try:
                    extended = IdempotencyRecord.objects.filter(
                        pk=self.record_pk, owner=self.owner, status_code__isnull=True
                    ).update(lease_expires_at=timezone.now() + timedelta(seconds=lease_seconds()))
                except Exception:  # the next beat retries; the lease outlives one missed beat
                    logger.warning("idempotency lease heartbeat failed", exc_info=True)
                    continue
                if not extended:  # taken over (this process stalled past the lease) or purged
                    logger.warning("idempotency lease lost by %s", self.owner)
                    return
        finally:
            connection.close()  # this thread's own connection

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _reserve(*, tenant, user, key: str, path: str, request_sha256: str):
    """Insert the reservation (committed at once), or take over a lapsed one of the same request.

    Returns (record, owner): owner is this request's token when it holds the reservation, None when
    another request's record was found (to refuse or replay)."""
    from releases.models import IdempotencyRecord

    purge_expired(tenant=tenant, user=user)
    owner = _new_owner()
    for _ in range(5):  # each round ends unless the record vanished or changed hands in between
        try:
            with transaction.atomic():
                record = IdempotencyRecord.objects.create(
                    tenant=tenant,
                    user=user,
                    key=key,
                    path=path[:200],
                    request_sha256=request_sha256,
                    owner=owner,
                    lease_expires_at=timezone.now() + timedelta(seconds=lease_seconds()),
                )
            return record, owner
        except IntegrityError:
            existing = IdempotencyRecord.objects.filter(tenant=tenant, user=user, key=key).first()
        if existing is None:  # released or purged between the insert and this read: try again
            continue
        if not _lapsed(existing, request_sha256=request_sha256):
            return existing, None
        if _take_over(existing, owner=owner):
            return existing, owner
        # Another retry took it over first: the next round reads its live lease.
    raise Conflict(
        f"A request with this {HEADER} is changing hands; retry in a moment.",
        details={"reason": "idempotency_request_in_progress"},
    )


def _lapsed(record, *, request_sha256: str) -> bool:
    """The same request, still without a response, its lease expired: its process is gone."""
    return (
        record.status_code is None
        and record.request_sha256 == request_sha256
        and record.lease_expires_at <= timezone.now()
    )


def _take_over(record, *, owner: str) -> bool:
    """One conditional UPDATE (the owner seen, still in progress, still lapsed): of concurrent
    retries exactly one becomes the new owner; the others update nothing."""
    now = timezone.now()
    deadline = now + timedelta(seconds=lease_seconds())
    taken = (
        type(record)
        .objects.filter(pk=record.pk, owner=record.owner, status_code__isnull=True, lease_expires_at__lte=now)
        .update(owner=owner, lease_expires_at=deadline)
    )
    if not taken:
        return False
    logger.warning(
        "Idempotency-Key of %s taken over from %s, whose lease lapsed at %s",
        record.path,
        record.owner or "an unknown owner",
        record.lease_expires_at.isoformat(),
    )
    record.owner, record.lease_expires_at = owner, deadline
    return True


def _refuse_or_replay(view, record, *, request_sha256: str) -> Response:
    if record.request_sha256 != request_sha256:
        raise Conflict(
            f"This {HEADER} was already used for another request.",
            details={"reason": "idempotency_key_reused", "path": record.path},
        )
    if record.status_code is None:
        wait = (record.lease_expires_at - timezone.now()).total_seconds()
        response = view.handle_exception(
            Conflict(
                f"A request with this {HEADER} is still in progress; retry when it has finished.",
                details={"reason": "idempotency_request_in_progress"},
            )
        )
        # Whole seconds until the lease lapses: then the request has finished or its process is gone.
        response["Retry-After"] = str(max(1, math.ceil(wait)))
        return response
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
        record, owner = _reserve(
            tenant=request.tenant,
            user=request.user,
            key=key,
            path=request.path,
            request_sha256=request_sha256,
        )
        if owner is None:
            return _refuse_or_replay(view, record, request_sha256=request_sha256)
        mine = type(record).objects.filter(pk=record.pk, owner=owner, status_code__isnull=True)
        try:
            with _Heartbeat(record.pk, owner):
                try:
                    response = handler(view, request, *args, **kwargs)
                except Exception as exc:
                    # Render the refusal in the envelope now, so that it can be stored and replayed.
                    response = view.handle_exception(exc)
        except BaseException:
            mine.delete()
            raise
        if not _storable(response):
            mine.delete()
            return response
        body_json = json.loads(JSONRenderer().render(response.data) or b"null")
        if not mine.update(status_code=response.status_code, response_body=body_json):
            logger.warning("Idempotency-Key of %s: lease lost before the response was stored", record.path)
        return response

    return extend_schema(parameters=[OPENAPI_PARAMETER])(wrapper)
