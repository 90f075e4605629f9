"""Throttling of the release endpoints: 429 `rate_limited` in the envelope with Retry-After."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.test import override_settings
from rest_framework.test import APIClient

from releases.models import Release
from tenants.models import Role
from tenants.services import membership_set, tenant_setup, token_issue, user_ensure

pytestmark = pytest.mark.django_db

BASE_DIR = Path(__file__).resolve().parent.parent


def client_for(token: str, slug: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client


def django_setup_with(script: str = "", **environment: str) -> subprocess.CompletedProcess:
    """django.setup() with the settings read from these environment variables, then `script`."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "releasemgr.settings", **environment}
    return subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {script}"],
        env=env,
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )


def rates(releases: str):
    """Settings with another `releases` rate; the counts start from zero."""
    cache.clear()
    rest_framework = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "releases": releases},
    }
    return override_settings(REST_FRAMEWORK=rest_framework)


@pytest.fixture
def tenant(sqlite_database_factory):
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"])
    _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username="acme-admin"))
    return tenant, client_for(token, "acme")


def test_list__over_the_rate__429_rate_limited_with_retry_after(tenant):
    _, client = tenant
    with rates("3/min"):
        statuses = [client.get("/api/releases/").status_code for _ in range(3)]
        response = client.get("/api/releases/")

    assert statuses == [200, 200, 200]
    assert response.status_code == 429
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == "rate_limited" and body["error"]["message"]
    retry_after = int(response["Retry-After"])
    assert 1 <= retry_after <= 61


def test_prepare__over_the_rate__429_and_nothing_prepared(tenant):
    _, client = tenant
    body = {"from_env": "dev", "to_env": "staging", "bundle_data": {"feature_flags": {"beta": True}}}
    with rates("1/hour"):
        first = client.post("/api/releases/prepare", body, format="json")
        second = client.post("/api/releases/prepare", body, format="json")

    assert first.status_code == 201, first.content
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"
    assert int(second["Retry-After"]) > 60
    assert Release.objects.count() == 1


@pytest.mark.parametrize(
    "method, path",
    [
        ("get", "/api/releases/"),
        ("get", "/api/releases/rel_20200101_0000"),
        ("post", "/api/releases/promote"),
        ("post", "/api/releases/rollback"),
        ("post", "/api/releases/rel_20200101_0000/approve"),
        ("post", "/api/releases/rel_20200101_0000/reject"),
    ],
)
def test_release_endpoints__second_request_over_1_per_min__429(tenant, method, path):
    _, client = tenant
    send = getattr(client, method)
    with rates("1/min"):
        first = send(path, format="json")
        second = send(path, format="json")
    assert first.status_code != 429
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limited"


def test_rate__counted_per_tenant_and_user__others_not_limited(tenant, sqlite_database_factory):
    tenant_obj, client = tenant
    colleague = user_ensure(username="acme-admin-2")
    membership_set(tenant=tenant_obj, user=colleague, role=Role.ADMIN)
    _, colleague_token = token_issue(tenant=tenant_obj, user=colleague)
    other_urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    other = tenant_setup(slug="other", environments=other_urls, admins=["acme-admin"])
    _, other_token = token_issue(tenant=other, user=get_user_model().objects.get(username="acme-admin"))

    with rates("2/min"):
        assert [client.get("/api/releases/").status_code for _ in range(3)] == [200, 200, 429]
        assert client_for(colleague_token, "acme").get("/api/releases/").status_code == 200
        assert client_for(other_token, "other").get("/api/releases/").status_code == 200


def test_rate__burst_then_one_per_interval__retry_after_exact(tenant, monkeypatch):
    """N per period: N at once, then one every period/N; Retry-After says when the next passes."""
    from releasemgr.throttling import TenantScopedRateThrottle

    _, client = tenant
    clock = [1_000_000.0]
    monkeypatch.setattr(TenantScopedRateThrottle, "timer", lambda self: clock[0])
    with rates("2/min"):
        assert [client.get("/api/releases/").status_code for _ in range(2)] == [200, 200]
        refused = client.get("/api/releases/")
        assert refused.status_code == 429 and int(refused["Retry-After"]) == 30
        clock[0] += 29.5
        refused = client.get("/api/releases/")
        assert refused.status_code == 429 and int(refused["Retry-After"]) == 1
        clock[0] += 0.5
        assert [client.get("/api/releases/").status_code for _ in range(2)] == [200, 429]
        clock[0] += 60  # idle for a period: the whole burst is back, not more
        assert [client.get("/api/releases/").status_code for _ in range(3)] == [200, 200, 429]


