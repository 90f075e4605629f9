"""Reads of releases; every read takes the tenant, so no view can forget isolation."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, cast

import orjson
from django.core.cache import cache
from django.db import connection
from django.db.models import Field, Model, Prefetch, QuerySet
from django.db.models.options import Options

from releasemgr.core.errors import NotFound, ValidationFailed
from tenants.models import Environment, Stage, Tenant
from tenants.targets import open_environment

from . import engine
from .models import Approval, ApprovalDecision, Release, ReleaseStatus

logger = logging.getLogger(__name__)


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


# The keys of a list summary, in the order of the page statement's columns (serializers.release_summary).
SUMMARY_KEYS = (
    "id",
    "release_id",
    "status",
    "from_env",
    "to_env",
    "bundle_sha256",
    "created_by",
    "created_at",
    "promoted_at",
    "failed_at",
    "rolled_back_at",
    "error_message",
)
COUNT_KEPT_SECONDS = 60


class ReleaseSummaries:
    """The API list's releases as summaries (serializers.release_summary, the same dicts), newest
    first: page(offset, limit) and count().

    At most two statements per page whatever its size, written in plain SQL for both dialects: with
    10,000 releases, building a page through the ORM cost several times the SQL itself (query
    compilation, model instances, JSON columns no summary shows), making the list several times
    slower than an endpoint that only authenticates. The database writes the values as summaries
    show them (timestamps as ISO 8601 text in UTC, an empty error as null; see _summary_sql).

    Without a status filter, the count is kept (see _count_kept) and the page statement also reads
    the tenant's newest created_at, the key it is kept under: a page is then one statement.
    """

    def __init__(self, *, tenant: Tenant, status: str | None = None, to_env: str | None = None) -> None:
        _check_list_filters(status=status, to_env=to_env)
        self._kept = not status
        self._count_sql, self._page_sql = _summary_sql(
            connection.vendor, bool(status), bool(to_env), self._kept
        )
        self._tenant_id = tenant.pk
        self._params = [tenant.pk] + ([status] if status else []) + ([to_env] if to_env else [])
        self._to_env = to_env or None
        self._count: int | None = None
        self._newest: object = _UNREAD

    def count(self) -> int:
        if self._count is None:
            self._count = self._count_kept() if self._kept else self._count_now()
        return self._count

    def page(self, offset: int, limit: int) -> list[dict]:
        """Up to `limit` summaries from `offset` (both >= 0)."""
        if limit <= 0:
            return []
        params = ([self._tenant_id] if self._kept else []) + [*self._params, limit, offset]
        with connection.cursor() as cursor:
            cursor.execute(self._page_sql, params)
            if connection.vendor == "sqlite":
                text, newest = cursor.fetchone()  # the page as a JSON array (see _summary_sql)
                summaries = orjson.loads(text)
            else:
                rows = cursor.fetchall()
                newest = rows[0][-1] if rows else None
                summaries = [dict(zip(SUMMARY_KEYS, row, strict=False)) for row in rows]  # not the last
        if summaries and self._kept:
            self._newest = newest
        return summaries

    def _count_now(self) -> int:
        with connection.cursor() as cursor:
            cursor.execute(self._count_sql, self._params)
            return cursor.fetchone()[0]

    def _count_kept(self) -> int:
        """COUNT(*) reads every matching index entry (10,000 releases: most of a page's database
        time); without a status filter the count can only change when the tenant gets a new release,
        which moves its newest created_at, an index seek. So the count is kept in the cache under
        that value. Prepare takes created_at under the tenant's row lock (services.prepare.release_save),
        so releases commit in created_at order. A release inserted with an older created_at, or
        deleted, by anything else (the product does neither) shows in the count within
        COUNT_KEPT_SECONDS."""
        newest = self._newest
        if newest is _UNREAD:
            with connection.cursor() as cursor:
                cursor.execute(_newest_sql(connection.vendor), [self._tenant_id])
                newest = cursor.fetchone()[0]
        if newest is None:
            return 0
        stamp = "".join(character for character in str(newest) if character.isdigit())
        key = f"releasemgr:release-count:{self._tenant_id}:{self._to_env or '-'}:{stamp}"
        count = cache.get(key)
        if count is None:
            count = self._count_now()
            cache.set(key, count, COUNT_KEPT_SECONDS)
        return count


_UNREAD = object()


def _iso_utc_sql(vendor: str, column: str) -> str:
    """SQL turning a timestamp column into serializers.iso's text ('2024-01-15T12:00:00Z'), NULL
    staying NULL. Django stores datetimes in UTC on SQLite (as text) and PostgreSQL (timestamptz)."""
    if vendor == "postgresql":
        return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')"""
    # Django writes 'YYYY-MM-DD HH:MM:SS[.ffffff]' (UTC): cut, not parsed. strftime() would go
    # through SQLite's millisecond clock, which can round 59.9996 s up to the next second.
    return f"substr({column}, 1, 10) || 'T' || substr({column}, 12, 8) || 'Z'"


def _column(meta: Options[Any], name: str) -> str:
    """The database column of the concrete field `name`."""
    field = meta.get_field(name)
    assert isinstance(field, Field) and field.column is not None, name
    return field.column


