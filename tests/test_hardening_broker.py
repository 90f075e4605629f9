"""Broker failures are clean (issue 13.4): an unreachable broker at promote or rollback is a 503.

The web's Celery app is pointed at a broker that cannot be reached (nothing listens on port 1; a
server that accepts and never answers; one whose connect never completes), with eager mode off.
Promote and rollback then answer 503 `broker_unavailable` in the envelope within the broker
timeouts, the release stays `prepared` (or `promoted`), no lease is left on the environment, the
target is untouched and the `releases.services` logger says why. The next request, once the broker
is back, works. Commands and the admin render the same refusal without a traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
import uuid

import pytest
from celery import current_app
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from releases import engine, services, tasks
from releases.models import Release, ReleaseStatus
from tenants.models import Environment
from tenants.services import tenant_setup, token_issue

# transaction=True: with a broker the task is published when the request's transaction commits,
# which pytest-django's per-test transaction would never do.
pytestmark = pytest.mark.django_db(transaction=True)

UNREACHABLE = "redis://127.0.0.1:1/0"
# Two broker timeouts (BROKER_TIMEOUT_SECONDS, 2 s; socket reads 5 s) and the request itself.
ANSWER_WITHIN_SECONDS = 15
ADD_NOTES = {
    "database": {
        "changes": [{"type": "add_column", "table": "accounts", "column": {"name": "notes", "type": "text"}}]
    },
    "feature_flags": {"notes_ui": True},
}


@pytest.fixture
def world(sqlite_database_factory):
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    for url in urls.values():
        with engine.open_target(url) as target, target.connection.cursor() as cursor:
            cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email varchar(100))")
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"])
    admin = get_user_model().objects.get(username="acme-admin")
    release = services.release_prepare(
        tenant=tenant, user=admin, from_env="dev", to_env="staging", bundle_data=ADD_NOTES
    )
    assert release.status == ReleaseStatus.PREPARED, release.error_message
    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION=f"Bearer {token_issue(tenant=tenant, user=admin)[1]}", HTTP_X_TENANT_SLUG="acme"
    )
    return {"tenant": tenant, "admin": admin, "release": release, "staging": urls["staging"], "api": client}


def _reset_producers(app) -> None:
    """Let the next publish take its connection from kombu's pool for `broker_url` as it is now.

    The app keeps the pool of the URL it first used. kombu's pools stay registered per URL, so they
    are only dropped here, never closed: closing one would break the next test that uses its URL."""
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def broker(settings):
    """`broker(url)` points the web's Celery app at `url` with eager mode off; `broker(None)` goes
    back to in-process tasks. Everything is put back afterwards."""
    app = current_app
    saved = {key: app.conf[key] for key in ("broker_url", "task_always_eager", "broker_transport_options")}

    def point(url: str | None, *, key_prefix: str = "") -> None:
        settings.CELERY_TASK_ALWAYS_EAGER = url is None
        settings.CELERY_BROKER_URL = url or ""
        app.conf.update(
            broker_url=url,
            task_always_eager=url is None,
            broker_transport_options={**saved["broker_transport_options"], "global_keyprefix": key_prefix},
        )
        _reset_producers(app)

    yield point
    app.conf.update(saved)
    _reset_producers(app)


def columns(url: str) -> list[str]:
    with engine.open_target(url) as target:
        return sorted(engine.introspect(target)["tables"]["accounts"]["columns"])


def lease(release: Release) -> tuple[str, int | None]:
    environment = Environment.objects.get(pk=release.to_environment_id)
    return environment.lock_owner, environment.lock_release_id


def broker_log_lines(caplog, release: Release, phase: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "releases.services"
        and record.levelno == logging.WARNING
        and getattr(record, "release_id", None) == release.release_id
        and getattr(record, "phase", None) == phase
        and getattr(record, "error_code", None) == "broker_unavailable"
        and "broker could not be reached" in record.getMessage()
    ]


def assert_refused_503(response, started: float) -> None:
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == "broker_unavailable", body
    assert "broker" in body["error"]["message"] and "127.0.0.1" not in response.content.decode()
    assert elapsed < ANSWER_WITHIN_SECONDS, elapsed


# --- promote -------------------------------------------------------------------------------------


def test_promote__broker_unreachable__503_release_prepared_no_lease_logged_then_retry_works(
    world, broker, caplog
):
    release = world["release"]
    broker(UNREACHABLE)
    caplog.set_level(logging.WARNING, logger="releases.services")
    started = time.monotonic()
    response = world["api"].post(
        "/api/releases/promote",
        {"release_id": release.release_id},
        format="json",
        HTTP_IDEMPOTENCY_KEY="promote-once",
    )
    assert_refused_503(response, started)
    stored = Release.objects.get(pk=release.pk)
    assert stored.status == ReleaseStatus.PREPARED
    assert stored.error_code == "broker_unavailable"
    assert lease(release) == ("", None)
    assert columns(world["staging"]) == ["email", "id"]
    assert len(broker_log_lines(caplog, release, "promote")) == 1, [r.getMessage() for r in caplog.records]
    assert not stored.audit_events.filter(event__in=["release.promoted", "release.failed"]).exists()

    # The reconciler has nothing to settle: no release was left in flight for a worker that never came.
    assert services.reconcile_all() == []

    # The broker is back (in-process here): the same request, with the same Idempotency-Key (a 503
    # is never kept), promotes.
    broker(None)
    response = world["api"].post(
        "/api/releases/promote",
        {"release_id": release.release_id},
        format="json",
        HTTP_IDEMPOTENCY_KEY="promote-once",
    )
    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == ReleaseStatus.PROMOTED
    assert Release.objects.get(pk=release.pk).error_code == ""
    assert columns(world["staging"]) == ["email", "id", "notes"]
    assert lease(release) == ("", None)


def test_promote__broker_back_after_503__queued_to_redis_and_the_worker_half_promotes(
    world, broker, redis_url
):
    import redis

    release = world["release"]
    broker(UNREACHABLE)
    assert (
        world["api"]
        .post("/api/releases/promote", {"release_id": release.release_id}, format="json")
        .status_code
        == 503
    )

    prefix = f"rm-test-broker-{uuid.uuid4().hex[:8]}:"
    broker(redis_url, key_prefix=prefix)
    client = redis.Redis.from_url(redis_url)
    try:
        response = world["api"].post(
            "/api/releases/promote", {"release_id": release.release_id}, format="json"
        )
        assert response.status_code == 202, response.content
        assert response.json()["data"]["status"] == ReleaseStatus.PROMOTING
        owner, lock_release = lease(release)
        assert owner and lock_release == release.pk  # this request's lease, not a leftover
        assert client.llen(f"{prefix}default") == 1  # queued once, for a worker
        tasks.promote_task(release.pk, owner, world["admin"].pk)  # what the worker runs
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
        client.close()
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PROMOTED
    assert lease(release) == ("", None)


@contextlib.contextmanager
def stalled_broker(kind: str):
    """A local broker address that never answers: `silent` accepts and says nothing; `no_accept`
    has a full backlog, so the connect itself never completes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()
    if kind == "silent":
        server.listen(16)
        server.settimeout(0.2)

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    held.append(server.accept()[0])

        threading.Thread(target=accept, daemon=True).start()
    else:
        server.listen(0)
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            held.append(filler)
        time.sleep(0.2)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop.set()
        for sock in [*held, server]:
            sock.close()


