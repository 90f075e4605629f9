"""Per-request context (request id, client address) for audit events and logs."""

from __future__ import annotations

import contextvars
import uuid

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
client_address_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "client_address", default=None
)


class RequestContextMiddleware:
    """Give every request an id (X-Request-ID if the client sent a sane one) and remember its address."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.META.get("HTTP_X_REQUEST_ID", "")
        request_id = incoming if incoming.isascii() and 0 < len(incoming) <= 64 else uuid.uuid4().hex
        request.request_id = request_id
        token_id = request_id_var.set(request_id)
        token_address = client_address_var.set(request.META.get("REMOTE_ADDR") or None)
        try:
            response = self.get_response(request)
        finally:
            request_id_var.reset(token_id)
            client_address_var.reset(token_address)
        response["X-Request-ID"] = request_id
        return response
