"""The API's edges shared by every app: the error envelope, errors, JSON parsing."""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import orjson
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions
from rest_framework.parsers import JSONParser
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.utils import encoders

from releasemgr.core.errors import ApplicationError, ErrorCode, PayloadTooLarge, ValidationFailed

logger = logging.getLogger(__name__)


# The one table from error codes to HTTP statuses (docs/ARCHITECTURE.md). Services raise codes;
# this edge alone decides what HTTP says about them. Every ErrorCode has a row (a test checks).
STATUS_BY_CODE: dict[ErrorCode, int] = {
    ErrorCode.VALIDATION_ERROR: 400,
    ErrorCode.UNSUPPORTED_TABLE: 400,
    ErrorCode.UNSAFE_MIGRATION: 422,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.NOT_ACCEPTABLE: 406,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.CONFLICT: 409,
    ErrorCode.ENVIRONMENT_BUSY: 409,
    ErrorCode.SCHEMA_DRIFT: 409,
    ErrorCode.GATE: 409,
    ErrorCode.APPROVALS_MISSING: 409,
    ErrorCode.ROLLBACK_BLOCKED: 409,
    ErrorCode.TARGET_REFUSED: 409,
    ErrorCode.TARGET_UNREACHABLE: 503,
    ErrorCode.LOCK_TIMEOUT: 503,
    ErrorCode.BROKER_UNAVAILABLE: 503,
    ErrorCode.JOB_UNAVAILABLE: 503,
    ErrorCode.APPLY_FAILED: 422,
    ErrorCode.POST_VALIDATION_FAILED: 422,
    ErrorCode.BACKUP_FAILED: 503,
    ErrorCode.DRY_RUN_FAILED: 422,
    ErrorCode.WORKER_LOST: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.TOOL_ERROR: 500,
    ErrorCode.MISCONFIGURED: 500,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.ERROR: 400,
    ErrorCode.LINK_INVALID: 400,
    ErrorCode.LINK_FOREIGN: 400,
    ErrorCode.LINK_STALE: 409,
    ErrorCode.LINK_UNKNOWN: 404,
    ErrorCode.LINK_USED: 410,
    ErrorCode.LINK_EXPIRED: 410,
    ErrorCode.LINK_INACTIVE: 403,
    ErrorCode.LINK_OTHER_USER: 403,
    ErrorCode.LINK_CLOSED: 409,
}


def status_for(code: ErrorCode) -> int:
    """The HTTP status of an error code (the API's envelope and the approval-link pages use it)."""
    return STATUS_BY_CODE[ErrorCode(code)]


def success(data: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response({"success": True, "data": data}, status=status_code, headers=headers)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"success": False, "error": {"code": code, "message": message, "details": details or {}}}


_DRF_CODES = {
    exceptions.NotAuthenticated: ErrorCode.UNAUTHORIZED,
    exceptions.AuthenticationFailed: ErrorCode.UNAUTHORIZED,
    exceptions.PermissionDenied: ErrorCode.FORBIDDEN,
    exceptions.NotFound: ErrorCode.NOT_FOUND,
    exceptions.MethodNotAllowed: ErrorCode.METHOD_NOT_ALLOWED,
    exceptions.NotAcceptable: ErrorCode.NOT_ACCEPTABLE,
    exceptions.UnsupportedMediaType: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    exceptions.Throttled: ErrorCode.RATE_LIMITED,
    exceptions.ParseError: ErrorCode.VALIDATION_ERROR,
    exceptions.ValidationError: ErrorCode.VALIDATION_ERROR,
}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Render every refusal in the envelope; unexpected errors become a 500 without a traceback."""
    if isinstance(exc, ApplicationError):
        return Response(error_body(exc.code, exc.message, exc.details), status=status_for(exc.code))
    if isinstance(exc, Http404):
        return _refusal(ErrorCode.NOT_FOUND, "Not found.")
    if isinstance(exc, PermissionDenied):
        return _refusal(ErrorCode.FORBIDDEN, "You do not have permission to do this.")
    if isinstance(exc, RequestDataTooBig):
        return _refusal(ErrorCode.PAYLOAD_TOO_LARGE, "The request body is too large.")
    for exc_class, code in _DRF_CODES.items():
        if isinstance(exc, exc_class):
            status_code = status_for(code)
            headers = {}
            if isinstance(exc, exceptions.Throttled) and exc.wait is not None:
                headers["Retry-After"] = str(exc.wait)  # whole seconds: DRF rounds the wait up
            if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
                headers["WWW-Authenticate"] = 'Bearer realm="api"'
            detail = exc.detail if isinstance(exc, exceptions.ValidationError) else {}
            message = _message(exc)
            return Response(error_body(code, message, detail), status=status_code, headers=headers)
    if isinstance(exc, exceptions.APIException):
        return Response(error_body(ErrorCode.ERROR, _message(exc)), status=exc.status_code)
    logger.exception("unhandled error in %s", context.get("view").__class__.__name__)
    return _refusal(ErrorCode.INTERNAL_ERROR, "An internal error occurred.")


def _refusal(code: ErrorCode, message: str) -> Response:
    return Response(error_body(code, message), status=status_for(code))


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


def _api_or_html(request, code: ErrorCode, message: str, html_view, exception):
    """Django's own error pages, except under /api/, which answers in the envelope like every API error."""
    if request.path.startswith("/api/"):
        from django.http import JsonResponse

        return JsonResponse(error_body(code, message), status=status_for(code))
    return html_view(request, exception)


def not_found(request, exception=None):
    """handler404: a path under /api/ that matches no route answers in the envelope."""
    from django.views.defaults import page_not_found

    return _api_or_html(
        request, ErrorCode.NOT_FOUND, "No API endpoint at this path.", page_not_found, exception
    )


def bad_request(request, exception=None):
    """handler400: a request Django refuses before any view (an invalid Host header, say)."""
    from django.views.defaults import bad_request as html_bad_request

    return _api_or_html(
        request, ErrorCode.VALIDATION_ERROR, "The request is malformed.", html_bad_request, exception
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
