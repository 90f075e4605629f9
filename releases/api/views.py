"""The releases API: thin views that validate input, call one service and render the manifest."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework.exceptions import NotFound
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import remove_query_param, replace_query_param
from rest_framework.views import APIView

from releasemgr.api import success
from releasemgr.core.errors import ValidationFailed
from releasemgr.idempotency import idempotent
from releasemgr.schema import RELEASE_ID_PATH, envelope, error_responses
from releasemgr.throttling import TenantScopedRateThrottle
from tenants.auth import IsTenantAdmin, IsTenantApprover, IsTenantMember
from tenants.selectors import environment_list, flags_of

from .. import selectors, services
from ..models import ApprovalDecision, ReleaseStatus
from .serializers import (
    DecisionInput,
    EnvironmentOutput,
    PrepareInput,
    ReleaseManifestOutput,
    ReleasePageOutput,
    ReleaseRefInput,
    RollbackManifestOutput,
    release_manifest,
)


def _validated(serializer_class, request: Request) -> dict:
    if not isinstance(request.data, dict):
        raise ValidationFailed("The body must be a JSON object.", details={"body": "Expected a JSON object."})
    serializer = serializer_class(data=request.data)
    if not serializer.is_valid():
        raise ValidationFailed("The request is not valid.", details=serializer.errors)
    return serializer.validated_data


class ReleaseAPIView(APIView):
    throttle_classes = [TenantScopedRateThrottle]
    throttle_scope = "releases"
    permission_classes = [IsTenantAdmin]


class PrepareView(ReleaseAPIView):
    """Plan, lint and dry-run a bundle against to_env; 201 with the manifest."""

    @extend_schema(
        operation_id="release_prepare",
        tags=["releases"],
        summary="Prepare a release",
        request=PrepareInput,
        responses={
            201: OpenApiResponse(
                envelope(ReleaseManifestOutput),
                description="The manifest: status `prepared`, or `failed` with `error_message` when the "
                "dry-run failed. Without `bundle_data` the bundle is computed as from_env minus to_env.",
            ),
            **error_responses(404, 409, 503),
        },
    )
    @idempotent
    def post(self, request: Request) -> Response:
        data = _validated(PrepareInput, request)
        release = services.release_prepare(
            tenant=request.tenant,
            user=request.user,
            from_env=data["from_env"],
            to_env=data["to_env"],
            bundle_data=request.data.get("bundle_data"),
            allow_unsafe=data.get("allow_unsafe"),
            reason=data.get("reason", ""),
        )
        release = selectors.release_get(tenant=request.tenant, release_id=release.release_id)
        return success(release_manifest(release), status_code=201)


def _in_flight_response(release, final_statuses) -> Response:
    release = selectors.release_get(tenant=release.tenant, release_id=release.release_id)
    manifest = release_manifest(release)
    return success(manifest, status_code=202 if release.status in final_statuses else 200)


class PromoteView(ReleaseAPIView):
    """Promote a prepared release: 200 with the final manifest, or 202 while a worker runs it."""

    @extend_schema(
        operation_id="release_promote",
        tags=["releases"],
        summary="Promote a prepared release",
        request=ReleaseRefInput,
        responses={
            200: OpenApiResponse(
                envelope(ReleaseManifestOutput),
                description="The final manifest (`promoted`, or `failed` with `error_message`): the task ran "
                "in-process, or within `wait_seconds`.",
            ),
            202: OpenApiResponse(
                envelope(ReleaseManifestOutput),
                description="`promoting`: a worker runs it; poll GET /releases/{id}.",
            ),
            **error_responses(404, 409, 422, 503),
        },
    )
    @idempotent
    def post(self, request: Request) -> Response:
        data = _validated(ReleaseRefInput, request)
        release = selectors.release_get(tenant=request.tenant, release_id=data["release_id"])
        release = services.release_promote(
            release=release, user=request.user, wait_seconds=data.get("wait_seconds")
        )
        return _in_flight_response(release, [ReleaseStatus.PROMOTING])


class RollbackView(ReleaseAPIView):
    """Roll back the latest live release of an environment, or settle a failed one."""

    @extend_schema(
        operation_id="release_rollback",
        tags=["releases"],
        summary="Roll back a release",
        request=ReleaseRefInput,
        responses={
            200: OpenApiResponse(
                envelope(RollbackManifestOutput),
                description="The final manifest; `rolled_back` says whether it is.",
            ),
            202: OpenApiResponse(
                envelope(RollbackManifestOutput), description="`rolling_back`: a worker runs it."
            ),
            # A refused rollback answers with its code's status: 409 (drift, blocked, busy, refused
            # target), 422 (the rollback ran and failed, target unchanged), 503 (lock, unreachable).
            **error_responses(404, 409, 422, 503),
        },
    )
    @idempotent
    def post(self, request: Request) -> Response:
        data = _validated(ReleaseRefInput, request)
        release = selectors.release_get(tenant=request.tenant, release_id=data["release_id"])
        release = services.release_rollback(
            release=release, user=request.user, wait_seconds=data.get("wait_seconds")
        )
        response = _in_flight_response(release, [ReleaseStatus.ROLLING_BACK])
        response.data["data"]["rolled_back"] = response.data["data"]["status"] == ReleaseStatus.ROLLED_BACK
        return response


class ReleasePagination(PageNumberPagination):
    """DRF's page-number pagination (the same `page` and `page_size` parameters, links, and 404
    "Invalid page." for a page that is not a number or past the end) over selectors.ReleaseSummaries.

    Django's Paginator counts before it reads a page; this reads the page first, and the count comes
    after, kept or from the page statement itself (ReleaseSummaries): one statement for most pages.
    """

    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 200

    def paginate_queryset(self, queryset: selectors.ReleaseSummaries, request: Request, view=None) -> list:
        self.request = request
        size = self.get_page_size(request)
        number = request.query_params.get(self.page_query_param) or 1
        if number in self.last_page_strings:
            number = max(1, -(-queryset.count() // size))
        try:
            number = int(number)
        except ValueError:
            number = 0
        # Past any real list, and past what LIMIT/OFFSET take (64-bit): a 404 like any page past the end.
        valid = number >= 1 and (number - 1) * size < 2**62
        results = queryset.page((number - 1) * size, size) if valid else []
        if not results and number != 1:
            raise NotFound(self.invalid_page_message)
        # An empty first page: nothing matches, no need to count it.
        self.count = queryset.count() if results else 0
        self.number, self.size = number, size
        return results

    def get_next_link(self) -> str | None:
        if self.number * self.size >= self.count:
            return None
        return replace_query_param(self.request.build_absolute_uri(), self.page_query_param, self.number + 1)

    def get_previous_link(self) -> str | None:
        if self.number == 1:
            return None
        url = self.request.build_absolute_uri()
        if self.number == 2:
            return remove_query_param(url, self.page_query_param)
        return replace_query_param(url, self.page_query_param, self.number - 1)

    def get_paginated_response(self, data: list) -> Response:
        return success(
            {
                "count": self.count,
                "next": self.get_next_link(),
                "previous": self.get_previous_link(),
                "results": data,
            }
        )


class ReleaseListView(APIView):
    """Releases of the tenant, newest first, filtered by status and to_env."""

    permission_classes = [IsTenantMember]
    throttle_classes = [TenantScopedRateThrottle]
    throttle_scope = "releases"

    @extend_schema(
        operation_id="release_list",
        tags=["releases"],
        summary="List releases",
        parameters=[
            OpenApiParameter(
                "status", str, enum=ReleaseStatus.values, description="Only releases in this status."
            ),
            OpenApiParameter(
                "to_env", str, enum=["dev", "staging", "prod"], description="Only releases to it."
            ),
            OpenApiParameter("page", int, description="Page number, from 1."),
            OpenApiParameter("page_size", int, description="Results per page (default 50, at most 200)."),
        ],
        responses={200: envelope(ReleasePageOutput), **error_responses(404)},
    )
    def get(self, request: Request) -> Response:
        releases = selectors.ReleaseSummaries(
            tenant=request.tenant,
            status=request.query_params.get("status"),
            to_env=request.query_params.get("to_env"),
        )
        paginator = ReleasePagination()
        return paginator.get_paginated_response(paginator.paginate_queryset(releases, request, view=self))


class ReleaseDetailView(APIView):
    """The manifest of one release."""

    permission_classes = [IsTenantMember]
    throttle_classes = [TenantScopedRateThrottle]
    throttle_scope = "releases"

    @extend_schema(
        operation_id="release_get",
        tags=["releases"],
        summary="Get a release's manifest",
        parameters=[RELEASE_ID_PATH],
        responses={200: envelope(ReleaseManifestOutput), **error_responses(404)},
    )
    def get(self, request: Request, release_id: str) -> Response:
        release = selectors.release_get(tenant=request.tenant, release_id=release_id)
        return success(release_manifest(release))


class _DecisionView(APIView):
    permission_classes = [IsTenantApprover]
    throttle_classes = [TenantScopedRateThrottle]
    throttle_scope = "releases"
    decision = ApprovalDecision.APPROVED

    @extend_schema(
        tags=["approvals"],
        request=DecisionInput,
        parameters=[RELEASE_ID_PATH],
        responses={
            200: OpenApiResponse(
                envelope(ReleaseManifestOutput), description="The manifest with the decision."
            ),
            **error_responses(404, 409),
        },
    )
    @idempotent
    def post(self, request: Request, release_id: str) -> Response:
        data = _validated(DecisionInput, request)
        release = selectors.release_get(tenant=request.tenant, release_id=release_id)
        services.approval_record(
            release=release,
            user=request.user,
            decision=self.decision,
            via="api",
            comment=data.get("comment", ""),
        )
        release = selectors.release_get(tenant=request.tenant, release_id=release_id)
        return success(release_manifest(release))


@extend_schema_view(post=extend_schema(operation_id="release_approve", summary="Approve a release"))
class ApproveView(_DecisionView):
    """Approve a prepared release (approver or admin role)."""

    decision = ApprovalDecision.APPROVED


@extend_schema_view(post=extend_schema(operation_id="release_reject", summary="Reject a release"))
class RejectView(_DecisionView):
    """Reject a prepared release; a rejection blocks its promotion."""

    decision = ApprovalDecision.REJECTED


class EnvironmentListView(APIView):
    """Each environment: live release, schema fingerprint, flags and policy (never its database URL)."""

    permission_classes = [IsTenantMember]

    @extend_schema(
        operation_id="environment_list",
        tags=["environments"],
        summary="List the tenant's environments",
        responses={200: envelope(EnvironmentOutput, many=True)},
    )
    def get(self, request: Request) -> Response:
        results = []
        for environment in environment_list(tenant=request.tenant):
            live = selectors.live_release(environment=environment)
            entry = {
                "name": environment.stage,
                "live_release": live.release_id if live else None,
                "schema_fingerprint": None,
                "feature_flags": flags_of(environment),
                "approvals_required": environment.approvals_required,
                "allow_self_approval": environment.allow_self_approval,
                "busy": bool(environment.lock_owner),
            }
            target = selectors.environment_fingerprint(environment=environment)
            entry["schema_fingerprint"] = target.fingerprint
            entry["reachable"] = target.reachable
            if not target.reachable:
                entry["error"] = target.error
            results.append(entry)
        return success(results)
