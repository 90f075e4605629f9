"""A real Celery worker over real Redis, with a PostgreSQL control database and PostgreSQL targets.

How the processes share one control database (a worker cannot see pytest-django's test database):

- each test creates a fresh PostgreSQL database and runs `manage.py migrate` into it (subprocess);
- the web side runs in a *driver* subprocess (`python -c ...`, Django set up with the same
  DATABASE_URL and CELERY_BROKER_URL): it sets up the tenant and calls the API with Django's test
  client, exactly as a CI pipeline would over HTTP;
- the worker is `python -m celery -A releasemgr worker -P solo`, started with Popen (no shell) and
  stopped or SIGKILLed by its own PID;
- every broker key is namespaced by CELERY_KEY_PREFIX, so concurrent runs on one Redis never take
  each other's tasks; the keys are deleted afterwards;
- this test process reads the outcome straight from PostgreSQL with psycopg2.

Audit events written by a task carry `request_id = celery:<pid>:<task id>` (releases/tasks.py), which
is how the test proves the promotion ran in the worker process, not in the driver or here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.worker, pytest.mark.redis, pytest.mark.postgres]

REPO = Path(__file__).resolve().parent.parent
REDIS_DB = 14
RESULT_MARK = "DRIVER-RESULT:"
ADD_NOTES = {
    "database": {
        "changes": [{"type": "add_column", "table": "accounts", "column": {"name": "notes", "type": "text"}}]
    },
    "feature_flags": {"new_checkout": True},
}


# --- the driver: runs in a subprocess against the shared control database ---------------------


def driver_main() -> None:
    """Entry point of the driver subprocess: `action` and its params come as JSON in argv[1]."""
    request = json.loads(sys.argv[1])
    result = DRIVER_ACTIONS[request["action"]](**request.get("params", {}))
    print(RESULT_MARK + json.dumps({"pid": os.getpid(), **result}), flush=True)


def _api(token: str, slug: str):
    from rest_framework.test import APIClient

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client


def _driver_setup(slug: str, urls: dict, staging_policy: dict | None = None) -> dict:
    from django.contrib.auth import get_user_model

    from tenants.models import Environment
    from tenants.services import tenant_setup, token_issue

    tenant = tenant_setup(slug=slug, environments=urls, admins=[f"{slug}-admin"], approvers=[f"{slug}-ok"])
    for user in get_user_model().objects.filter(username__startswith=f"{slug}-"):
        user.email = f"{user.username}@example.com"
        user.save(update_fields=["email"])
    if staging_policy:
        Environment.objects.filter(tenant=tenant, stage="staging").update(**staging_policy)
    admin = get_user_model().objects.get(username=f"{slug}-admin")
    _, token = token_issue(tenant=tenant, user=admin)
    return {"token": token}


def _driver_prepare(slug: str, token: str) -> dict:
    response = _api(token, slug).post(
        "/api/releases/prepare",
        {"from_env": "dev", "to_env": "staging", "bundle_data": ADD_NOTES},
        format="json",
    )
    data = response.json()
    assert response.status_code == 201, data
    return {"release_id": data["data"]["release_id"], "status": data["data"]["status"]}


def _driver_post(slug: str, token: str, path: str, body: dict) -> dict:
    response = _api(token, slug).post(path, body, format="json")
    return {"status_code": response.status_code, "body": response.json()}


def _driver_get(slug: str, token: str, release_id: str) -> dict:
    response = _api(token, slug).get(f"/api/releases/{release_id}")
    return {"status_code": response.status_code, "body": response.json()}


def _driver_reconcile(release_id: str, timeout: float) -> dict:
    from releases import services
    from releases.models import Release

    deadline = time.monotonic() + timeout
    rounds = 0
    while True:
        rounds += 1
        services.reconcile_all()
        release = Release.objects.get(release_id=release_id)
        if release.status not in ("promoting", "rolling_back") or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return {"status": release.status, "error_code": release.error_code, "rounds": rounds}


DRIVER_ACTIONS = {
    "setup": _driver_setup,
    "prepare": _driver_prepare,
    "post": _driver_post,
    "get": _driver_get,
    "reconcile": _driver_reconcile,
}


# --- the test side -------------------------------------------------------------------------------


class LiveStack:
    """A migrated PostgreSQL control database, the environment of its processes, and a worker."""

    def __init__(self, tmp_path: Path, pg_database_factory) -> None:
        self.control_url = pg_database_factory()
        self.prefix = f"rmtest-{uuid.uuid4().hex[:12]}:"
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "releasemgr.settings",
            "PYTHONPATH": str(REPO),
            "DATABASE_URL": self.control_url,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
            "CELERY_KEY_PREFIX": self.prefix,
            "RELEASE_LEASE_SECONDS": "3",
            "EMAIL_URL": f"filemail:///{tmp_path / 'mail'}",  # environ drops one slash
            "BACKUP_DIR": str(tmp_path / "backups"),
            "LOG_LEVEL": "WARNING",
        }
        self.worker: subprocess.Popen | None = None
        self.worker_log = tmp_path / "worker.log"
        self.mail_dir = tmp_path / "mail"
        migrate = subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert migrate.returncode == 0, migrate.stderr

    def drive(self, action: str, **params) -> dict:
        completed = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, django; django.setup(); from tests.test_worker_live import driver_main; driver_main()",
                json.dumps({"action": action, "params": params}),
            ],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARK)]
        assert completed.returncode == 0 and lines, f"driver {action} failed:\n{completed.stderr[-4000:]}"
        return json.loads(lines[-1][len(RESULT_MARK) :])

    def start_worker(self) -> subprocess.Popen:
        log = self.worker_log.open("ab")
        self.worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "releasemgr",
                "worker",
                "-P",
                "solo",
                "-l",
                "info",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"{self.prefix.rstrip(':')}@%h",
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self.worker

    def stop_worker(self, sig: int = signal.SIGTERM) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        os.kill(self.worker.pid, sig)
        try:
            self.worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(self.worker.pid, signal.SIGKILL)
            self.worker.wait(timeout=15)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        import psycopg2

        connection = psycopg2.connect(self.control_url)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall()
        finally:
            connection.close()

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.worker is not None and self.worker.poll() is not None and self.worker.returncode != -9:
                pytest.fail(f"the worker exited ({self.worker.returncode}):\n{self.log_tail()}")
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.worker_log.read_text(errors="replace")[-4000:] if self.worker_log.exists() else ""

    def release_row(self, release_id: str) -> dict:
        [(pk, status, error_code, post_deploy)] = self.query(
            "SELECT id, status, error_code, post_deploy_result FROM releases_release WHERE release_id = %s",
            (release_id,),
        )
        return {"pk": pk, "status": status, "error_code": error_code, "post_deploy": post_deploy}

    def audit(self, release_id: str) -> list[tuple[str, str]]:
        return self.query(
            "SELECT e.event, e.request_id FROM releases_auditevent e JOIN releases_release r ON r.id = e.release_id "
            "WHERE r.release_id = %s ORDER BY e.id",
            (release_id,),
        )

    def close(self) -> None:
        self.stop_worker()
        import redis

        client = redis.Redis.from_url(f"redis://127.0.0.1:6379/{REDIS_DB}")
        keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def stack(tmp_path, pg_database_factory, redis_url):
    live = LiveStack(tmp_path, pg_database_factory)
    yield live
    live.close()


def pg_target(pg_database_factory, *statements: str) -> str:
    import psycopg2

    url = pg_database_factory()
    connection = psycopg2.connect(url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        for sql in statements:
            cursor.execute(sql)
    connection.close()
    return url


ACCOUNTS = (
    "CREATE TABLE accounts (id bigint PRIMARY KEY, email varchar(100) NOT NULL)",
    "INSERT INTO accounts SELECT g, 'user' || g || '@example.com' FROM generate_series(1, 500) g",
)


def target_state(url: str) -> tuple[list, int, bool]:
    """Columns of accounts, its row count, and whether _rm_history exists (with any row)."""
    import psycopg2

    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                "WHERE table_name = 'accounts' ORDER BY ordinal_position"
            )
            columns = cursor.fetchall()
            cursor.execute("SELECT count(*) FROM accounts")
            rows = cursor.fetchone()[0]
            cursor.execute("SELECT to_regclass('_rm_history') IS NOT NULL")
            history = cursor.fetchone()[0]
            if history:
                cursor.execute("SELECT count(*) FROM _rm_history")
                history = cursor.fetchone()[0] > 0
        return columns, rows, history
    finally:
        connection.close()


def test_live_worker__promote_then_rollback__run_in_the_worker_process_202_then_progress(
    stack, pg_database_factory
):
    urls = {stage: pg_target(pg_database_factory, *ACCOUNTS) for stage in ("dev", "staging", "prod")}
    token = stack.drive("setup", slug="live", urls=urls)["token"]
    prepared = stack.drive("prepare", slug="live", token=token)
    release_id = prepared["release_id"]
    assert prepared["status"] == "prepared"

    # Promote before any worker runs: the API must answer 202 `promoting`, and GET shows it.
    promoted = stack.drive(
        "post", slug="live", token=token, path="/api/releases/promote", body={"release_id": release_id}
    )
    assert promoted["status_code"] == 202, promoted
    assert promoted["body"]["data"]["status"] == "promoting"
    progress = stack.drive("get", slug="live", token=token, release_id=release_id)
    assert progress["body"]["data"]["status"] == "promoting"
    assert "notes" not in [c[0] for c in target_state(urls["staging"])[0]]

    worker = stack.start_worker()
    stack.wait_for(lambda: stack.release_row(release_id)["status"] == "promoted", 45, "the worker to promote")
    done = stack.drive("get", slug="live", token=token, release_id=release_id)["body"]["data"]
    assert done["status"] == "promoted" and done["promoted_at"]
    assert "notes" in [c[0] for c in target_state(urls["staging"])[0]]

    # It ran in the worker: the audit event was written by the worker's pid, by a Celery task.
    events = dict(stack.audit(release_id))
    pids = {os.getpid(), promoted["pid"], progress["pid"]}
    assert worker.pid not in pids
    assert events["release.promoted"].startswith(f"celery:{worker.pid}:"), events
    assert not events["release.prepared"].startswith("celery:")
    # post_deployment_task and the notification ran in the worker too.
    stack.wait_for(
        lambda: (stack.release_row(release_id)["post_deploy"] or {}).get("ok") is True,
        20,
        "post_deployment_task",
    )
    stack.wait_for(
        lambda: (
            any("promoted" in p.read_text() for p in stack.mail_dir.glob("*.log"))
            if stack.mail_dir.exists()
            else False
        ),
        20,
        "the promoted notification",
    )
    [(lock_owner,)] = stack.query(
        "SELECT lock_owner FROM tenants_environment e JOIN tenants_tenant t ON t.id = e.tenant_id "
        "WHERE t.slug = 'live' AND e.stage = 'staging'"
    )
    assert lock_owner == ""

    # wait_seconds: the API waits for the worker and answers with the final manifest.
    rolled = stack.drive(
        "post",
        slug="live",
        token=token,
        path="/api/releases/rollback",
        body={"release_id": release_id, "wait_seconds": 40},
    )
    assert rolled["status_code"] == 200, rolled
    assert rolled["body"]["data"]["status"] == "rolled_back"
    assert "notes" not in [c[0] for c in target_state(urls["staging"])[0]]
    events = stack.audit(release_id)
    rollback_request = [request for event, request in events if event == "release.rollback"]
    assert rollback_request and rollback_request[0].startswith(f"celery:{worker.pid}:")
    assert worker.poll() is None, "the worker keeps running"


def _blocked_alter(url: str) -> bool:
    import psycopg2

    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND query ILIKE 'ALTER TABLE%%'"
            )
            return cursor.fetchone()[0] > 0
    finally:
        connection.close()


def _other_backends(url: str) -> int:
    import psycopg2

    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            return cursor.fetchone()[0]
    finally:
        connection.close()


def test_worker_sigkilled_while_apply_waits_for_a_lock__release_settled_failed_and_no_partial_schema(
    stack, pg_database_factory
):
    import psycopg2

    urls = {stage: pg_target(pg_database_factory, *ACCOUNTS) for stage in ("dev", "staging", "prod")}
    # A long lock_timeout so the apply waits (instead of giving up) while the test holds a lock.
    policy = {"apply_lock_timeout_ms": 60_000, "apply_lock_retries": 0}
    token = stack.drive("setup", slug="kill", urls=urls, staging_policy=policy)["token"]
    release_id = stack.drive("prepare", slug="kill", token=token)["release_id"]
    before = target_state(urls["staging"])

    # Another session reads `accounts` in a long transaction: SHARE lets the backup (pg_dump's
    # ACCESS SHARE) through but blocks ALTER TABLE's ACCESS EXCLUSIVE.
    holder = psycopg2.connect(urls["staging"])
    try:
        with holder.cursor() as cursor:
            cursor.execute("LOCK TABLE accounts IN SHARE MODE")
        worker = stack.start_worker()
        promoted = stack.drive(
            "post", slug="kill", token=token, path="/api/releases/promote", body={"release_id": release_id}
        )
        assert promoted["status_code"] == 202 and promoted["body"]["data"]["status"] == "promoting"
        stack.wait_for(
            lambda: _blocked_alter(urls["staging"]), 40, "the worker's ALTER TABLE to wait for the lock"
        )
        assert stack.release_row(release_id)["status"] == "promoting"

        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(timeout=15) == -signal.SIGKILL
    finally:
        holder.rollback()  # the lock goes; the orphaned server session finds its client gone
        holder.close()

    # The dead worker's server session rolls back and ends; its session lock dies with it.
    stack.wait_for(lambda: _other_backends(urls["staging"]) == 0, 30, "the orphaned session to end")
    settled = stack.drive("reconcile", release_id=release_id, timeout=30)
    assert settled["status"] == "failed", settled
    assert settled["error_code"] == "worker_lost"

    # No partial schema: accounts is exactly as before, no history row, rows intact.
    assert target_state(urls["staging"]) == before
    assert before[2] is False
    [(lock_owner, lock_release)] = stack.query(
        "SELECT lock_owner, lock_release_id FROM tenants_environment e JOIN tenants_tenant t "
        "ON t.id = e.tenant_id WHERE t.slug = 'kill' AND e.stage = 'staging'"
    )
    assert (lock_owner, lock_release) == ("", None)
    events = [event for event, _ in stack.audit(release_id)]
    assert events[-1] == "release.failed"
    holder = psycopg2.connect(urls["staging"])
    with holder.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert cursor.fetchone()[0] == 0
    holder.close()
