"""GET /health: the guide's releases block, control database and broker; 503 when the database is down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.test import Client
from django.utils import timezone

from releases.models import Release, ReleaseStatus
from tenants.models import Environment
from tenants.services import tenant_setup

BASE_DIR = Path(__file__).resolve().parent.parent


def get_health(**headers) -> tuple[int, dict]:
    response = Client().get("/health", **headers)
    assert response["Content-Type"] == "application/json"
    assert response["Cache-Control"] == "no-store"
    return response.status_code, response.json()


@pytest.fixture
def health_tenant(settings, sqlite_database_factory):
    """A tenant with dev, staging and prod, named by HEALTH_TENANT for this test."""
    slug = f"health{uuid.uuid4().hex[:8]}"
    settings.HEALTH_TENANT = slug
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    return tenant_setup(slug=slug, environments=urls), urls


def make_release(tenant, release_id: str, status: str, *, age_seconds: float = 0) -> Release:
    staging = Environment.objects.get(tenant=tenant, stage="staging")
    prod = Environment.objects.get(tenant=tenant, stage="prod")
    when = timezone.now() - timedelta(seconds=age_seconds)
    return Release.objects.create(
        tenant=tenant,
        release_id=release_id,
        from_environment=staging,
        to_environment=prod,
        status=status,
        bundle={"database": {"changes": []}, "feature_flags": {"beta": True}},
        bundle_sha256="0" * 64,
        created_at=when,
        status_changed_at=when,
    )


@pytest.mark.django_db
def test_health__no_health_tenant__not_configured_but_ok(settings):
    settings.HEALTH_TENANT = "no-such-tenant"
    status_code, body = get_health()

    assert status_code == 200
    assert body["releases"] == {
        "configured": False,
        "ok": True,
        "latest_release": None,
        "latest_release_status": None,
        "environment": settings.RELEASEMGR_ENV,
        "tenant": "no-such-tenant",
    }
    assert body["database"]["ok"] is True and body["database"]["vendor"] in ("sqlite", "postgresql")
    assert body["broker"] == {"ok": True, "mode": "eager"}
    assert body["status"] == "ok"
    assert Client().get("/health/").status_code == 200


@pytest.mark.django_db
def test_health__configured_tenant_with_prepared_release__ok_and_latest_named(health_tenant, settings):
    tenant, urls = health_tenant
    settings.RELEASEMGR_ENV = "production"
    make_release(tenant, "rel_20250101_1000", ReleaseStatus.FAILED, age_seconds=600)
    make_release(tenant, "rel_20250101_1100", ReleaseStatus.PROMOTED, age_seconds=300)
    make_release(tenant, "rel_20250101_1200", ReleaseStatus.PREPARED, age_seconds=10)

    status_code, body = get_health()

    assert status_code == 200 and body["status"] == "ok"
    releases = body["releases"]
    assert releases["configured"] is True and releases["ok"] is True
    assert (
        releases["latest_release"] == "rel_20250101_1200" and releases["latest_release_status"] == "prepared"
    )
    assert releases["environment"] == "production"
    text = json.dumps(body)
    for url in urls.values():
        assert url.removeprefix("sqlite:///") not in text


@pytest.mark.django_db
def test_health__tenant_missing_an_environment__not_configured(health_tenant):
    tenant, _ = health_tenant
    Environment.objects.filter(tenant=tenant, stage="prod").delete()

    _, body = get_health()

    assert body["releases"]["configured"] is False


@pytest.mark.django_db
def test_health__latest_release_failed__not_ok_degraded_200(health_tenant):
    tenant, _ = health_tenant
    make_release(tenant, "rel_20250101_1200", ReleaseStatus.PROMOTED, age_seconds=60)
    make_release(tenant, "rel_20250101_1300", ReleaseStatus.FAILED)

    status_code, body = get_health()

    assert status_code == 200 and body["status"] == "degraded"
    assert body["releases"]["ok"] is False and body["releases"]["problem"] == "latest_release_failed"
    assert body["releases"]["latest_release"] == "rel_20250101_1300"


@pytest.mark.django_db
@pytest.mark.parametrize("status", [ReleaseStatus.PROMOTING, ReleaseStatus.ROLLING_BACK])
def test_health__release_in_flight_beyond_stuck_timeout__not_ok(health_tenant, settings, status):
    tenant, _ = health_tenant
    settings.RELEASE_STUCK_SECONDS = 120
    make_release(tenant, "rel_20250101_1200", status, age_seconds=121)

    _, body = get_health()

    assert body["releases"]["ok"] is False and body["releases"]["problem"] == "latest_release_stuck"


@pytest.mark.django_db
def test_health__release_in_flight_within_timeout__ok(health_tenant, settings):
    tenant, _ = health_tenant
    settings.RELEASE_STUCK_SECONDS = 120
    make_release(tenant, "rel_20250101_1200", ReleaseStatus.PROMOTING, age_seconds=30)

    _, body = get_health()

    assert body["releases"]["ok"] is True and body["releases"]["latest_release_status"] == "promoting"


@pytest.mark.django_db
def test_health__any_authorization_header__still_answers_without_auth():
    status_code, _ = get_health(HTTP_AUTHORIZATION="Bearer not-a-token", HTTP_X_TENANT_SLUG="nobody")
    assert status_code == 200


@pytest.mark.django_db
@pytest.mark.redis
def test_health__redis_broker_reachable__ok(settings, redis_url):
    settings.CELERY_BROKER_URL = redis_url

    _, body = get_health()

    assert body["broker"]["ok"] is True and body["broker"]["mode"] == "broker"
    assert body["broker"]["transport"] == "redis"


@pytest.mark.django_db
def test_health__broker_unreachable__degraded_without_its_address(settings):
    settings.CELERY_BROKER_URL = "redis://:broker-secret@127.0.0.1:1/0"
    settings.HEALTH_BROKER_TIMEOUT_SECONDS = 1

    status_code, body = get_health()

    assert status_code == 200 and body["status"] == "degraded"
    assert body["broker"]["ok"] is False and body["broker"]["error"]
    text = json.dumps(body)
    assert "127.0.0.1" not in text and "broker-secret" not in text


HEALTH_SCRIPT = """
import json, django
django.setup()
from django.test import Client
client = Client()
health = client.get("/health")
metrics = client.get("/metrics")
print(json.dumps({"status": health.status_code, "body": health.json(),
                  "metrics_status": metrics.status_code, "metrics": metrics.content.decode()}))
