"""Dry-run evidence in the manifest, and a dry-run that never waits behind another session's lock."""

from __future__ import annotations

import time

import pytest

from releases.models import AuditEvent

from .test_safety_support import (
    add_column,
    changes,
    create_table,
    fingerprint_of,
    make_world,
    run_sql,
    target_state,
)

pytestmark = pytest.mark.django_db

ACCOUNTS = "CREATE TABLE accounts (id bigint PRIMARY KEY, email varchar(100), note text)"


@pytest.fixture
def world(database_factory):
    world = make_world(database_factory)
    run_sql(world.urls["staging"], ACCOUNTS, "INSERT INTO accounts (id, email) VALUES (1, 'a@x'), (2, 'b@x')")
    return world


def test_prepare__three_changes__dry_run_evidence_per_migration_and_release(world):
    before = fingerprint_of(world.urls["staging"])
    bundle = changes(
        create_table("labels"),
        add_column("accounts", "plan", "string", max_length=20),
        {"type": "drop_column", "table": "accounts", "column": "note"},
    )
    data = world.prepare(bundle).json()["data"]
    assert data["status"] == "prepared", data["error_message"]
    for migration in data["migrations"]:
        result = migration["dry_run_result"]
        assert set(result) >= {"ok", "duration_ms", "statements", "error"}
        assert result["ok"] is True and result["error"] is None
        assert result["statements"] >= 1 and result["duration_ms"] >= 0
        assert migration["sql"] and migration["rollback_sql"]
    dry_run = data["dry_run"]
    assert dry_run["forward_ok"] is True and dry_run["rollback_verified"] is True
    assert dry_run["fingerprint_before"] == before != dry_run["fingerprint_after"]
    assert fingerprint_of(world.urls["staging"]) == before, "the dry-run is always rolled back"

    promoted = world.promote(data["release_id"]).json()["data"]
    assert promoted["status"] == "promoted"
    assert fingerprint_of(world.urls["staging"]) == dry_run["fingerprint_after"]


def test_prepare__change_fails_on_real_data__failed_with_the_changes_error_and_no_rollback_claim(world):
    before = target_state(world.urls["staging"])
    bundle = changes(
        add_column("accounts", "plan", "string", max_length=20),
        {"type": "modify_column", "table": "accounts", "column": {"name": "email", "nullable": False}},
        create_table("never_reached"),
    )
    run_sql(world.urls["staging"], "UPDATE accounts SET email = NULL WHERE id = 2")
    before = target_state(world.urls["staging"])
    data = world.prepare(bundle, allow_unsafe=["adding-not-nullable-field"], reason="test").json()["data"]
    assert data["status"] == "failed" and data["error_code"] == "dry_run_failed"
    results = [m["dry_run_result"] for m in data["migrations"]]
    assert results[0]["ok"] is True
    assert results[1]["ok"] is False and results[1]["error"]
    assert results[2]["ok"] is False and results[2]["error"] == "not run"
    assert data["dry_run"]["forward_ok"] is False and data["dry_run"]["rollback_verified"] is False
    assert "change 1" in data["error_message"]
    assert target_state(world.urls["staging"]) == before
    event = AuditEvent.objects.get(event="release.failed", release__release_id=data["release_id"])
    assert event.payload["phase"] == "prepare"


def test_prepare__postgresql_table_locked_by_another_session__dry_run_gives_up_fast(pg_database_factory):
    world = make_world(pg_database_factory)
    run_sql(world.urls["staging"], ACCOUNTS)
    Environment = type(world.environment("staging"))
    Environment.objects.filter(pk=world.environment("staging").pk).update(dry_run_lock_timeout_ms=200)
    before = target_state(world.urls["staging"])

    import psycopg2

    holder = psycopg2.connect(world.urls["staging"])
    try:
        with holder.cursor() as cursor:
            cursor.execute("UPDATE accounts SET note = note")  # a writer's open transaction
        started = time.monotonic()
        response = world.prepare(changes(add_column("accounts", "plan", "string", max_length=20)))
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()

    assert response.status_code == 201, response.content
    data = response.json()["data"]
    assert data["status"] == "failed" and "lock" in data["error_message"].lower(), data["error_message"]
    assert elapsed < 3, elapsed  # never the 60 s statement timeout, never an unbounded wait
    assert target_state(world.urls["staging"]) == before
