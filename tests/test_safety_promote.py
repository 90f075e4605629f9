"""Promote safety at the service/API level: drift, the SQL approved is the SQL run, verified backups,
locks held by other sessions, concurrent promotes, and data preserved by drops.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from django.db import connection as control_connection

from releasemgr.api import status_for
from releasemgr.core.errors import ApplicationError
from releases import services
from releases.models import AuditEvent, Backup, Migration, Preservation, Release

from .test_safety_support import (
    add_column,
    changes,
    create_table,
    fingerprint_of,
    make_world,
    query,
    run_sql,
    table_names,
    target_state,
)

ACCOUNTS = "CREATE TABLE accounts (id bigint PRIMARY KEY, email varchar(100), note text)"
ACCOUNT_ROWS = [(i, f"user{i}@example.com", f"note {i} 'quoted'") for i in range(1, 201)]


def seed_accounts(url: str) -> None:
    values = ", ".join(
        f"({i}, '{email}', '{note.replace(chr(39), chr(39) * 2)}')" for i, email, note in ACCOUNT_ROWS
    )
    run_sql(url, ACCOUNTS, f"INSERT INTO accounts (id, email, note) VALUES {values}")


def history_rows(url: str) -> list[tuple]:
    if "_rm_history" not in table_names(url):
        return []
    return query(url, 'SELECT release_id, direction FROM "_rm_history" ORDER BY id')


@pytest.fixture
def world(database_factory):
    world = make_world(database_factory)
    seed_accounts(world.urls["staging"])
    return world


@pytest.fixture(autouse=True)
def backup_dir(settings, tmp_path):
    settings.BACKUP_DIR = tmp_path / "backups"
    return settings.BACKUP_DIR


# --- drift and the approved SQL -----------------------------------------------------------------


@pytest.mark.django_db
def test_promote__target_changed_by_hand_after_prepare__failed_schema_drift_target_untouched(world):
    release_id = world.prepared(changes(add_column("accounts", "plan", "string", max_length=20)))
    run_sql(world.urls["staging"], "ALTER TABLE accounts ADD COLUMN added_by_hand text")
    drifted = target_state(world.urls["staging"])

    response = world.promote(release_id)
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["status"] == "failed" and data["error_code"] == "schema_drift", data
    assert data["failed_at"] and "changed since" in data["error_message"]
    assert target_state(world.urls["staging"]) == drifted
    assert "forward" not in {direction for _, direction in history_rows(world.urls["staging"])}
    event = AuditEvent.objects.get(event="release.failed", release__release_id=release_id)
    assert event.payload["code"] == "schema_drift" and event.payload["phase"] == "promote"
    assert not AuditEvent.objects.filter(event="release.promoted").exists()


@pytest.mark.django_db
def test_promote__index_added_by_hand_after_prepare__drift_caught_by_the_native_fingerprint(world):
    release_id = world.prepared(changes(add_column("accounts", "plan", "string", max_length=20)))
    portable_before = fingerprint_of(world.urls["staging"])
    run_sql(world.urls["staging"], "CREATE INDEX accounts_email_by_hand ON accounts (email)")
    assert fingerprint_of(world.urls["staging"]) == portable_before, "an index is not in the portable view"
    drifted = target_state(world.urls["staging"])

    data = world.promote(release_id).json()["data"]
    assert data["status"] == "failed" and data["error_code"] == "schema_drift"
    assert target_state(world.urls["staging"]) == drifted


@pytest.mark.django_db
def test_promote__recorded_statements_altered_after_prepare__refused_schema_drift_nothing_run(world):
    release_id = world.prepared(changes(add_column("accounts", "plan", "string", max_length=20)))
    migration = Migration.objects.get(release__release_id=release_id)
    sneaky = {"sql": "DELETE FROM accounts", "params": None}
    Migration.objects.filter(pk=migration.pk).update(statements=[*migration.statements, sneaky])
    before = target_state(world.urls["staging"])

    data = world.promote(release_id).json()["data"]
    assert data["status"] == "failed" and data["error_code"] == "schema_drift", data
    assert target_state(world.urls["staging"]) == before
    assert len(query(world.urls["staging"], "SELECT id FROM accounts")) == len(ACCOUNT_ROWS)


# --- backups ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_promote__existing_table_changed__verified_backup_recorded_and_restores_the_original(
    world, backup_dir, pg_database_factory
):
    original_rows = query(world.urls["staging"], "SELECT id, email, note FROM accounts ORDER BY id")
    release_id = world.promoted(changes(add_column("accounts", "plan", "string", max_length=20)))

    backup = Backup.objects.get(release__release_id=release_id)
    path = Path(backup.path)
    assert backup.verified is True and backup.tables == ["accounts"]
    assert path.is_file() and path.resolve().is_relative_to(backup_dir.resolve())
    assert backup.size_bytes == path.stat().st_size > 0
    assert backup.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert oct(path.stat().st_mode & 0o777) == "0o600" or world.dialect == "sqlite"
    manifest = world.client.get(f"/api/releases/{release_id}").json()["data"]
    [listed] = manifest["backups"]
    assert listed["file"] == path.name and listed["sha256"] == backup.sha256 and listed["verified"] is True
    assert str(backup_dir) not in str(manifest), "the manifest names the file, not the server's directory"

    if world.dialect == "postgresql":
        assert backup.format == "pg_dump-custom"
        listing = subprocess.run(
            ["pg_restore", "--list", str(path)], capture_output=True, text=True, check=True
        )
        assert "TABLE public accounts" in listing.stdout and "TABLE DATA public accounts" in listing.stdout
        scratch = pg_database_factory()
        name = scratch.rsplit("/", 1)[-1]
        subprocess.run(
            ["pg_restore", "--no-owner", "-h", "127.0.0.1", "-U", "postgres", "-d", name, str(path)],
            capture_output=True,
            check=True,
        )
    else:
        scratch = f"sqlite:///{path}"
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert query(scratch, "SELECT id, email, note FROM accounts ORDER BY id") == original_rows
    restored = target_state(scratch)[0]["tables"]["accounts"]
    assert "plan" not in restored["columns"], "the backup is the state before the release"


@pytest.mark.django_db
def test_promote__only_create_table__backup_records_nothing_to_back_up(world, backup_dir):
    release_id = world.promoted(changes(create_table("brand_new")))
    backup = Backup.objects.get(release__release_id=release_id)
    assert backup.note == "nothing to back up" and backup.path == "" and backup.verified is True
    assert not backup_dir.exists() or not any(p.is_file() for p in backup_dir.rglob("*"))


# --- locks held by other sessions ---------------------------------------------------------------


FAST_LOCK_TIMEOUT_MS, FAST_LOCK_RETRIES = 300, 2
# Every attempt waits at most the lock timeout; 2.5 s more for connecting, fingerprints, pg_dump and
# the pauses between attempts (about 0.9 s here).
LOCK_BUDGET_SECONDS = FAST_LOCK_TIMEOUT_MS / 1000 * (FAST_LOCK_RETRIES + 1) + 2.5
# pg_dump's own default lock wait; a backup that met a held lock must give up sooner (the environment's
# 300 ms), so the whole promote stays under it (about 0.9 s here).
ENGINE_DEFAULT_LOCK_WAIT_SECONDS = 2.0


def locked_world(url_factory):
    world = make_world(url_factory)
    seed_accounts(world.urls["staging"])
    Environment = type(world.environment("staging"))
    Environment.objects.filter(pk=world.environment("staging").pk).update(
        apply_lock_timeout_ms=FAST_LOCK_TIMEOUT_MS, apply_lock_retries=FAST_LOCK_RETRIES
    )
    release_id = world.prepared(changes(add_column("accounts", "plan", "string", max_length=20)))
    return world, release_id


def promote_while_postgresql_lock_held(world, release_id: str, lock_sql: str):
    import psycopg2

    holder = psycopg2.connect(world.urls["staging"])
    try:
        with holder.cursor() as cursor:
            cursor.execute(lock_sql)
        started = time.monotonic()
        response = world.promote(release_id)
        return response.json()["data"], time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()


@pytest.mark.django_db
def test_promote__postgresql_writer_holds_its_row_locks__lock_timeout_after_retries_target_unchanged(
    pg_database_factory,
):
    """A long transaction writing to the table (ROW EXCLUSIVE) does not stop pg_dump's ACCESS SHARE,
    but blocks the ALTER TABLE: the apply waits lock_timeout per attempt, retries, and gives up."""
    world, release_id = locked_world(pg_database_factory)
    before = target_state(world.urls["staging"])
    data, elapsed = promote_while_postgresql_lock_held(
        world, release_id, "UPDATE accounts SET note = note WHERE id = 1"
    )
    assert data["status"] == "failed" and data["error_code"] == "lock_timeout", data
    assert f"{FAST_LOCK_RETRIES + 1} attempts" in data["error_message"]
    assert FAST_LOCK_TIMEOUT_MS / 1000 * (FAST_LOCK_RETRIES + 1) <= elapsed < LOCK_BUDGET_SECONDS, elapsed
    assert target_state(world.urls["staging"]) == before
    assert "forward" not in {direction for _, direction in history_rows(world.urls["staging"])}
    assert Backup.objects.filter(release__release_id=release_id, verified=True).count() == 1


@pytest.mark.django_db
def test_promote__postgresql_table_access_exclusive_in_another_session__fails_fast_target_unchanged(
    pg_database_factory,
):
    world, release_id = locked_world(pg_database_factory)
    before = target_state(world.urls["staging"])
    data, elapsed = promote_while_postgresql_lock_held(
        world, release_id, "LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE"
    )
    assert data["status"] == "failed", data
    # pg_dump meets the lock first (the backup is taken before the apply's locks).
    assert data["error_code"] in ("lock_timeout", "backup_failed") and "lock" in data["error_message"], data
    assert elapsed < ENGINE_DEFAULT_LOCK_WAIT_SECONDS, elapsed
    assert target_state(world.urls["staging"]) == before
    assert "forward" not in {direction for _, direction in history_rows(world.urls["staging"])}
    assert Release.objects.get(release_id=release_id).status == "failed"


@pytest.mark.django_db
def test_promote__postgresql_table_access_exclusive_in_another_session__error_code_lock_timeout(
    pg_database_factory,
):
    world, release_id = locked_world(pg_database_factory)
    data, _ = promote_while_postgresql_lock_held(
        world, release_id, "LOCK TABLE accounts IN ACCESS EXCLUSIVE MODE"
    )
    assert data["error_code"] == "lock_timeout", data


def promote_while_sqlite_locked(world, release_id: str):
    holder = sqlite3.connect(world.urls["staging"].removeprefix("sqlite:///"), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        response = world.promote(release_id)
        return response.json()["data"], time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()


@pytest.mark.django_db
def test_promote__sqlite_target_exclusively_locked_by_another_session__failed_target_unchanged(
    sqlite_database_factory,
):
    world, release_id = locked_world(sqlite_database_factory)
    before = target_state(world.urls["staging"])
    data, _ = promote_while_sqlite_locked(world, release_id)
    assert data["status"] == "failed" and data["error_code"], data
    assert target_state(world.urls["staging"]) == before
    assert "_rm_history" not in table_names(world.urls["staging"])


@pytest.mark.django_db
def test_promote__sqlite_target_exclusively_locked__lock_timeout_within_the_budget(sqlite_database_factory):
    world, release_id = locked_world(sqlite_database_factory)
    data, elapsed = promote_while_sqlite_locked(world, release_id)
    assert data["error_code"] == "lock_timeout", data
    assert elapsed < LOCK_BUDGET_SECONDS, elapsed


# --- ten concurrent promotes --------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_promote__ten_concurrent_requests_for_one_release__applied_exactly_once(database_factory):
    if control_connection.vendor == "sqlite" and control_connection.is_in_memory_db():
        pytest.skip(
            "pytest-django's in-memory SQLite control database (shared cache) takes table locks that ignore "
            "busy_timeout, unlike the WAL file releasemgr runs on; `make test-pg-control` runs this test"
        )
    world = make_world(database_factory)
    seed_accounts(world.urls["staging"])
    release = Release.objects.get(
        release_id=world.prepared(changes(add_column("accounts", "plan", "string", max_length=20)))
    )
    barrier = threading.Barrier(10)
    outcomes: list[tuple[str, str]] = []
    lock = threading.Lock()

    def promote() -> None:
        try:
            mine = Release.objects.select_related("tenant", "to_environment__tenant", "from_environment").get(
                pk=release.pk
            )
            barrier.wait(timeout=30)
            try:
                result = services.release_promote(release=mine, user=world.admin)
                outcome = ("ok", result.status)
            except ApplicationError as exc:
                outcome = ("refused", f"{status_for(exc.code)}:{exc.code}")
            except Exception as exc:  # anything else is a bug the assertion below shows
                outcome = ("error", f"{type(exc).__name__}: {exc}")
            with lock:
                outcomes.append(outcome)
        finally:
            control_connection.close()

    threads = [threading.Thread(target=promote) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(outcomes) == 10, outcomes
    assert [o for o in outcomes if o[0] == "error"] == [], outcomes
    assert outcomes.count(("ok", "promoted")) == 1, outcomes
    refusals = {detail for kind, detail in outcomes if kind == "refused"}
    assert refusals <= {"409:environment_busy", "409:conflict"}, outcomes
    assert sum(1 for kind, _ in outcomes if kind == "refused") == 9
    assert history_rows(world.urls["staging"]) == [(release.release_id, "forward")]
    assert AuditEvent.objects.filter(event="release.promoted", release=release).count() == 1
    assert not AuditEvent.objects.filter(event="release.failed", release=release).exists()
    assert Release.objects.get(pk=release.pk).status == "promoted"
    columns = target_state(world.urls["staging"])[0]["tables"]["accounts"]["columns"]
    assert "plan" in columns


# --- preservation -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_drop_table__promoted_then_rolled_back__table_and_rows_restored(world):
    before_schema, _ = target_state(world.urls["staging"])
    before_fingerprint = fingerprint_of(world.urls["staging"])
    release_id = world.promoted(changes({"type": "drop_table", "table": "accounts"}))

    assert "accounts" not in table_names(world.urls["staging"])
    [preservation] = Preservation.objects.filter(release__release_id=release_id, direction="forward")
    assert preservation.source_table == "accounts" and preservation.row_count == len(ACCOUNT_ROWS)
    assert preservation.preserved_table.startswith("_rm_") and preservation.preserved_table in table_names(
        world.urls["staging"]
    )
    assert "accounts" not in target_state(world.urls["staging"])[0]["tables"]

    rolled = world.rollback(release_id)
    assert rolled.json()["data"]["status"] == "rolled_back", rolled.content
    assert query(world.urls["staging"], "SELECT id, email, note FROM accounts ORDER BY id") == ACCOUNT_ROWS
    assert fingerprint_of(world.urls["staging"]) == before_fingerprint
    assert target_state(world.urls["staging"])[0] == before_schema


@pytest.mark.django_db
def test_promote__backup_dir_not_writable__failed_backup_failed_target_unchanged(world, settings, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the backup directory should be")
    settings.BACKUP_DIR = blocker
    release_id = world.prepared(changes(add_column("accounts", "plan", "string", max_length=20)))
    before = target_state(world.urls["staging"])
    response = world.promote(release_id)
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["status"] == "failed" and data["error_code"] == "backup_failed", data
    assert "BACKUP_DIR" in data["error_message"] and str(tmp_path) not in data["error_message"]
    assert target_state(world.urls["staging"]) == before
    assert os.path.isfile(blocker)


# --- the target's release lock held elsewhere ------------------------------------------------------


@pytest.mark.django_db
def test_promote__target_release_lock_held_by_another_session__409_environment_busy_release_stays_prepared(
    world,
):
    """E.g. a retention purge or a promote driven from another control database holds the target's lock."""
    from releases import engine
    from releases.services import target_lock_key

    release_id = world.prepared(changes(add_column("accounts", "plan", "string", max_length=20)))
    before = target_state(world.urls["staging"])
    with engine.open_target(world.urls["staging"]) as target:
        with engine.target_lock(target, target_lock_key(world.environment("staging"))) as locked:
            assert locked
            response = world.promote(release_id)
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "environment_busy"
    assert target_state(world.urls["staging"]) == before
    assert Release.objects.get(release_id=release_id).status == "prepared"
    assert not AuditEvent.objects.filter(event="release.failed", release__release_id=release_id).exists()
    # Once the lock is free, the same release promotes.
    assert world.promote(release_id).json()["data"]["status"] == "promoted"
