"""What committed stays recorded as committed (issue 13.3): the control-database connection is lost
while a promote or rollback runs on the target, and the target's `_rm_history` decides.

PostgreSQL holds the control database (`make test-pg-control`); with SQLite there is no connection
to lose, so these tests skip. The target's ALTER TABLEs are slowed by an event trigger (pg_sleep),
and a thread kills the control connection (`pg_terminate_backend`) while the apply sleeps, or the
server closes it (`idle_session_timeout`).
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from releases import services
from releases.models import AuditEvent, Release, ReleaseStatus
from releases.selectors import live_release
from tenants.models import Environment, FeatureFlag

from .conftest import pg_admin_connection
from .test_safety_support import add_column, changes, make_world, query, run_sql

pytestmark = [
    pytest.mark.django_db(transaction=True),  # the connection is closed and reopened: no test transaction
    pytest.mark.skipif(
        connection.vendor != "postgresql",
        reason="needs PostgreSQL as the control database (DATABASE_URL=postgres://...; make test-pg-control)",
    ),
]

SLEEP_SECONDS = 2.5  # each ALTER TABLE on the target takes this long while the trigger is there
FLAGS = {"beta": True, "tier": "pro"}


@pytest.fixture
def world(pg_database_factory, settings, tmp_path):
    settings.BACKUP_DIR = tmp_path / "backups"
    world = make_world(pg_database_factory, slug="ctl")
    for url in world.urls.values():
        run_sql(url, "CREATE TABLE accounts (id bigint PRIMARY KEY, email varchar(100))")
        run_sql(url, "INSERT INTO accounts (id, email) VALUES (1, 'a@example.com'), (2, 'b@example.com')")
    FeatureFlag.objects.create(environment=world.environment("staging"), name="beta", value=False)
    return world


def slow_alters(url: str, seconds: float = SLEEP_SECONDS) -> None:
    """Every ALTER TABLE on the target sleeps (an event trigger: not part of any fingerprint)."""
    run_sql(
        url,
        "CREATE FUNCTION rm_test_slow_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"IF tg_tag = 'ALTER TABLE' THEN PERFORM pg_sleep({seconds}); END IF; END $$",
        "CREATE EVENT TRIGGER rm_test_slow_ddl ON ddl_command_end EXECUTE FUNCTION rm_test_slow_ddl()",
    )


def fast_alters(url: str) -> None:
    run_sql(
        url, "DROP EVENT TRIGGER IF EXISTS rm_test_slow_ddl", "DROP FUNCTION IF EXISTS rm_test_slow_ddl()"
    )


def database_of(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


class ControlKiller(threading.Thread):
    """Waits until the target sleeps inside the apply (and `sessions` control sessions are open), then
    terminates every control-database session; with `watch`, then samples the environment's lease
    expiry for that many seconds over a connection of its own."""

    def __init__(self, target_url: str, *, sessions: int = 1, watch: float = 0, environment_pk=None) -> None:
        super().__init__(daemon=True)
        self.target_db = database_of(target_url)
        self.control = dict(connection.settings_dict)
        self.sessions = sessions
        self.watch = watch
        self.environment_pk = environment_pk
        self.terminated: list[int] = []
        self.killed_at = None
        self.expiries: list = []

    def run(self) -> None:
        admin = pg_admin_connection()
        try:
            deadline = time.monotonic() + 60
            with admin.cursor() as cursor:
                while time.monotonic() < deadline:
                    cursor.execute(
                        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event = 'PgSleep'),"
                        " (SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid())",
                        [self.target_db, self.control["NAME"]],
                    )
                    sleeping, control_sessions = cursor.fetchone()
                    if sleeping and control_sessions >= self.sessions:
                        break
                    time.sleep(0.02)
                else:
                    return
                cursor.execute(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    [self.control["NAME"]],
                )
                self.terminated = [pid for pid, ok in cursor.fetchall() if ok]
                self.killed_at = timezone.now()
        finally:
            admin.close()
        if self.watch:
            self._sample_lease()

    def _sample_lease(self) -> None:
        import psycopg2

        control = psycopg2.connect(
            host=self.control["HOST"],
            port=self.control["PORT"] or 5432,
            user=self.control["USER"],
            dbname=self.control["NAME"],
        )
        control.autocommit = True
        try:
            with control.cursor() as cursor:
                until = time.monotonic() + self.watch
                while time.monotonic() < until:
                    cursor.execute(
                        f'SELECT lock_expires_at FROM "{Environment._meta.db_table}" WHERE id = %s',
                        [self.environment_pk],
                    )
                    self.expiries.append(cursor.fetchone()[0])
                    time.sleep(0.1)
        finally:
            control.close()


def control_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def flags(world) -> dict:
    return {flag.name: flag.value for flag in world.environment("staging").flags.all()}


def history(url: str) -> list[tuple[str, str]]:
    return query(url, 'SELECT release_id, direction FROM "_rm_history" ORDER BY id')


def columns(url: str) -> set[str]:
    rows = query(url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'accounts'")
    return {row[0] for row in rows}


def assert_promoted(world, release_id: str) -> Release:
    release = Release.objects.get(release_id=release_id)
    assert release.status == ReleaseStatus.PROMOTED, (
        release.status,
        release.error_code,
        release.error_message,
    )
    assert release.error_code == "" and release.promoted_at is not None
    assert flags(world) == {"beta": True, "tier": "pro"}
    assert release.flag_changes["beta"] == {"before": False, "existed": True, "after": True}
    assert AuditEvent.objects.filter(release=release, event="release.promoted").count() == 1
    assert not AuditEvent.objects.filter(release=release, event="release.failed").exists()
    assert [row for row in history(world.urls["staging"]) if row[0] == release_id] == [
        (release_id, "forward")
    ]
    return release


def assert_rolled_back(world, release_id: str) -> Release:
    release = Release.objects.get(release_id=release_id)
    assert release.status == ReleaseStatus.ROLLED_BACK, (
        release.status,
        release.error_code,
        release.error_message,
    )
    assert flags(world) == {"beta": False}
    assert "notes" not in columns(world.urls["staging"])
    assert [row[1] for row in history(world.urls["staging"]) if row[0] == release_id] == [
        "forward",
        "rollback",
    ]
    return release


def prepared(world) -> str:
    return world.prepared(changes(add_column("accounts", "notes", "text"), flags=FLAGS))


# --- (a) the control connection terminated mid-apply ------------------------------------------------


def test_promote__control_connection_terminated_mid_apply__promoted_with_flags_and_rollback_works(world):
    release_id = prepared(world)
    slow_alters(world.urls["staging"])
    before = control_pid()
    killer = ControlKiller(world.urls["staging"])
    killer.start()

    started = time.monotonic()
    response = world.promote(release_id)
    killer.join(timeout=30)

    assert before in killer.terminated, "the control connection was terminated while the target applied"
    assert time.monotonic() - started >= SLEEP_SECONDS
    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == "promoted", response.json()["data"]
    assert "notes" in columns(world.urls["staging"])
    assert_promoted(world, release_id)
    assert control_pid() != before, "the settle ran on a new control connection"

    fast_alters(world.urls["staging"])
    response = world.rollback(release_id)
    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == "rolled_back", response.json()["data"]
    assert_rolled_back(world, release_id)


def test_rollback__control_connection_terminated_mid_rollback__rolled_back_flags_restored(world):
    release_id = prepared(world)
    assert world.promote(release_id).json()["data"]["status"] == "promoted"
    slow_alters(world.urls["staging"])
    before = control_pid()
    killer = ControlKiller(world.urls["staging"])
    killer.start()

    response = world.rollback(release_id)
    killer.join(timeout=30)

    assert before in killer.terminated
    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == "rolled_back", response.json()["data"]
    release = assert_rolled_back(world, release_id)
    assert release.error_code == ""
    event = AuditEvent.objects.get(release=release, event="release.rollback")
    assert event.payload["flags"] == {"restored": ["beta", "tier"], "not_restored": []}


def test_promote__heartbeat_connection_terminated__next_beat_reconnects_and_keeps_the_lease(world, settings):
    settings.RELEASE_LEASE_SECONDS = 3  # a beat every second; the lease would run out mid-apply unbeaten
    release_id = prepared(world)
    slow_alters(world.urls["staging"], seconds=5)
    environment = world.environment("staging")
    killer = ControlKiller(world.urls["staging"], sessions=2, watch=3.5, environment_pk=environment.pk)
    killer.start()

    response = world.promote(release_id)
    killer.join(timeout=30)

    assert len(killer.terminated) >= 2, "the request's and the heartbeat's control sessions"
    assert response.json()["data"]["status"] == "promoted", response.json()["data"]
    later = [expiry for expiry in killer.expiries if expiry is not None]
    assert later and max(later) > killer.killed_at + timedelta(seconds=2), (
        "a beat after the kill extended the lease",
        killer.killed_at,
        later[-3:],
    )
    assert_promoted(world, release_id)
    assert Environment.objects.get(pk=environment.pk).lock_owner == ""


# --- (b) the server closes the idle control connection (idle_session_timeout) -----------------------


def test_promote__idle_session_timeout_shorter_than_the_apply__promoted_with_flags_and_rollback_works(world):
    release_id = prepared(world)
    slow_alters(world.urls["staging"])
    before = control_pid()
    with connection.cursor() as cursor:
        cursor.execute("SET idle_session_timeout = '1000ms'")

    response = world.promote(release_id)

    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == "promoted", response.json()["data"]
    assert_promoted(world, release_id)
    assert control_pid() != before, "the server closed the idle control connection during the apply"

    fast_alters(world.urls["staging"])
    assert world.rollback(release_id).json()["data"]["status"] == "rolled_back"
    assert_rolled_back(world, release_id)


def test_rollback__idle_session_timeout_shorter_than_the_rollback__rolled_back(world):
    release_id = prepared(world)
    assert world.promote(release_id).json()["data"]["status"] == "promoted"
    slow_alters(world.urls["staging"])
    before = control_pid()
    with connection.cursor() as cursor:
        cursor.execute("SET idle_session_timeout = '1000ms'")

    response = world.rollback(release_id)

    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == "rolled_back", response.json()["data"]
    assert_rolled_back(world, release_id)
    assert control_pid() != before


# --- (c) release_reconcile corrects what the control database recorded wrongly -----------------------


def force(release_id: str, **fields) -> Release:
    Release.objects.filter(release_id=release_id).update(status_changed_at=timezone.now(), **fields)
    return Release.objects.get(release_id=release_id)


def test_reconcile__failed_release_whose_apply_is_in_the_history__promoted_flags_set_audited(world):
    release_id = prepared(world)
    assert world.promote(release_id).json()["data"]["status"] == "promoted"
    committed_at = Release.objects.get(release_id=release_id).promoted_at
    # What the control database recorded before the fix: failed, flags never set.
    FeatureFlag.objects.filter(environment=world.environment("staging"), name="tier").delete()
    FeatureFlag.objects.filter(environment=world.environment("staging"), name="beta").update(value=False)
    force(
        release_id,
        status=ReleaseStatus.FAILED,
        failed_at=timezone.now(),
        promoted_at=None,
        flag_changes={},
        error_code="internal_error",
        error_message="OperationalError: terminating connection due to administrator command",
    )

    call_command("release_reconcile")

    release = Release.objects.get(release_id=release_id)
    assert release.status == ReleaseStatus.PROMOTED, (release.status, release.error_code)
    assert release.error_code == "" and release.failed_at is None
    assert abs(release.promoted_at - committed_at) < timedelta(seconds=5), "when the target committed it"
    assert flags(world) == {"beta": True, "tier": "pro"}
    event = AuditEvent.objects.get(release=release, event="release.reconciled")
    assert event.payload["before"] == "failed" and event.payload["after"] == "promoted"
    assert event.payload["error_code_before"] == "internal_error"
    assert event.payload["history"]["direction"] == "forward"
    assert event.actor is None
    assert AuditEvent.objects.filter(release=release, event="release.promoted").count() == 2
    # Settled once: a second run changes nothing.
    call_command("release_reconcile")
    assert AuditEvent.objects.filter(release=release, event="release.reconciled").count() == 1

    assert world.rollback(release_id).json()["data"]["status"] == "rolled_back"
    assert_rolled_back(world, release_id)


def test_reconcile__promoted_release_whose_last_transaction_is_its_rollback__rolled_back_audited(world):
    release_id = prepared(world)
    assert world.promote(release_id).json()["data"]["status"] == "promoted"
    flag_changes = Release.objects.get(release_id=release_id).flag_changes
    assert world.rollback(release_id).json()["data"]["status"] == "rolled_back"
    # What the control database recorded before the fix: the rollback "refused", flags still set.
    FeatureFlag.objects.create(environment=world.environment("staging"), name="tier", value="pro")
    FeatureFlag.objects.filter(environment=world.environment("staging"), name="beta").update(value=True)
    force(
        release_id,
        status=ReleaseStatus.PROMOTED,
        rolled_back_at=None,
        flag_changes=flag_changes,
        error_code="internal_error",
        error_message="InterfaceError: connection already closed",
    )

    services.reconcile_all()  # what the beat schedule runs

    release = Release.objects.get(release_id=release_id)
    assert release.status == ReleaseStatus.ROLLED_BACK, (release.status, release.error_code)
    assert release.error_code == ""
    assert flags(world) == {"beta": False}
    event = AuditEvent.objects.get(release=release, event="release.reconciled")
    assert event.payload["before"] == "promoted" and event.payload["after"] == "rolled_back"
    assert event.payload["history"]["direction"] == "rollback"


def test_reconcile__failed_release_with_a_later_release_on_top__promoted_in_commit_order(world):
    first = prepared(world)
    assert world.promote(first).json()["data"]["status"] == "promoted"
    second = world.promoted(changes(add_column("accounts", "score", "integer")))
    force(
        first,
        status=ReleaseStatus.FAILED,
        failed_at=timezone.now(),
        promoted_at=None,
        native_fingerprint_after="",
        error_code="internal_error",
    )

    call_command("release_reconcile")

    first_release, second_release = (Release.objects.get(release_id=r) for r in (first, second))
    assert first_release.status == ReleaseStatus.PROMOTED
    assert first_release.promoted_at < second_release.promoted_at, "ordered as the target committed them"
    assert first_release.native_fingerprint_after == "", "the catalog is the second release's after-state"
    assert live_release(environment=world.environment("staging")).release_id == second
    assert world.rollback(second).json()["data"]["status"] == "rolled_back"
    assert world.rollback(first).json()["data"]["status"] == "rolled_back"
    assert columns(world.urls["staging"]) == {"id", "email"}


def test_rollback__of_a_release_recorded_failed_whose_apply_committed__corrected_then_rolled_back(world):
    release_id = prepared(world)
    assert world.promote(release_id).json()["data"]["status"] == "promoted"
    FeatureFlag.objects.filter(environment=world.environment("staging"), name="tier").delete()
    FeatureFlag.objects.filter(environment=world.environment("staging"), name="beta").update(value=False)
    force(
        release_id,
        status=ReleaseStatus.FAILED,
        failed_at=timezone.now(),
        flag_changes={},
        error_code="internal_error",
    )

    response = world.rollback(release_id)

    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["details"]["status"] == "promoted" and "was promoted" in error["message"], error
    assert Release.objects.get(release_id=release_id).status == ReleaseStatus.PROMOTED
    assert AuditEvent.objects.filter(release__release_id=release_id, event="release.reconciled").count() == 1
    response = world.rollback(release_id)
    assert response.json()["data"]["status"] == "rolled_back", response.content
    assert_rolled_back(world, release_id)


def test_reconcile__failed_release_the_target_never_applied__left_failed(world):
    release_id = prepared(world)
    force(release_id, status=ReleaseStatus.FAILED, failed_at=timezone.now(), error_code="internal_error")

    call_command("release_reconcile")

    release = Release.objects.get(release_id=release_id)
    assert release.status == ReleaseStatus.FAILED and release.error_code == "internal_error"
    assert not AuditEvent.objects.filter(release=release, event="release.reconciled").exists()
    assert flags(world) == {"beta": False}
