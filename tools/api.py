"""POST /api/tools/execute: agents call the tool kernel over HTTP (admin role, dry_run by default)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiExample, extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from releasemgr.api import success
from releasemgr.core.errors import ApplicationError, ErrorCode, ValidationFailed
from releasemgr.idempotency import idempotent
from releasemgr.schema import error_responses
from releasemgr.throttling import TenantScopedRateThrottle
from releases.selectors import release_get
from tenants.auth import IsTenantAdmin, TenantRequest
from tenants.models import Stage
from tenants.selectors import environment_get

from .kernel import ToolCall, ToolContext, ToolResult, tool_kernel
from .redaction import jsonable
from .registry import flatten_errors

# Tool-level failures that are refusals of the call itself, rendered as the API's error envelope.
# The call itself was refused (not run): raised so the API answers with the code's status. Any other
# failure is the tool's own result, answered 200 with ok false.
REFUSALS = frozenset(
    {ErrorCode.VALIDATION_ERROR, ErrorCode.UNSUPPORTED_TABLE, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND}
)


class ToolExecuteInput(serializers.Serializer):
    id = serializers.CharField(max_length=100, required=False, help_text="the caller's call id")
    tool = serializers.CharField(max_length=64, help_text="db.migrate, queue.enqueue or email.send")
    args = serializers.JSONField(required=False, default=dict, help_text="the tool's arguments")
    dry_run = serializers.BooleanField(required=False, help_text="default true")
    release_id = serializers.CharField(max_length=40, required=False, help_text="run for this release")
    environment = serializers.ChoiceField(
        choices=Stage.choices, required=False, help_text="dev, staging, prod"
    )

    def validate_args(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("Expected a JSON object.")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        body, inner = attrs.get("dry_run"), attrs["args"].get("dry_run")
        if body is not None and isinstance(inner, bool) and inner != body:
            raise serializers.ValidationError({"dry_run": "The body's dry_run and args.dry_run disagree."})
        return attrs


class ToolExecuteView(APIView):
    """Run one tool call for the token's tenant; admin role; dry_run unless the request says otherwise.

    Body: `{"id", "tool", "args", "dry_run" (default true), "release_id", "environment"}`. `dry_run`
    may be given in the body or in `args`; both given and different is a 400. With `release_id`,
    the environment defaults to the release's `to_env`.

    Status codes (every call the kernel sees leaves a transcript, refused ones included):
    - 200 `{"success": true, "data": {"ok", "data", "error", "transcript_id"}}` when the tool ran,
      whether it succeeded (`ok: true`) or the handler failed (`ok: false`, e.g. a failed dry-run,
      an unreachable target, a job whose task is not registered).
    - 400 `validation_error` when the call itself is wrong (unknown tool, bad arguments: `details`
      maps `args.<field>` to messages) and 400 `unsupported_table`; `details.transcript_id` names
      the stored transcript.
    - 403 `forbidden` for a refused call, e.g. `db.migrate` with `dry_run: false` (only the release
      executor applies: from here it would bypass approvals), also with `details.transcript_id`.
    - 401 without a token, 403 for another tenant's token or a role below admin, 404 for a
      `release_id` or `environment` the tenant does not have (these before any call is made).

    `Idempotency-Key` is honoured: a retry gets the first answer and the tool does not run twice.
    """

    permission_classes = [IsTenantAdmin]
    throttle_classes = [TenantScopedRateThrottle]
    throttle_scope = "tools"

    @extend_schema(
        request=ToolExecuteInput,
        responses={
            200: inline_serializer(
                "ToolExecuteResponse",
                {
                    "success": serializers.BooleanField(),
                    "data": inline_serializer(
                        "ToolResultOutput",
                        {
                            "ok": serializers.BooleanField(),
                            "data": serializers.JSONField(allow_null=True),
                            "error": serializers.CharField(allow_null=True),
                            "transcript_id": serializers.CharField(),
                        },
                    ),
                },
            ),
            # 404: an unknown release_id or environment; 409: an Idempotency-Key reused or in flight.
            **error_responses(404, 409),
        },
        examples=[
            OpenApiExample(
                "db.migrate dry-run",
                request_only=True,
                value={
                    "id": "mig_1",
                    "tool": "db.migrate",
                    "environment": "staging",
                    "args": {
                        "op": "create_table",
                        "table": "new_feature",
                        "columns": [{"name": "name", "type": "string", "max_length": 100}],
                    },
                },
            )
        ],
    )
    @idempotent
    def post(self, request: TenantRequest) -> Response:
        if not isinstance(request.data, dict):
            raise ValidationFailed(
                "The body must be a JSON object.", details={"body": "Expected a JSON object."}
            )
        serializer = ToolExecuteInput(data=request.data)
        if not serializer.is_valid():
            raise ValidationFailed("The request is not valid.", details=flatten_errors(serializer.errors))
        data = serializer.validated_data
        tenant = request.tenant
        release = release_get(tenant=tenant, release_id=data["release_id"]) if "release_id" in data else None
        environment = (
            environment_get(tenant=tenant, stage=data["environment"]) if "environment" in data else None
        )
        if environment is None and release is not None:
            environment = release.to_environment
        dry_run = data.get("dry_run")
        if dry_run is None:
            inner = data["args"].get("dry_run")
            dry_run = inner if isinstance(inner, bool) else True
        context = ToolContext(
            tenant=tenant,
            environment=environment,
            user=request.user,
            release=release,
            dry_run=dry_run,
            executor=False,  # never from the API: applying would bypass approvals
        )
        result = tool_kernel.execute(
            ToolCall(id=data.get("id", ""), tool=data["tool"], args=data["args"]), context
        )
        _raise_for_refusal(result)
        return success(
            {
                "ok": result.ok,
                "data": jsonable(result.data),
                "error": result.error,
                "transcript_id": result.transcript_id,
            }
        )


def _raise_for_refusal(result: ToolResult) -> None:
    if result.ok or result.error_code not in REFUSALS:
        return
    details: dict[str, Any] = {}
    for path, messages in (result.details or {}).items():
        key = path if path in ("tool", "environment", "release") else f"args.{path}"
        details[key] = messages
    details["transcript_id"] = result.transcript_id
    raise ApplicationError(
        result.error or "The call was refused.", code=ErrorCode(result.error_code), details=details
    )
