"""The release list under load: a constant number of queries whatever the page size or filters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.test import APIClient

from benchmarks.seeding import releases_bulk
from releases.models import Release, ReleaseStatus
from tenants.services import tenant_setup, token_issue

pytestmark = pytest.mark.django_db

RELEASES = 250
BIG_BUNDLE = {
    "database": {
        "changes": [
            {
                "type": "create_table",
                "table": f"table_{n}",
                "columns": [{"name": f"c{m}", "type": "string", "max_length": 50} for m in range(20)],
            }
            for n in range(20)
        ]
    },
    "feature_flags": {},
}


def seed_releases(tenant, count: int) -> None:
    releases_bulk(
        tenant,
        count,
        bundle=BIG_BUNDLE,
        lint_findings=[{"rule": "adding-field-with-default", "message": "x" * 200}] * 10,
    )


@pytest.fixture
def client(sqlite_database_factory):
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"])
    _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username="acme-admin"))
    seed_releases(tenant, RELEASES)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG="acme")
    assert client.get("/api/releases/").status_code == 200  # records the token's last use
    return client


def queries_for(client, path: str) -> tuple[int, dict]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path)
    assert response.status_code == 200, response.content
    return len(captured), response.json()["data"]


def test_release_list__10_or_200_per_page__same_number_of_queries(client, django_assert_num_queries):
    small, page = queries_for(client, "/api/releases/?page_size=10")
    assert page["count"] == RELEASES and len(page["results"]) == 10
    assert small <= 6, f"{small} queries for one page"

    with django_assert_num_queries(small):
        response = client.get("/api/releases/?page_size=200")
    data = response.json()["data"]
    assert len(data["results"]) == 200
    assert {item["created_by"] for item in data["results"]} == {f"author-{n}" for n in range(5)}
    assert [item["created_at"] for item in data["results"]] == sorted(
        (item["created_at"] for item in data["results"]), reverse=True
    )


@pytest.mark.parametrize("query", ["?status=promoted", "?to_env=prod&page=1", "?status=failed&to_env=prod"])
def test_release_list__filtered__same_number_of_queries_for_any_page_size(
    client, django_assert_num_queries, query
):
    client.get(f"/api/releases/{query}")  # the first count of a to_env filter is computed, then kept
    small, page = queries_for(client, f"/api/releases/{query}&page_size=10")
    assert page["results"] and small <= 6, f"{small} queries for one page"
    with django_assert_num_queries(small):
        response = client.get(f"/api/releases/{query}&page_size=200")
    assert response.status_code == 200 and len(response.json()["data"]["results"]) > 10


def test_release_list__unfiltered_page__one_statement_after_authentication(client):
    with CaptureQueriesContext(connection) as bare:
        client.get("/api/releases/rel_20990101_0000")  # authenticates, then one lookup: a 404
    with CaptureQueriesContext(connection) as listing:
        assert client.get("/api/releases/?page_size=200").status_code == 200
    assert len(listing) == len(bare), [query["sql"] for query in listing]


def test_release_list__summaries__no_sql_and_no_bundle(client):
    _, page = queries_for(client, "/api/releases/?page_size=5")
    for item in page["results"]:
        assert "migrations" not in item and "bundle" not in item and "lint" not in item
        assert item["from_env"] in ("dev", "staging") and item["release_id"].startswith("rel_")


def test_release_summaries__same_as_release_summary(client):
    from releases.api.serializers import release_summary
    from releases.selectors import ReleaseSummaries, release_list

    tenant = Release.objects.first().tenant
    Release.objects.filter(pk=Release.objects.order_by("pk").first().pk).update(
        created_by=None, promoted_at=timezone.now(), error_message='boom "quoted" \\ é\n\t\x01 ✓'
    )
    Release.objects.filter(pk=Release.objects.order_by("pk")[1].pk).update(
        error_message="", failed_at=datetime(2024, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    )
    Release.objects.filter(pk=Release.objects.order_by("pk")[2].pk).update(
        # No microseconds (stored without them), and not in UTC: 17:00 at +05:00 is 12:00Z.
        failed_at=datetime(2024, 6, 1, 17, 0, 0, tzinfo=dt_timezone(timedelta(hours=5)))
    )
    rows = ReleaseSummaries(tenant=tenant).page(0, RELEASES)
    models = [release_summary(release) for release in release_list(tenant=tenant)]
    assert len(rows) == RELEASES and rows == models
    failed = {item["failed_at"] for item in rows}
    assert {"2024-12-31T23:59:59Z", "2024-06-01T12:00:00Z"} <= failed
    assert any(item["created_by"] is None and item["error_message"].startswith("boom") for item in rows)


@pytest.mark.parametrize(
    "filters", [{"status": "promoted"}, {"to_env": "prod"}, {"status": "failed", "to_env": "prod"}, {}]
)
def test_release_summaries__filters_and_pages__same_releases_as_the_orm(client, filters):
    from releases.api.serializers import release_summary
    from releases.selectors import ReleaseSummaries, release_list

    tenant = Release.objects.first().tenant
    expected = [release_summary(release) for release in release_list(tenant=tenant, **filters)]
    summaries = ReleaseSummaries(tenant=tenant, **filters)
    assert summaries.count() == len(expected) > 0
    assert summaries.page(7, 12) == expected[7:19]
    assert summaries.page(len(expected), 5) == []


def test_release_list__page_two__continues_where_page_one_ends(client):
    first = client.get("/api/releases/?page_size=30").json()["data"]
    second = client.get(first["next"]).json()["data"]
    assert second["count"] == RELEASES and second["previous"]
    ids = [item["release_id"] for item in first["results"] + second["results"]]
    assert len(ids) == len(set(ids)) == 60
    assert client.get("/api/releases/?page=999").status_code == 404


def test_release_list__new_release_or_status_change__counts_exact_at_once(client):
    tenant = Release.objects.first().tenant
    before = client.get("/api/releases/").json()["data"]["count"]
    promoted = client.get("/api/releases/?status=promoted").json()["data"]["count"]
    to_prod = client.get("/api/releases/?to_env=prod").json()["data"]["count"]

    seed_more = Release.objects.filter(tenant=tenant).order_by("-created_at").first()
    seed_more.pk, seed_more.release_id, seed_more.created_at = None, "rel_20990101_0000", timezone.now()
    seed_more.status = ReleaseStatus.PROMOTED
    seed_more.save()
    Release.objects.filter(pk=Release.objects.filter(tenant=tenant, status="prepared").first().pk).update(
        status=ReleaseStatus.PROMOTED
    )

    assert client.get("/api/releases/").json()["data"]["count"] == before + 1
    assert client.get("/api/releases/?status=promoted").json()["data"]["count"] == promoted + 2
    expected_prod = to_prod + (1 if seed_more.to_environment.stage == "prod" else 0)
    assert client.get("/api/releases/?to_env=prod").json()["data"]["count"] == expected_prod


def test_release_list__unfiltered_count__kept_not_recounted(client):
    def statements(path: str) -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            assert client.get(path).status_code == 200
        return [query["sql"].upper() for query in captured]

    assert not any("COUNT(" in sql for sql in statements("/api/releases/?page_size=10"))
    assert any("COUNT(" in sql for sql in statements("/api/releases/?status=promoted"))


@pytest.mark.parametrize(
    "query, status, first, size",
    [
        ("?page=2&page_size=100", 200, 100, 100),
        ("?page=last&page_size=100", 200, 200, 50),
        ("?page_size=0", 200, 0, 50),  # not a positive size: the default
        ("?page_size=abc", 200, 0, 50),
        ("?page_size=100000", 200, 0, 200),  # capped at max_page_size
        ("?page=3&page_size=100", 200, 200, 50),
        ("?page=4&page_size=100", 404, None, None),  # past the end
        ("?page=0", 404, None, None),
        ("?page=-1", 404, None, None),
        ("?page=abc", 404, None, None),
        ("?page=1.0", 404, None, None),
        ("?page=99999999999999999999999", 404, None, None),  # past what OFFSET takes: no 500
    ],
)
def test_release_list__pages_and_sizes__as_drf_paginates(client, query, status, first, size):
    response = client.get(f"/api/releases/{query}")
    assert response.status_code == status, response.content
    body = response.json()
    if status == 404:
        assert body["success"] is False and body["error"]["code"] == "not_found"
        return
    data = body["data"]
    expected = [f"rel_20240101_0000_{n}" for n in range(first, first + size)]
    assert [item["release_id"] for item in data["results"]] == expected
    assert data["count"] == RELEASES


def test_release_list__links__keep_the_filters_and_end_at_the_last_page(client):
    page = client.get("/api/releases/?status=promoted&page_size=10").json()["data"]
    assert page["previous"] is None and "status=promoted" in page["next"] and "page=2" in page["next"]
    pages, seen = 1, [item["release_id"] for item in page["results"]]
    while page["next"]:
        following = client.get(page["next"]).json()["data"]
        assert following["previous"] and "status=promoted" in following["previous"]
        if pages == 1:
            assert "page=" not in following["previous"]  # page 1 is the URL without a page
        page, pages = following, pages + 1
        seen += [item["release_id"] for item in page["results"]]
    assert len(seen) == len(set(seen)) == page["count"] and pages == -(-page["count"] // 10)
    assert all(item["status"] == "promoted" for item in page["results"])


def test_release_list__no_releases__empty_first_page_without_counting(client):
    with CaptureQueriesContext(connection) as captured:
        response = client.get("/api/releases/?status=promoted&to_env=dev")
    data = response.json()["data"]
    assert response.status_code == 200
    assert data == {"count": 0, "next": None, "previous": None, "results": []}
    assert not any("COUNT(" in query["sql"].upper() for query in captured)
    assert client.get("/api/releases/?status=promoted&to_env=dev&page=2").status_code == 404


@pytest.mark.django_db(transaction=True)
def test_prepare__tenant_row_locked__created_at_taken_after_the_lock(sqlite_database_factory):
    """Releases commit in created_at order (the kept count relies on it): a prepare waits for the
    tenant's row, and its created_at is later than the moment the other transaction let go."""
    import threading

    from django.db import transaction

    from tenants.models import Tenant

    if connection.vendor != "postgresql":
        pytest.skip("needs a control database that serves concurrent connections (PostgreSQL)")
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"])
    _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username="acme-admin"))
    held, release_lock, results = threading.Event(), threading.Event(), []

    def hold_tenant_row() -> None:
        try:
            with transaction.atomic():
                Tenant.objects.select_for_update().get(pk=tenant.pk)
                held.set()
                release_lock.wait(timeout=60)
        finally:
            connection.close()

    def prepare() -> None:
        try:
            own = APIClient()
            own.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG="acme")
            body = {"from_env": "dev", "to_env": "staging", "bundle_data": {"feature_flags": {"beta": True}}}
            results.append(own.post("/api/releases/prepare", body, format="json"))
        finally:
            connection.close()

    holder = threading.Thread(target=hold_tenant_row)
    holder.start()
    assert held.wait(timeout=30)
    preparer = threading.Thread(target=prepare)
    preparer.start()
    try:
        with connection.cursor() as cursor:
            for _ in range(300):  # until the prepare waits on a lock
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
                if cursor.fetchone()[0]:
                    break
                preparer.join(timeout=0.1)
            else:
                pytest.fail("the prepare never waited for the tenant's row")
        let_go = timezone.now()
    finally:
        release_lock.set()
        holder.join(timeout=60)
        preparer.join(timeout=120)
    assert results and results[0].status_code == 201, results and results[0].content
    assert Release.objects.get(tenant=tenant).created_at >= let_go