def test_rate__changed_to_a_shorter_period__old_wait_not_carried(tenant, monkeypatch):
    from releasemgr.throttling import TenantScopedRateThrottle

    _, client = tenant
    clock = [1_000_000.0]
    monkeypatch.setattr(TenantScopedRateThrottle, "timer", lambda self: clock[0])
    with rates("10/hour"):
        assert {client.get("/api/releases/").status_code for _ in range(10)} == {200}
        assert int(client.get("/api/releases/")["Retry-After"]) == 360
    clock[0] += 120
    rest_framework = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"], "releases": "10/min"},
    }
    with override_settings(REST_FRAMEWORK=rest_framework):  # the same counts, a new rate
        assert client.get("/api/releases/").status_code == 200


def test_rate__zero__every_request_refused_with_retry_after_not_a_500(tenant):
    _, client = tenant
    with rates("0/min"):
        response = client.get("/api/releases/")
    assert response.status_code == 429 and response.json()["error"]["code"] == "rate_limited"
    assert int(response["Retry-After"]) == 60


@pytest.mark.parametrize("rate", ["abc", "0/min", "10", "10/fortnight", "-5/min", "10/min/x"])
def test_rates__malformed_in_the_environment__start_up_refused(rate):
    result = django_setup_with(THROTTLE_RELEASES=rate)
    assert result.returncode != 0
    assert "THROTTLE_RELEASES must be a positive number of requests" in result.stderr
    assert repr(rate) in result.stderr


def test_rate__state__one_number_per_client_whatever_the_rate(tenant):
    """DRF's own throttle keeps a timestamp per request of the period (its cost grows with the rate)."""
    _, client = tenant
    with rates("100000/hour"):
        assert {client.get("/api/releases/").status_code for _ in range(40)} == {200}
        keys = [key for key in cache._cache if "throttle_gcra_releases_" in key]
        assert len(keys) == 1
        assert isinstance(cache.get(keys[0].split(":", 2)[-1]), float)


def test_rates__from_the_environment__in_settings():
    script = (
        "from rest_framework.settings import api_settings as s; "
        "print(s.DEFAULT_THROTTLE_RATES['releases'], s.DEFAULT_THROTTLE_RATES['tools'])"
    )
    result = django_setup_with(script, THROTTLE_RELEASES="7/hour", THROTTLE_TOOLS="9/min")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["7/hour", "9/min"]


@pytest.mark.redis
def test_rate__redis_cache_url__counts_shared_by_every_process(tenant, redis_url):
    """With CACHE_URL=redis://... the counts live in Redis, where every web process sees them."""
    import redis as redis_client

    _, client = tenant
    prefix = f"rm-test-{uuid.uuid4().hex[:8]}"
    caches = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": redis_url,
            "KEY_PREFIX": prefix,
        }
    }
    connection = redis_client.Redis.from_url(redis_url)
    try:
        with override_settings(CACHES=caches), rates("2/min"):
            assert [client.get("/api/releases/").status_code for _ in range(3)] == [200, 200, 429]
            keys = connection.keys(f"{prefix}:*throttle_gcra_releases_*")
            assert len(keys) == 1
            # Another process shares the count: drop it there, and this one is allowed again.
            connection.delete(*keys)
            assert client.get("/api/releases/").status_code == 200
    finally:
        leftover = connection.keys(f"{prefix}:*")
        if leftover:
            connection.delete(*leftover)
        connection.close()


def test_cache_url__from_the_environment__redis_backend(tmp_path):
    script = "from django.conf import settings as s; print(s.CACHES['default'])"
    result = django_setup_with(script, CACHE_URL="redis://cache.internal:6379/2")
    assert result.returncode == 0, result.stderr
    assert "django.core.cache.backends.redis.RedisCache" in result.stdout
    assert "redis://cache.internal:6379/2" in result.stdout
