"""OpenAPI (drf-spectacular) pieces shared by every API: the envelope, errors, auth and tenant header.

- `envelope(Serializer)` documents `{"success": true, "data": <Serializer>}`;
- `ErrorEnvelope` documents `{"success": false, "error": {"code", "message", "details"}}`;
- `AutoSchema` adds to every operation the `X-Tenant-Slug` header (when it uses bearer auth) and the
  error envelope for the refusals every such operation can give (400, 401, 403, 413, 429), so views
  only declare their own (404, 409, 422);
- `BearerTokenScheme` describes `tenants.auth.BearerTokenAuthentication` as an HTTP bearer scheme.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema as SpectacularAutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

TENANT_HEADER = OpenApiParameter(
    name="X-Tenant-Slug",
    type=OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    required=True,
    description="The tenant the bearer token belongs to. Missing: 400; another tenant: 403.",
)

RELEASE_ID_PATH = OpenApiParameter(
    name="release_id",
    type=OpenApiTypes.STR,
    location=OpenApiParameter.PATH,
    # The route's own pattern (releases/api/urls.py): anything else never reaches the view.
    pattern=r"^[A-Za-z0-9_]{1,40}$",
    description="The release id, e.g. rel_20240115_1200 (unique per tenant).",
)

# What each HTTP status of the error envelope means, with the codes it carries.
ERROR_DESCRIPTIONS = {
    400: "`validation_error` (field errors in `details`), or a planning error such as `unsupported_table`; "
    "also a missing X-Tenant-Slug header.",
    401: "`unauthorized`: no token, or the token is invalid, expired or revoked.",
    403: "`forbidden`: the token belongs to another tenant, or the role is too low.",
    404: "`not_found`: no such release (or environment) in this tenant.",
    409: "`conflict`, `environment_busy`, `schema_drift`, `gate` (prod gate, both fingerprints in `details`), "
    "`approvals_missing`, `rollback_blocked`.",
    413: "`payload_too_large`: the body is over the limit (1 MiB by default).",
    422: "`unsafe_migration`: lint errors not overridden by `allow_unsafe` (rules in `details.rules`).",
    429: "`rate_limited`: too many requests; see the Retry-After header.",
    503: "`target_unreachable` or `lock_timeout`: the target database cannot be opened now (the message says "
    "why, without URL, user, password or host); `broker_unavailable`: promote or rollback could not queue "
    "its task, the release is as it was; retry later.",
}


class ErrorDetail(serializers.Serializer):
    code = serializers.CharField(help_text="A stable machine-readable code, e.g. validation_error, gate.")
    message = serializers.CharField(help_text="A human-readable explanation.")
    details = serializers.JSONField(help_text="Field errors or facts about the refusal; {} when none.")


class ErrorEnvelope(serializers.Serializer):
    """Every refusal: `{"success": false, "error": {...}}`."""

    success = serializers.BooleanField(help_text="Always false.")
    error = ErrorDetail()


def error_responses(*status_codes: int) -> dict[int, OpenApiResponse]:
    """The error envelope for each status, with what it means."""
    return {
        code: OpenApiResponse(ErrorEnvelope, description=ERROR_DESCRIPTIONS[code]) for code in status_codes
    }


_ENVELOPES: dict[tuple[str, bool], type[serializers.Serializer]] = {}


def envelope(data: type[serializers.Serializer], *, many: bool = False, name: str = "") -> type:
    """A serializer describing `{"success": true, "data": data}` (one component per data shape)."""
    base = data.__name__.removesuffix("Output")
    name = name or f"{base}{'List' if many else ''}Envelope"
    key = (name, many)
    if key not in _ENVELOPES:
        _ENVELOPES[key] = type(
            name,
            (serializers.Serializer,),
            {
                "__doc__": f'`{{"success": true, "data": {base}{"[]" if many else ""}}}`',
                "__module__": __name__,
                "success": serializers.BooleanField(help_text="Always true."),
                "data": data(many=many),
            },
        )
    return _ENVELOPES[key]


def _uses_bearer_auth(view: Any) -> bool:
    from tenants.auth import BearerTokenAuthentication

    return any(isinstance(auth, BearerTokenAuthentication) for auth in view.get_authenticators())


class AutoSchema(SpectacularAutoSchema):
    """Adds the tenant header and the refusals every authenticated operation can give."""

    def get_override_parameters(self) -> list:
        parameters = list(super().get_override_parameters())
        if _uses_bearer_auth(self.view):
            parameters.append(TENANT_HEADER)
        return parameters

    def _get_response_bodies(self, direction: str = "response") -> dict:
        responses = super()._get_response_bodies(direction)
        implied: list[int] = []
        if _uses_bearer_auth(self.view):
            implied += [400, 401, 403]
        if self.method in ("POST", "PUT", "PATCH"):
            implied += [400, 413]
        if self.view.get_throttles():
            implied.append(429)
        for code in sorted(set(implied)):
            if str(code) not in responses:
                responses[str(code)] = self._get_response_for_code(
                    OpenApiResponse(ErrorEnvelope, description=ERROR_DESCRIPTIONS[code]),
                    str(code),
                    direction=direction,
                )
        return dict(sorted(responses.items()))


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """`Authorization: Bearer <token>`, bound to one user and one tenant (with X-Tenant-Slug)."""

    target_class = "tenants.auth.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token from `manage.py issue_token --tenant SLUG --user USER`, sent with "
            "the X-Tenant-Slug header naming its tenant.",
        }


# Collections keep their trailing slash (GET /api/releases/); every other route is documented as the
# guide writes it, without one (POST /api/releases/prepare). Both forms answer.
COLLECTION_PATHS = {"/api/releases/", "/api/environments/"}


def guide_paths(endpoints: list[tuple], **kwargs: Any) -> list[tuple]:
    """drf-spectacular preprocessing hook: the guide's spelling of each path."""
    result = []
    for path, path_regex, method, callback in endpoints:
        if path.endswith("/") and path != "/" and path not in COLLECTION_PATHS:
            path = path.rstrip("/")
        result.append((path, path_regex, method, callback))
    return result


# /metrics is a plain Django view (Prometheus text, its own token): documented by hand.
METRICS_OPERATION = {
    "operationId": "metrics",
    "summary": "Prometheus metrics",
    "description": "The guide's release counters and histograms (labels tenant, environment) in the "
    "Prometheus text format. With METRICS_TOKEN set, send `Authorization: Bearer <METRICS_TOKEN>`.",
    "tags": ["metrics"],
    "security": [{"metricsToken": []}, {}],
    "responses": {
        "200": {
            "description": "Prometheus text exposition format 0.0.4.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        "401": {
            "description": "`unauthorized`: METRICS_TOKEN is set and the request does not carry it.",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}},
        },
    },
}


def metrics_path(result: dict, **kwargs: Any) -> dict:
    """drf-spectacular postprocessing hook: add GET /metrics and its token scheme."""
    result["paths"]["/metrics"] = {"get": METRICS_OPERATION}
    result["components"].setdefault("securitySchemes", {})["metricsToken"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "The METRICS_TOKEN setting (only when it is set).",
    }
    return result