"""


@pytest.mark.parametrize(
    "database_url",
    [
        "sqlite:///{tmp}/no-such-directory/control.sqlite3",
        "postgres://releasemgr:db-password@127.0.0.1:1/control",
    ],
    ids=["sqlite-unopenable", "postgres-refused"],
)
def test_health__control_database_down__503_without_secrets(tmp_path, database_url):
    """A real outage in a separate process: the control database cannot be opened at all."""
    database_url = database_url.format(tmp=tmp_path)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RELEASEMGR_ENV", "CELERY_BROKER_URL", "METRICS_TOKEN")
    }
    env.update(DJANGO_SETTINGS_MODULE="releasemgr.settings", DATABASE_URL=database_url, FLASK_ENV="staging")

    result = subprocess.run(
        [sys.executable, "-c", HEALTH_SCRIPT],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["status"] == 503
    body = outcome["body"]
    assert body["status"] == "unavailable"
    assert body["database"]["ok"] is False and body["database"]["error"]
    assert body["releases"]["ok"] is False and body["releases"]["problem"] == "control_database_unavailable"
    assert body["releases"]["environment"] == "staging"  # FLASK_ENV is RELEASEMGR_ENV's alias
    for secret in ("no-such-directory", str(tmp_path), "db-password", "127.0.0.1:1", "releasemgr:"):
        assert secret not in result.stdout.split('"metrics"')[0]
        assert secret not in result.stderr
    # /metrics still answers: histograms from files, counters marked unavailable.
    assert outcome["metrics_status"] == 200
    assert "releasemgr_audit_metrics_up 0.0" in outcome["metrics"]
