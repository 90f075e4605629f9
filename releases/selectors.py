"""Reads of releases; every read takes the tenant, so no view can forget isolation."""

from __future__ import annotations

import functools

from django.core.cache import cache
from django.db import connection
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
    """The tenant's releases, filtered and newest first (the base of release_list)."""
    _check_list_filters(status=status, to_env=to_env)
    releases = Release.objects.filter(tenant=tenant)
    if status:
        releases = releases.filter(status=status)
    if to_env:
        releases = releases.filter(to_environment__stage=to_env)
    return releases.order_by("-created_at", "-id")


def _check_list_filters(*, status: str | None, to_env: str | None) -> None:
    if status and status not in ReleaseStatus.values:
        raise ValidationFailed(
            f"Unknown status {status!r}.", details={"status": f"One of {', '.join(ReleaseStatus.values)}."}
        )
    if to_env and to_env not in Stage.values:
        raise ValidationFailed(
            f"Unknown environment {to_env!r}.", details={"to_env": f"One of {', '.join(Stage.values)}."}
        )


# The keys of a summary row (serializers.release_summary_row), named as ORM lookups.
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
COUNT_KEPT_SECONDS = 60
_SUMMARY_DATETIMES = ("created_at", "promoted_at", "failed_at", "rolled_back_at")


class ReleaseSummaries:
    """The API list's releases as summary rows, newest first: countable and sliceable for a paginator.
    Timestamps come as ISO 8601 strings in UTC with a Z.

    Two statements per page whatever its size, COUNT(*) and the page, written in plain SQL (both
    dialects): with 10,000 releases, building them through the ORM cost several times the SQL itself
    (query compilation, model instances, JSON columns no summary shows), making the list several
    times slower than an endpoint that only authenticates. The keys are SUMMARY_COLUMNS.
    """

    ordered = True

    def __init__(self, *, tenant: Tenant, status: str | None = None, to_env: str | None = None) -> None:
        _check_list_filters(status=status, to_env=to_env)
        self._count_sql, self._page_sql = _summary_sql(connection.vendor, bool(status), bool(to_env))
        self._params = [tenant.pk] + ([status] if status else []) + ([to_env] if to_env else [])
        self._status, self._to_env = status or None, to_env or None
        self._count: int | None = None

    def count(self) -> int:
        if self._count is None:
            self._count = self._count_kept() if self._status is None else self._count_now()
        return self._count

    def _count_now(self) -> int:
        with connection.cursor() as cursor:
            cursor.execute(self._count_sql, self._params)
            return cursor.fetchone()[0]

    def _count_kept(self) -> int:
        """COUNT(*) reads every matching index entry (10,000 releases: most of a page's database
        time); without a status filter the count can only change when the tenant gets a new release,
        which moves its newest created_at, an index seek. So the count is kept in the cache under
        that value. A release inserted with an older created_at, or deleted (the product does
        neither), shows in the count within COUNT_KEPT_SECONDS."""
        with connection.cursor() as cursor:
            cursor.execute(_newest_sql(connection.vendor), [self._params[0]])
            newest = cursor.fetchone()[0]
        if newest is None:
            return 0
        stamp = "".join(character for character in str(newest) if character.isdigit())
        key = f"releasemgr:release-count:{self._params[0]}:{self._to_env or '-'}:{stamp}"
        count = cache.get(key)
        if count is None:
            count = self._count_now()
            cache.set(key, count, COUNT_KEPT_SECONDS)
        return count

    def __len__(self) -> int:
        return self.count()

    def __getitem__(self, key: slice) -> list[dict]:
        if not isinstance(key, slice) or key.step is not None:
            raise TypeError("ReleaseSummaries takes slices without a step")
        offset = max(key.start or 0, 0)
        limit = (key.stop if key.stop is not None else self.count()) - offset
        if limit <= 0:
            return []
        with connection.cursor() as cursor:
            cursor.execute(self._page_sql, [*self._params, limit, offset])
            rows = cursor.fetchall()
        iso = _iso_text
        # A dict display per row (the SUMMARY_COLUMNS order of the SELECT): the cheapest way to build
        # them, which with 50 rows a page is a visible part of the list's time.
        return [
            {
                "release_id": row[0],
                "status": row[1],
                "bundle_sha256": row[2],
                "created_at": iso(row[3]),
                "promoted_at": iso(row[4]),
                "failed_at": iso(row[5]),
                "rolled_back_at": iso(row[6]),
                "error_message": row[7],
                "from_environment__stage": row[8],
                "to_environment__stage": row[9],
                "created_by__username": row[10],
            }
            for row in rows
        ]


@functools.lru_cache(maxsize=16)
def _summary_sql(vendor: str, by_status: bool, by_to_env: bool) -> tuple[str, str]:
    """COUNT(*) and page statements of ReleaseSummaries for one filter shape (built once)."""
    quote = connection.ops.quote_name
    release, environment = Release._meta, Environment._meta
    user = Release._meta.get_field("created_by").related_model._meta

    def col(name: str) -> str:
        return f"r.{quote(release.get_field(name).column)}"

    stage = quote(environment.get_field("stage").column)
    to_environment = (
        f" INNER JOIN {quote(environment.db_table)} te ON te.{quote(environment.pk.column)} = "
        f"{col('to_environment')}"
    )
    where = " AND ".join(
        [f"{col('tenant')} = %s"]
        + ([f"{col('status')} = %s"] if by_status else [])
        + ([f"te.{stage} = %s"] if by_to_env else [])
    )
    # COUNT(*) joins the environments only to filter by to_env: a join per release otherwise.
    count_sql = (
        f"SELECT COUNT(*) FROM {quote(release.db_table)} r{to_environment if by_to_env else ''} WHERE {where}"
    )
    # Timestamps as the database's text (UTC: Django stores them so on SQLite and sets the session
    # time zone on PostgreSQL), turned into ISO 8601 by _iso_text without parsing a datetime.
    select = ", ".join(
        [
            col(name) if name not in _SUMMARY_DATETIMES else f"CAST({col(name)} AS TEXT)"
            for name in SUMMARY_COLUMNS[:8]
        ]
        + [f"fe.{stage}", f"te.{stage}", f"u.{quote(user.get_field('username').column)}"]
    )
    page_sql = (
        f"SELECT {select} FROM {quote(release.db_table)} r{to_environment}"
        f" INNER JOIN {quote(environment.db_table)} fe ON fe.{quote(environment.pk.column)} = "
        f"{col('from_environment')}"
        f" LEFT OUTER JOIN {quote(user.db_table)} u ON u.{quote(user.pk.column)} = {col('created_by')}"
        f" WHERE {where} ORDER BY {col('created_at')} DESC, {col('id')} DESC LIMIT %s OFFSET %s"
    )
    return count_sql, page_sql


@functools.lru_cache(maxsize=4)
def _newest_sql(vendor: str) -> str:
    quote = connection.ops.quote_name
    release = Release._meta
    created_at, tenant = (quote(release.get_field(name).column) for name in ("created_at", "tenant"))
    return f"SELECT MAX({created_at}) FROM {quote(release.db_table)} WHERE {tenant} = %s"


def _iso_text(value: str | None) -> str | None:
    """'2024-01-15 12:00:00.123456[+00]' (UTC) -> '2024-01-15T12:00:00Z', as serializers.iso writes it."""
    return None if value is None else f"{value[:10]}T{value[11:19]}Z"


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
