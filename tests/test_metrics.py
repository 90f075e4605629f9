"""GET /metrics: the guide's names, counters from the audit events, histograms across processes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from releases import metrics
from releases.services import audit_record
from tenants.models import Environment
from tenants.services import tenant_setup, token_issue

pytestmark = pytest.mark.django_db

BASE_DIR = Path(__file__).resolve().parent.parent
GUIDE_NAMES = [
    "releases_prepared_total",
    "releases_promoted_total",
    "releases_failed_total",
    "releases_rolled_back_total",
    "release_prepare_seconds",
    "release_promote_seconds",
    "release_rollback_seconds",
]


def scrape(client: Client | None = None, **headers) -> dict[tuple[str, frozenset], float]:
    response = (client or Client()).get("/metrics", **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return samples(response.content.decode())


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float | None:
    return found.get((name, frozenset(labels.items())))


def unique_slug() -> str:
    return f"m{uuid.uuid4().hex[:10]}"


def test_metrics__audit_events__counted_per_tenant_and_environment(sqlite_database_factory):
    slug = unique_slug()
    tenant = tenant_setup(
        slug=slug, environments={s: sqlite_database_factory() for s in ("dev", "staging", "prod")}
    )
    staging = Environment.objects.get(tenant=tenant, stage="staging")
    prod = Environment.objects.get(tenant=tenant, stage="prod")
    for event, environment, payload in [
        ("release.prepared", staging, {}),
        ("release.prepared", staging, {}),
        ("release.prepared", prod, {}),
        ("release.promoted", staging, {}),
        ("release.failed", prod, {"phase": "promote"}),
        ("release.rollback", staging, {"flags": {}}),
        ("release.rollback", staging, {"ok": False, "code": "rollback_blocked"}),  # refused: not counted
        ("release.approved", prod, {}),
    ]:
        audit_record(event=event, tenant=tenant, environment=environment, payload=payload)

    found = scrape()

    assert value(found, "releases_prepared_total", tenant=slug, environment="staging") == 2
    assert value(found, "releases_prepared_total", tenant=slug, environment="prod") == 1
    assert value(found, "releases_promoted_total", tenant=slug, environment="staging") == 1
    assert value(found, "releases_promoted_total", tenant=slug, environment="prod") is None
    assert value(found, "releases_failed_total", tenant=slug, environment="prod") == 1
    assert value(found, "releases_rolled_back_total", tenant=slug, environment="staging") == 1
    assert value(found, "releasemgr_audit_metrics_up") == 1


def test_metrics__no_events__counter_names_still_exposed():
    text = Client().get("/metrics").content.decode()
    for name in GUIDE_NAMES[:4]:
        assert f"# TYPE {name} counter" in text


def test_metrics__histogram_observed_in_another_process__summed_on_scrape():
    """A worker process (a separate interpreter) and this process write to the same multiprocess dir."""
    slug = unique_slug()
    multiproc_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    script = (
        "import os, django\n"
        "django.setup()\n"
        "from releases import metrics\n"
        f"metrics.observe('promote', 2.5, tenant={slug!r}, environment='prod')\n"
        f"metrics.observe('promote', 0.5, tenant={slug!r}, environment='prod')\n"
        "print(os.getpid(), os.environ['PROMETHEUS_MULTIPROC_DIR'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "releasemgr.settings"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    worker_pid, worker_dir = result.stdout.split()
    assert int(worker_pid) != os.getpid() and worker_dir == multiproc_dir

    metrics.observe("promote", 1.0, tenant=slug, environment="prod")
    found = scrape()

    assert value(found, "release_promote_seconds_sum", tenant=slug, environment="prod") == pytest.approx(4.0)
    assert value(found, "release_promote_seconds_count", tenant=slug, environment="prod") == 3
    assert value(found, "release_promote_seconds_bucket", tenant=slug, environment="prod", le="1.0") == 2


@pytest.mark.django_db(transaction=True)
def test_metrics__prepare_promote_rollback_over_the_api__every_guide_metric_moves(sqlite_database_factory):
    slug = unique_slug()
    tenant = tenant_setup(
        slug=slug,
        environments={s: sqlite_database_factory() for s in ("dev", "staging", "prod")},
        admins=[f"{slug}-admin"],
    )
    _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username=f"{slug}-admin"))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    bundle = {
        "database": {
            "changes": [
                {"type": "create_table", "table": "widgets", "columns": [{"name": "name", "type": "text"}]}
            ]
        },
        "feature_flags": {},
    }

    prepared = api.post(
        "/api/releases/prepare",
        {"from_env": "dev", "to_env": "staging", "bundle_data": bundle},
        format="json",
    )
    assert prepared.status_code == 201, prepared.content
    release_id = prepared.json()["data"]["release_id"]
    promoted = api.post("/api/releases/promote", {"release_id": release_id}, format="json")
    assert promoted.json()["data"]["status"] == "promoted", promoted.content
    rolled_back = api.post("/api/releases/rollback", {"release_id": release_id}, format="json")
    assert rolled_back.json()["data"]["status"] == "rolled_back", rolled_back.content

    found = scrape()
    labels = {"tenant": slug, "environment": "staging"}
    assert value(found, "releases_prepared_total", **labels) == 1
    assert value(found, "releases_promoted_total", **labels) == 1
    assert value(found, "releases_rolled_back_total", **labels) == 1
    assert value(found, "releases_failed_total", **labels) is None
    for phase in ("prepare", "promote", "rollback"):
        assert value(found, f"release_{phase}_seconds_count", **labels) == 1
        assert value(found, f"release_{phase}_seconds_sum", **labels) > 0


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 401), ("Bearer wrong-token", 401), ("Basic c2NyYXBlLXRva2Vu", 401), ("Bearer scrape-token", 200)],
)
def test_metrics__token_configured__bearer_required(settings, header, expected):
    settings.METRICS_TOKEN = "scrape-token"
    headers = {"HTTP_AUTHORIZATION": header} if header else {}

    response = Client().get("/metrics", **headers)

    assert response.status_code == expected
    if expected == 401:
        assert response["WWW-Authenticate"].startswith("Bearer")
        assert b"releases_prepared_total" not in response.content
        assert response.json()["error"]["code"] == "unauthorized"
    else:
        assert b"# TYPE releases_prepared_total counter" in response.content


def test_metrics__no_token_configured__open_and_post_refused(settings):
    settings.METRICS_TOKEN = ""
    assert Client().get("/metrics").status_code == 200
    assert Client().get("/metrics/").status_code == 200
    assert Client().post("/metrics").status_code == 405


def test_metrics__multiprocess_dir_vanished__observe_logs_and_does_not_raise(tmp_path):
    """A release must never fail because its duration could not be recorded."""
    script = (
        "import shutil, os, django\n"
        "django.setup()\n"
        "shutil.rmtree(os.environ['PROMETHEUS_MULTIPROC_DIR'])\n"
        "from releases import metrics\n"
        "metrics.observe('prepare', 1.0, tenant='t', environment='staging')\n"
        "print('survived')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=BASE_DIR,
        env={
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "releasemgr.settings",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "gone"),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "survived"
    assert "could not record prepare duration: FileNotFoundError" in result.stderr