@pytest.mark.parametrize("kind", ["silent", "no_accept"])
def test_promote__broker_that_never_answers__503_within_the_timeouts_not_a_hang(world, broker, kind):
    release = world["release"]
    with stalled_broker(kind) as url:
        broker(url)
        started = time.monotonic()
        response = world["api"].post(
            "/api/releases/promote", {"release_id": release.release_id}, format="json"
        )
        assert_refused_503(response, started)
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PREPARED
    assert lease(release) == ("", None)


# --- rollback ------------------------------------------------------------------------------------


def test_rollback__broker_unreachable__503_release_promoted_no_lease_logged_then_retry_works(
    world, broker, caplog
):
    release = world["release"]
    assert (
        world["api"]
        .post("/api/releases/promote", {"release_id": release.release_id}, format="json")
        .status_code
        == 200
    )
    broker(UNREACHABLE)
    caplog.set_level(logging.WARNING, logger="releases.services")
    started = time.monotonic()
    response = world["api"].post("/api/releases/rollback", {"release_id": release.release_id}, format="json")
    assert_refused_503(response, started)
    stored = Release.objects.get(pk=release.pk)
    assert stored.status == ReleaseStatus.PROMOTED
    assert stored.error_code == "broker_unavailable"
    assert lease(release) == ("", None)
    assert columns(world["staging"]) == ["email", "id", "notes"]
    assert len(broker_log_lines(caplog, release, "rollback")) == 1, [r.getMessage() for r in caplog.records]
    assert not stored.audit_events.filter(event="release.rollback").exists()

    broker(None)
    response = world["api"].post("/api/releases/rollback", {"release_id": release.release_id}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["data"]["rolled_back"] is True
    assert columns(world["staging"]) == ["email", "id"]
    assert lease(release) == ("", None)


# --- commands and admin --------------------------------------------------------------------------


def refused_command(*args) -> tuple[int, str]:
    err = io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command(*args, stdout=io.StringIO(), stderr=err)
    return exit_info.value.code, err.getvalue()


def test_commands__broker_unreachable__error_line_exit_1_no_traceback(world, broker):
    release = world["release"]
    broker(UNREACHABLE)
    code, err = refused_command("release_promote", "--tenant", "acme", "--release", release.release_id)
    assert code == 1
    assert err.startswith("error: broker_unavailable: "), err
    assert "Traceback" not in err
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PREPARED
    assert lease(release) == ("", None)

    broker(None)
    call_command("release_promote", "--tenant", "acme", "--release", release.release_id, stdout=io.StringIO())
    broker(UNREACHABLE)
    code, err = refused_command("release_rollback", "--tenant", "acme", "--release", release.release_id)
    assert code == 1
    assert err.startswith("error: broker_unavailable: "), err
    assert "Traceback" not in err
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PROMOTED
    assert lease(release) == ("", None)


def test_admin__broker_unreachable__error_message_release_unchanged(world, broker):
    release = world["release"]
    admin = world["admin"]
    admin.is_staff = True
    admin.save(update_fields=["is_staff"])
    client = Client(raise_request_exception=False)
    client.force_login(admin)
    broker(UNREACHABLE)
    response = client.post(reverse("admin:releases_release_promote", args=[release.pk]))
    assert response.status_code == 302, response.status_code
    messages = [str(message) for message in get_messages(response.wsgi_request)]
    assert any("broker" in message and release.release_id in message for message in messages), messages
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PREPARED
    assert lease(release) == ("", None)
