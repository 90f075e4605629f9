"""Reads of releases; every read takes the tenant, so no view can forget isolation."""

from __future__ import annotations

from django.db.models import Prefetch, QuerySet

from releasemgr.api import NotFound, ValidationFailed
from tenants.models import Environment, Stage, Tenant

from .models import Approval, ApprovalDecision, Release, ReleaseStatus


def release_get(*, tenant: Tenant, release_id: str) -> Release:
    release = (
        Release.objects.filter(tenant=tenant, release_id=release_id)
        .select_related("tenant", "from_environment", "to_environment", "created_by")
        .prefetch_related(
            "migrations",
            Prefetch("approvals", queryset=Approval.objects.select_related("approver")),
            "backups",
            "transcripts",
        )
        .first()
    )
    if release is None:
        raise NotFound(f"Release {release_id} was not found.")
    return release


# What release_summary reads; anything else would be loaded one query per row.
SUMMARY_FIELDS = (
    "tenant_id",
    "release_id",
    "status",
    "bundle_sha256",
    "created_at",
    "promoted_at",
    "failed_at",
    "rolled_back_at",
    "error_message",
    "from_environment__stage",
    "to_environment__stage",
    "created_by__username",
)


def release_list(
    *, tenant: Tenant, status: str | None = None, to_env: str | None = None
) -> QuerySet[Release]:
    # Lists render summaries (release_summary): loading only their columns keeps a page from decoding
    # every release's bundle, lint and dry-run JSON (the bulk of a page's time with 10,000 releases).
    return (
        release_filter(tenant=tenant, status=status, to_env=to_env)
        .select_related("from_environment", "to_environment", "created_by")
        .only(*SUMMARY_FIELDS)
    )


def release_filter(
    *, tenant: Tenant, status: str | None = None, to_env: str | None = None
) -> QuerySet[Release]:
    """The tenant's releases, filtered and newest first, with no join or column choice of its own:
    cheap to count, and the base of release_list and release_summary_rows."""
    releases = Release.objects.filter(tenant=tenant)
    if status:
        if status not in ReleaseStatus.values:
            raise ValidationFailed(
                f"Unknown status {status!r}.",
                details={"status": f"One of {', '.join(ReleaseStatus.values)}."},
            )
        releases = releases.filter(status=status)
    if to_env:
        if to_env not in Stage.values:
            raise ValidationFailed(
                f"Unknown environment {to_env!r}.", details={"to_env": f"One of {', '.join(Stage.values)}."}
            )
        releases = releases.filter(to_environment__stage=to_env)
    return releases.order_by("-created_at", "-id")


# The columns of a summary row; related values by lookup (plain joins, no expressions to resolve).
SUMMARY_COLUMNS = (
    "release_id",
    "status",
    "bundle_sha256",
    "created_at",
    "promoted_at",
    "failed_at",
    "rolled_back_at",
    "error_message",
    "from_environment__stage",
    "to_environment__stage",
    "created_by__username",
)


def release_summary_rows(releases: QuerySet[Release]) -> QuerySet[dict]:
    """release_filter's releases as plain rows (serializers.release_summary_row): a page of the API's
    list then builds no model instances, which with thousands of releases is most of its cost.
    Count the releases on `releases` itself: counting these rows would join every release."""
    return releases.values(*SUMMARY_COLUMNS)


def live_release(*, environment: Environment) -> Release | None:
    """The release whose changes the environment runs now: the last promoted one."""
    return (
        Release.objects.filter(to_environment=environment, status=ReleaseStatus.PROMOTED)
        .order_by("-promoted_at", "-id")
        .first()
    )


def latest_release(*, tenant: Tenant) -> Release | None:
    return Release.objects.filter(tenant=tenant).order_by("-created_at", "-id").first()


def approval_counts(release: Release) -> dict[str, int]:
    """Approvals that count: bound to the release's current bundle and SQL."""
    valid = [
        a
        for a in release.approvals.all()
        if a.bundle_sha256 == release.bundle_sha256 and a.sql_sha256 == release.sql_sha256
    ]
    return {
        "approved": sum(1 for a in valid if a.decision == ApprovalDecision.APPROVED),
        "rejected": sum(1 for a in valid if a.decision == ApprovalDecision.REJECTED),
    }