@functools.lru_cache(maxsize=16)
def _summary_sql(vendor: str, by_status: bool, by_to_env: bool, with_newest: bool) -> tuple[str, str]:
    """COUNT(*) and page statements of ReleaseSummaries for one filter shape (built once).

    The page statement's parameters are the tenant (only with_newest), then those of the WHERE
    clause, the limit and the offset."""
    quote = connection.ops.quote_name
    release, environment = Release._meta, Environment._meta
    user = cast("type[Model]", Release._meta.get_field("created_by").related_model)._meta

    def col(name: str) -> str:
        return f"r.{quote(_column(release, name))}"

    stage = quote(_column(environment, "stage"))
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

    # The names of the environments and the author. On PostgreSQL as scalar subqueries: it plans the
    # page with three joins several times slower (planning measured 0.6-1.2 ms, against 0.1-0.2 ms),
    # and a page looks up 50 rows at most. On SQLite, joins: ~15% faster there.
    joins = []

    def name_of(alias: str, table, pk: str, column: str, key: str, join: str = "INNER") -> str:
        if vendor == "postgresql":
            return f"(SELECT {quote(column)} FROM {quote(table)} WHERE {quote(pk)} = {col(key)})"
        if not (alias == "te" and by_to_env):  # filtering by to_env joins it already
            joins.append(f" {join} JOIN {quote(table)} {alias} ON {alias}.{quote(pk)} = {col(key)}")
        return f"{alias}.{quote(column)}"

    columns = [
        col("release_id"),
        col("release_id"),
        col("status"),
        name_of("fe", environment.db_table, environment.pk.column, "stage", "from_environment"),
        name_of("te", environment.db_table, environment.pk.column, "stage", "to_environment"),
        col("bundle_sha256"),
        name_of("u", user.db_table, user.pk.column, _column(user, "username"), "created_by", "LEFT OUTER"),
        *(
            _iso_utc_sql(vendor, col(name))
            for name in ("created_at", "promoted_at", "failed_at", "rolled_back_at")
        ),
        f"NULLIF({col('error_message')}, '')",
    ]
    page_from = (
        f" FROM {quote(release.db_table)} r{to_environment if by_to_env else ''}{''.join(joins)}"
        f" WHERE {where} ORDER BY {col('created_at')} DESC, {col('id')} DESC LIMIT %s OFFSET %s"
    )
    newest = f"({_newest_sql(vendor)})" if with_newest else "NULL"
    if vendor == "sqlite":
        # The page as one row holding one JSON array, parsed by orjson in C. Python's sqlite3
        # releases the GIL around every row it steps through, and in a threaded server each of
        # those hands the GIL to another thread: served side by side, a page of 50 rows cost
        # ~0.5 ms more per request than a page of 1; as one array, ~0.1 ms. SQLite (3.40 here has
        # no ORDER BY in aggregates) never flattens a LIMIT subquery into an aggregate, so
        # json_group_array takes the rows in the subquery's order; the tests compare pages with
        # the ORM's order. (psycopg2 fetches a whole result at once: on PostgreSQL, where
        # json_build_object measured slower than building the rows, a page stays rows.)
        inner = ", ".join(f"{column} AS c{n}" for n, column in enumerate(columns))
        pairs = ", ".join(f"'{key}', p.c{n}" for n, key in enumerate(SUMMARY_KEYS))
        page_sql = (
            f"SELECT json_group_array(json_object({pairs})), {newest} FROM (SELECT {inner}{page_from}) p"
        )
    else:
        page_sql = f"SELECT {', '.join([*columns, newest])}{page_from}"
    return count_sql, page_sql


@functools.lru_cache(maxsize=4)
def _newest_sql(vendor: str) -> str:
    quote = connection.ops.quote_name
    release = Release._meta
    created_at, tenant = (quote(_column(release, name)) for name in ("created_at", "tenant"))
    return f"SELECT MAX({created_at}) FROM {quote(release.db_table)} WHERE {tenant} = %s"


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


@dataclass(frozen=True)
class TargetFingerprint:
    """An environment's target as read now: its portable schema fingerprint, or why it could not be read."""

    fingerprint: str | None
    reachable: bool
    error: str = ""


def environment_fingerprint(*, environment: Environment) -> TargetFingerprint:
    """The target's current portable schema fingerprint (what the API's environment list and the
    admin's pipeline show). An unreachable target gives `reachable=False` with the engine's scrubbed
    reason; a URL or key that cannot even be read gives "could not be read" (logged), never an error."""
    try:
        with open_environment(environment) as target:
            return TargetFingerprint(
                fingerprint=engine.fingerprint(engine.introspect(target)), reachable=True
            )
    except engine.TargetError as exc:
        return TargetFingerprint(fingerprint=None, reachable=False, error=str(exc) or "unreachable")
    except Exception:  # a broken URL or key must not take a whole page or list down
        logger.warning("fingerprint of %s failed", environment, exc_info=True)
        return TargetFingerprint(fingerprint=None, reachable=False, error="could not be read")
