"""A real Celery worker: /metrics in a web process shows what the worker observed (multiprocess
mode), and the worker logs JSON lines naming the release, its tenant and the task.

A fresh PostgreSQL control database is migrated; a worker (`celery -A releasemgr worker -P solo`)
and a *web* subprocess (Django's test client: prepare, promote, then GET /metrics) share it, the
Redis broker (keys namespaced by CELERY_KEY_PREFIX) and a PROMETHEUS_MULTIPROC_DIR of this test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.worker, pytest.mark.redis, pytest.mark.postgres]

REPO = Path(__file__).resolve().parent.parent
MARK = "WEB-RESULT:"

WEB_SCRIPT = (
    f"MARK = {MARK!r}\n"
    """
import json, os, sys, django
django.setup()
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient
from tenants.services import tenant_setup, token_issue

slug, urls = sys.argv[1], json.loads(sys.argv[2])
tenant = tenant_setup(slug=slug, environments=urls, admins=[slug + "-admin"])
_, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username=slug + "-admin"))
api = APIClient()
api.credentials(HTTP_AUTHORIZATION="Bearer " + token, HTTP_X_TENANT_SLUG=slug)
bundle = {"database": {"changes": [{"type": "create_table", "table": "widgets",
          "columns": [{"name": "n", "type": "text"}]}]}, "feature_flags": {}}
prepared = api.post("/api/releases/prepare", {"from_env": "dev", "to_env": "staging", "bundle_data": bundle},
                    format="json").json()["data"]
promoted = api.post("/api/releases/promote", {"release_id": prepared["release_id"], "wait_seconds": 90},
                    format="json").json()["data"]
metrics = Client().get("/metrics").content.decode()
print(MARK + json.dumps({"pid": os.getpid(), "status": promoted["status"], "metrics": metrics}))
"""
)


def test_worker__promotion_runs_in_a_celery_worker__web_scrape_shows_it_and_worker_logs_json(
    tmp_path, pg_database_factory, sqlite_database_factory, redis_url
):
    slug = f"mw{uuid.uuid4().hex[:8]}"
    prefix = f"rmtest-{uuid.uuid4().hex[:12]}:"
    multiproc_dir = tmp_path / "prometheus"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "releasemgr.settings",
        "PYTHONPATH": str(REPO),
        "DATABASE_URL": pg_database_factory(),
        "CELERY_BROKER_URL": redis_url,
        "CELERY_KEY_PREFIX": prefix,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
        "EMAIL_URL": f"filemail:///{tmp_path / 'mail'}",  # environ drops one slash
        "BACKUP_DIR": str(tmp_path / "backups"),
        "LOG_LEVEL": "WARNING",
    }
    migrate = subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert migrate.returncode == 0, migrate.stderr
    worker_log = tmp_path / "worker.log"
    with worker_log.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "releasemgr", "worker", "-P", "solo", "-l", "info",
             "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"{prefix.rstrip(':')}@%h"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
        web = subprocess.run(
            [sys.executable, "-c", WEB_SCRIPT, slug, json.dumps(urls)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        lines = [line for line in web.stdout.splitlines() if line.startswith(MARK)]
        assert web.returncode == 0 and lines, (
            f"{web.stderr[-3000:]}\nworker:\n{worker_log.read_text()[-3000:]}"
        )
        result = json.loads(lines[-1][len(MARK) :])
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=20)
        import redis

        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    assert result["status"] == "promoted", worker_log.read_text()[-3000:]
    assert result["pid"] != worker.pid != os.getpid()
    # Each process keeps its own file; the worker's holds the promotion, the web process's the prepare.
    files = {path.name for path in multiproc_dir.iterdir()}
    assert f"histogram_{worker.pid}.db" in files and f"histogram_{result['pid']}.db" in files
    found = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(result["metrics"])
        for sample in family.samples
    }
    labels = frozenset({"tenant": slug, "environment": "staging"}.items())
    assert found[("release_promote_seconds_count", labels)] == 1
    assert found[("release_promote_seconds_sum", labels)] > 0
    assert found[("release_prepare_seconds_count", labels)] == 1
    assert found[("releases_promoted_total", labels)] == 1
    assert found[("releases_prepared_total", labels)] == 1

    # The worker's own log: JSON lines through settings.LOGGING (Celery does not take over the root
    # logger), the promotion's line carrying the release, the tenant and the task's request id.
    entries = [json.loads(line) for line in worker_log.read_text().splitlines() if line.startswith("{")]
    [promoted_line] = [
        entry for entry in entries if entry.get("tenant") == slug and entry["message"].endswith(" promoted")
    ]
    assert promoted_line["logger"] == "releases.services" and promoted_line["environment"] == "staging"
    assert promoted_line["request_id"].startswith(f"celery:{worker.pid}:")
    assert any(entry["logger"].startswith("celery") for entry in entries)
