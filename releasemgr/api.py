"""The API's edges shared by every app: the error envelope, errors, JSON parsing."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import orjson
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.utils import encoders

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A refusal with an error code, an HTTP status and details, rendered in the envelope."""

    code = "error"
    status_code = status.HTTP_400_BAD_REQUEST

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status_code: int | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.details = details if details is not None else {}


class ValidationFailed(ApiError):
    code = "validation_error"
    status_code = 400


class NotFound(ApiError):
    code = "not_found"
    status_code = 404


class Forbidden(ApiError):
    code = "forbidden"
    status_code = 403


class Conflict(ApiError):
    code = "conflict"
    status_code = 409


class PayloadTooLarge(ApiError):
    code = "payload_too_large"
    status_code = 413


class UnsafeMigration(ApiError):
    code = "unsafe_migration"
    status_code = 422


def success(data: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response({"success": True, "data": data}, status=status_code, headers=headers)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "message": message, "details": details or {}}}


_DRF_CODES = {
    exceptions.NotAuthenticated: ("unauthorized", 401),
    exceptions.AuthenticationFailed: ("unauthorized", 401),
    exceptions.PermissionDenied: ("forbidden", 403),
    exceptions.NotFound: ("not_found", 404),
    exceptions.MethodNotAllowed: ("method_not_allowed", 405),
    exceptions.NotAcceptable: ("not_acceptable", 406),
    exceptions.UnsupportedMediaType: ("unsupported_media_type", 415),
    exceptions.Throttled: ("rate_limited", 429),
    exceptions.ParseError: ("validation_error", 400),
    exceptions.ValidationError: ("validation_error", 400),
}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Render every refusal in the envelope; unexpected errors become a 500 without a traceback."""
    if isinstance(exc, ApiError):
        return Response(error_body(exc.code, exc.message, exc.details), status=exc.status_code)
    if isinstance(exc, Http404):
        return Response(error_body("not_found", "Not found."), status=404)
    if isinstance(exc, PermissionDenied):
        return Response(error_body("forbidden", "You do not have permission to do this."), status=403)
    if isinstance(exc, RequestDataTooBig):
        return Response(error_body("payload_too_large", "The request body is too large."), status=413)
    for exc_class, (code, status_code) in _DRF_CODES.items():
        if isinstance(exc, exc_class):
            headers = {}
            if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
                headers["Retry-After"] = str(exc.wait)  # whole seconds: DRF rounds the wait up
            if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
                headers["WWW-Authenticate"] = 'Bearer realm="api"'
            detail = exc.detail if isinstance(exc, exceptions.ValidationError) else {}
            message = _message(exc)
            return Response(error_body(code, message, detail), status=status_code, headers=headers)
    if isinstance(exc, exceptions.APIException):
        return Response(error_body("error", _message(exc)), status=exc.status_code)
    logger.exception("unhandled error in %s", context.get("view").__class__.__name__)
    return Response(error_body("internal_error", "An internal error occurred."), status=500)


def _message(exc: exceptions.APIException) -> str:
    detail = exc.detail
    if isinstance(detail, str):
        return str(detail)
    if isinstance(exc, exceptions.ValidationError):
        return "The request is not valid."
    return str(exc.default_detail)


class LimitedJSONParser(JSONParser):
    """JSON with a size limit (RELEASE_MAX_BODY_BYTES): a larger body is a 413, never parsed."""

    def parse(self, stream, media_type=None, parser_context=None):
        from django.conf import settings

        limit = settings.RELEASE_MAX_BODY_BYTES
        request = (parser_context or {}).get("request")
        declared = request.META.get("CONTENT_LENGTH") if request is not None else None
        if declared and str(declared).isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.", details={"limit": limit})
        raw = stream.read(limit + 1) if stream is not None else b""
        if len(raw) > limit:
            raise PayloadTooLarge(f"The request body is larger than {limit} bytes.", details={"limit": limit})
        if not raw.strip():
            return {}
        try:
            document = json.loads(
                raw.decode((parser_context or {}).get("encoding") or "utf-8"), parse_constant=_reject_constant
            )
        except RecursionError:
            raise _too_deep() from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise exceptions.ParseError(f"The body is not valid JSON: {exc}")
        _refuse_unstorable(document)
        return document


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# Deeper than any bundle or tool call (about 8 levels); far below what json and jsonb recurse into.
MAX_JSON_DEPTH = 64
# JSON can spell them (\u0000, a lone \ud800), but PostgreSQL keeps no NUL in text or jsonb and a
# lone surrogate is not UTF-8: either would fail as a 500 where it is stored or rendered.
_UNSTORABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")


def _too_deep() -> ValidationFailed:
    return ValidationFailed(
        f"The body nests deeper than {MAX_JSON_DEPTH} levels.",
        details={"body": f"At most {MAX_JSON_DEPTH} levels."},
    )


def _escaped(text: str) -> str:
    return _UNSTORABLE_CHARACTER.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def _refuse_unstorable(document: Any) -> None:
    """A 400 for a body nested deeper than MAX_JSON_DEPTH, or with a NUL or lone surrogate in a string
    (key or value); details name where, as `a.b[0]`. Iterative: the depth is what is being checked."""
    pending = [(document, "", 1)]
    while pending:
        value, path, depth = pending.pop()
        if isinstance(value, str):
            if _UNSTORABLE_CHARACTER.search(value):
                raise ValidationFailed(
                    "The body contains a NUL (\\u0000) or unpaired surrogate (\\ud800-\\udfff) character.",
                    details={path or "body": "NUL and unpaired surrogate characters are not allowed."},
                )
            continue
        if isinstance(value, dict | list) and depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(value, dict):
            for key, item in value.items():
                pending.append((key, path or "body", depth))
                pending.append((item, f"{path}.{_escaped(key)}" if path else _escaped(key), depth + 1))
        elif isinstance(value, list):
            pending.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))


class AnyContentJSONParser(LimitedJSONParser):
    """Parse the body as JSON whatever Content-Type says: the guide's curl examples send none."""

    media_type = "*/*"


def _api_or_html(request, code: str, message: str, status_code: int, html_view, exception):
    """Django's own error pages, except under /api/, which answers in the envelope like every API error."""
    if request.path.startswith("/api/"):
        from django.http import JsonResponse

        return JsonResponse(error_body(code, message), status=status_code)
    return html_view(request, exception)


def not_found(request, exception=None):
    """handler404: a path under /api/ that matches no route answers in the envelope."""
    from django.views.defaults import page_not_found

    return _api_or_html(request, "not_found", "No API endpoint at this path.", 404, page_not_found, exception)


def bad_request(request, exception=None):
    """handler400: a request Django refuses before any view (an invalid Host header, say)."""
    from django.views.defaults import bad_request as html_bad_request

    return _api_or_html(
        request, "validation_error", "The request is malformed.", 400, html_bad_request, exception
    )


class FastJSONRenderer(JSONRenderer):
    """DRF's JSON renderer with orjson doing the encoding: the same bytes for what the API returns
    (compact, UTF-8), several times faster on list pages. Whatever orjson does not encode itself
    (datetimes, decimals, lazy strings) goes through DRF's own encoder, so values render as before;
    an indent request or anything orjson refuses falls back to DRF's renderer."""

    _options = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME
    _encoder = encoders.JSONEncoder()

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if data is None:
            return b""
        if self.get_indent(accepted_media_type, renderer_context or {}) is None:
            try:
                return orjson.dumps(data, default=self._encoder.default, option=self._options)
            except (orjson.JSONEncodeError, TypeError):
                pass
        return super().render(data, accepted_media_type, renderer_context)
