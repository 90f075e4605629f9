"""Per-request context (request id, client address) for audit events and logs."""

from __future__ import annotations

import contextvars
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
client_address_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "client_address", default=None
)


def client_address(request) -> str | None:
    """The address a request came from, as every throttle and lockout counts it: REMOTE_ADDR.

    X-Forwarded-For is never read: any client can send it, and would get a fresh budget per value.
    Behind a reverse proxy REMOTE_ADDR is the proxy's unless the server in front of Django sets it
    to the client's (README, "Throttling and lockout").
    """
    return request.META.get("REMOTE_ADDR") or None


class RequestContextMiddleware:
    """Give every request an id (X-Request-ID if the client sent a sane one) and remember its address."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = incoming if incoming.isascii() and 0 < len(incoming) <= 64 else uuid.uuid4().hex
        request.request_id = request_id
        token_id = request_id_var.set(request_id)
        token_address = client_address_var.set(client_address(request))
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token_id)
            client_address_var.reset(token_address)
        response["X-Request-ID"] = request_id
        return response
