"""Apply and rollback on real targets: data preserved both ways, fail closed, locks, history."""

from __future__ import annotations

import sqlite3
import time

import psycopg2
import pytest

from releases.engine import (
    EngineError,
    apply,
    history,
    introspect,
    native_fingerprint,
    normalize_bundle,
    open_target,
    plan,
    purge_preserved,
    rollback,
    target_lock,
)


@pytest.fixture(autouse=True)
def _targets_allowed(django_db_blocker):
    """Targets are private connections, not the control database pytest-django guards."""
    with django_db_blocker.unblock():
        yield


def changes_of(*raw: dict) -> list[dict]:
    return normalize_bundle({"database": {"changes": list(raw)}})["database"]["changes"]


class Release:
    """A planned release on one target, applied and rolled back the way the services do it."""

    def __init__(self, url: str, changes: list[dict], release_id: str, pk: int = 1) -> None:
        self.url, self.release_id, self.pk = url, release_id, pk
        with open_target(url) as target:
            self.plan = plan(target, changes, release_id=release_id)
        assert self.plan.forward_ok and self.plan.rollback_verified, self.plan.error
        self.native_after = ""

    def apply(self, **overrides):
        arguments = {
            "release_pk": self.pk,
            "release_id": self.release_id,
            "bundle_sha256": "b" * 64,
            "changes": self.plan.changes,
            "expected_native_before": self.plan.native_fingerprint_before,
            "expected_fingerprint_after": self.plan.fingerprint_after,
            **overrides,
        }
        with open_target(self.url) as target:
            result = apply(target, **arguments)
        self.native_after = result.native_fingerprint_after
        return result

    def rollback(self, **overrides):
        arguments = {
            "release_pk": self.pk,
            "release_id": self.release_id,
            "bundle_sha256": "b" * 64,
            "changes": self.plan.changes,
            "expected_native_after": self.native_after,
            "expected_fingerprint_before": self.plan.fingerprint_before,
            **overrides,
        }
        with open_target(self.url) as target:
            return rollback(target, **arguments)


def snapshot(url: str, table: str = "people") -> tuple[dict, str, list]:
    with open_target(url) as target:
        schema = introspect(target)
        rows = []
        if table in schema["tables"]:
            with target.connection.cursor() as cursor:
                cursor.execute(f'SELECT * FROM "{table}" ORDER BY 1')
                rows = cursor.fetchall()
        return schema, native_fingerprint(target), rows


def execute(url: str, sql: str, params=None, many: list | None = None) -> list:
    with open_target(url) as target, target.connection.cursor() as cursor:
        if many is not None:
            cursor.execute("BEGIN")
            cursor.executemany(sql, many)
            cursor.execute("COMMIT")
            return []
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


PEOPLE = {
    "type": "create_table",
    "table": "people",
    "columns": [
        {"name": "email", "type": "string", "max_length": 100, "nullable": False, "unique": True},
        {"name": "team", "type": "string", "max_length": 20},
        {"name": "score", "type": "decimal", "precision": 8, "scale": 2, "nullable": False},
    ],
}


def seed(url: str, count: int) -> None:
    Release(url, changes_of(PEOPLE), "rel_seed", pk=100).apply()
    rows = [
        (f"user{i}@example.com", None if i % 7 == 0 else f"team{i % 13}", f"{i}.{i % 100:02d}")
        for i in range(count)
    ]
    execute(url, 'INSERT INTO "people" ("email", "team", "score") VALUES (%s, %s, %s)', many=rows)


@pytest.mark.slow
def test_drop_column__applied_then_rolled_back__every_value_of_5000_rows_restored(database_factory):
    url = database_factory()
    seed(url, 5000)
    before = snapshot(url)
    release = Release(
        url,
        changes_of(
            {"type": "drop_column", "table": "people", "column": "score"},
            {"type": "drop_column", "table": "people", "column": "team"},
            {"type": "drop_column", "table": "people", "column": "email"},
        ),
        "rel_drop3",
    )
    result = release.apply()
    schema, _, rows = snapshot(url)
    assert list(schema["tables"]["people"]["columns"]) == ["id"]
    assert len(rows) == 5000
    assert sorted(p["preserved_table"] for p in result.preservations) == [
        "_rm_rel_drop3_0f",
        "_rm_rel_drop3_1f",
        "_rm_rel_drop3_2f",
    ]
    assert {p["row_count"] for p in result.preservations} == {5000}
    release.rollback()
    after_schema, _, after_rows = snapshot(url)
    assert after_schema["tables"] == {
        "people": {
            **before[0]["tables"]["people"],
            "column_order": after_schema["tables"]["people"]["column_order"],
        }
    }
    # Every value back, column by column (the re-added columns come back at the end of the table).
    by_id_before = {row[0]: row for row in before[2]}
    order = after_schema["tables"]["people"]["column_order"]
    original_order = before[0]["tables"]["people"]["column_order"]
    for row in after_rows:
        restored = dict(zip(order, row, strict=True))
        assert tuple(restored[name] for name in original_order) == by_id_before[row[0]]
    assert len(after_rows) == 5000


def test_create_table__rolled_back__rows_written_since_are_preserved(database_factory):
    url = database_factory()
    release = Release(
        url,
        changes_of({"type": "create_table", "table": "notes", "columns": [{"name": "body", "type": "text"}]}),
        "rel_notes",
    )
    release.apply()
    execute(url, 'INSERT INTO "notes" ("body") VALUES (%s), (%s)', ["first", "it's second"])
    result = release.rollback()
    with open_target(url) as target:
        assert "notes" not in introspect(target)["tables"]
    assert result.preservations == [
        {
            "position": 0,
            "direction": "rollback",
            "kind": "table",
            "source_table": "notes",
            "source_column": "",
            "preserved_table": "_rm_rel_notes_0r",
            "row_count": 2,
        }
    ]
    assert sorted(execute(url, 'SELECT "id", "body" FROM "_rm_rel_notes_0r"')) == [
        (1, "first"),
        (2, "it's second"),
    ]


def test_drop_table__rolled_back__rows_back_and_new_ids_do_not_collide(database_factory):
    url = database_factory()
    seed(url, 50)
    before = snapshot(url)
    release = Release(url, changes_of({"type": "drop_table", "table": "people"}), "rel_drop_table")
    release.apply()
    with open_target(url) as target:
        assert "people" not in introspect(target)["tables"]
    release.rollback()
    after = snapshot(url)
    assert after[0] == before[0] and after[2] == before[2]
    execute(url, 'INSERT INTO "people" ("email", "score") VALUES (%s, %s)', ["new@example.com", "1.00"])
    assert execute(url, 'SELECT max("id") FROM "people"')[0][0] == 51


def test_apply__native_schema_changed_since_plan__schema_drift_and_nothing_run(database_factory):
    url = database_factory()
    seed(url, 3)
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "people", "column": {"name": "x", "type": "text"}}),
        "rel_drift",
    )
    execute(url, 'CREATE INDEX "people_team_idx" ON "people" ("team")')
    before = snapshot(url)
    with pytest.raises(EngineError) as info:
        release.apply()
    assert info.value.code == "schema_drift"
    assert snapshot(url) == before
    with open_target(url) as target:
        assert [row["release_id"] for row in history(target)] == ["rel_seed"]


def test_apply__twice__second_refused_as_drift(database_factory):
    url = database_factory()
    seed(url, 3)
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "people", "column": {"name": "x", "type": "text"}}),
        "rel_twice",
    )
    release.apply()
    after = snapshot(url)
    with pytest.raises(EngineError) as info:
        release.apply()
    assert info.value.code == "schema_drift"
    assert snapshot(url) == after


def test_apply__wrong_expected_fingerprint__post_validation_failed_and_rolled_back(database_factory):
    url = database_factory()
    seed(url, 3)
    before = snapshot(url)
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "people", "column": {"name": "x", "type": "text"}}),
        "rel_post",
    )
    with pytest.raises(EngineError) as info:
        release.apply(expected_fingerprint_after="0" * 64)
    assert info.value.code == "post_validation_failed"
    assert snapshot(url) == before


def test_apply_and_rollback__history_rows_in_the_target(database_factory):
    url = database_factory()
    seed(url, 1)
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "people", "column": {"name": "x", "type": "text"}}),
        "rel_hist",
        pk=42,
    )
    release.apply()
    release.rollback()
    with open_target(url) as target:
        rows = history(target)
        mine = history(target, release_pk=42)
    assert [(r["release_id"], r["direction"]) for r in rows] == [
        ("rel_seed", "forward"),
        ("rel_hist", "forward"),
        ("rel_hist", "rollback"),
    ]
    assert [r["direction"] for r in mine] == ["forward", "rollback"]
    assert all(r["bundle_sha256"] == "b" * 64 and r["applied_at"].tzinfo is not None for r in mine)


def test_rollback__not_null_column_without_default_and_rows_added_since__rollback_blocked_target_unchanged(
    database_factory,
):
    url = database_factory()
    seed(url, 5)
    release = Release(
        url, changes_of({"type": "drop_column", "table": "people", "column": "score"}), "rel_blocked"
    )
    release.apply()
    execute(url, 'INSERT INTO "people" ("email") VALUES (%s)', ["late@example.com"])
    after = snapshot(url)
    with pytest.raises(EngineError) as info:
        release.rollback()
    assert info.value.code == "rollback_blocked"
    assert snapshot(url) == after


def test_rollback__column_with_default_and_rows_added_since__new_rows_get_the_default(database_factory):
    url = database_factory()
    Release(
        url,
        changes_of(
            {
                **PEOPLE,
                "columns": [
                    {"name": "email", "type": "string", "max_length": 100},
                    {"name": "level", "type": "integer", "nullable": False, "default": 3},
                ],
            }
        ),
        "rel_seed_default",
    ).apply()
    execute(url, 'INSERT INTO "people" ("email", "level") VALUES (%s, %s)', ["old@example.com", 9])
    release = Release(
        url, changes_of({"type": "drop_column", "table": "people", "column": "level"}), "rel_default"
    )
    release.apply()
    execute(url, 'INSERT INTO "people" ("email") VALUES (%s)', ["new@example.com"])
    release.rollback()
    assert execute(url, 'SELECT "email", "level" FROM "people" ORDER BY "id"') == [
        ("old@example.com", 9),
        ("new@example.com", 3),
    ]


def test_rollback__preserved_data_purged__rollback_blocked_nothing_run(database_factory):
    url = database_factory()
    seed(url, 5)
    release = Release(
        url, changes_of({"type": "drop_column", "table": "people", "column": "team"}), "rel_purged"
    )
    result = release.apply()
    with open_target(url) as target:
        assert purge_preserved(target, [p["preserved_table"] for p in result.preservations]) == 1
        assert purge_preserved(target, ["_rm_rel_purged_0f"]) == 0
        with pytest.raises(EngineError):
            purge_preserved(target, ["people"])
    after = snapshot(url)
    with pytest.raises(EngineError) as info:
        release.rollback()
    assert info.value.code == "rollback_blocked" and "purged" in info.value.message
    assert snapshot(url) == after


def test_apply__table_locked_by_another_postgresql_session__lock_timeout_within_budget(pg_database_factory):
    url = pg_database_factory()
    seed(url, 3)
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "people", "column": {"name": "x", "type": "text"}}),
        "rel_locked",
    )
    before = snapshot(url)
    database = url.rsplit("/", 1)[1]
    holder = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=database)
    try:
        with holder.cursor() as cursor:
            cursor.execute('LOCK TABLE "people" IN ACCESS EXCLUSIVE MODE')
        started = time.monotonic()
        with pytest.raises(EngineError) as info:
            release.apply(lock_timeout_ms=300, lock_retries=2)
        elapsed = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
    assert info.value.code == "lock_timeout"
    assert "3 attempts" in info.value.message
    assert 0.9 <= elapsed < 10
    assert snapshot(url) == before


def test_apply__database_locked_by_another_sqlite_writer__lock_timeout_within_budget(sqlite_database_factory):
    url = sqlite_database_factory()
    seed(url, 3)
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "people", "column": {"name": "x", "type": "text"}}),
        "rel_locked",
    )
    before = snapshot(url)
    holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(EngineError) as info:
            release.apply(lock_timeout_ms=300, lock_retries=1)
        elapsed = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert info.value.code == "lock_timeout"
    assert 0.5 <= elapsed < 10
    assert snapshot(url) == before


def test_target_lock__held_by_one_session__second_does_not_get_it_until_released(database_factory):
    url = database_factory()
    with open_target(url) as first, open_target(url) as second:
        with target_lock(first, "tenant-1/prod") as taken:
            assert taken is True
            with target_lock(second, "tenant-1/prod") as other:
                assert other is False
            with target_lock(second, "tenant-1/staging") as unrelated:
                assert unrelated is True
        with target_lock(second, "tenant-1/prod") as again:
            assert again is True


def test_rollback__widened_column_holds_values_the_old_type_rejects__rollback_blocked_target_unchanged(
    pg_database_factory,
):
    # PostgreSQL only: SQLite's dynamic typing stores the text in the decimal column and the rollback succeeds.
    url = pg_database_factory()
    seed(url, 3)
    release = Release(
        url,
        changes_of({"type": "modify_column", "table": "people", "column": {"name": "score", "type": "text"}}),
        "rel_widen",
    )
    release.apply()
    execute(
        url, 'INSERT INTO "people" ("email", "score") VALUES (%s, %s)', ["late@example.com", "not a number"]
    )
    after = snapshot(url)
    with pytest.raises(EngineError) as info:
        release.rollback()
    if info.value.code != "rollback_blocked":
        pytest.fail(f"expected rollback_blocked, got {info.value.code}: {info.value.message}")
    assert snapshot(url) == after


def test_sqlite_target_exclusively_locked__open_works_reads_and_apply_report_lock_timeout_fast(
    sqlite_database_factory,
):
    from releases.engine import TargetError, TargetLockedError

    url = sqlite_database_factory()
    seed(url, 3)
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "people", "column": {"name": "x", "type": "text"}}),
        "rel_excl",
    )
    before = snapshot(url)
    holder = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with open_target(url, lock_timeout_ms=300) as target:
            with pytest.raises(TargetLockedError) as info:
                history(target)
            assert info.value.code == "lock_timeout"
            assert isinstance(info.value, EngineError) and isinstance(info.value, TargetError)
        with pytest.raises(EngineError) as applied:
            release.apply(lock_timeout_ms=300, lock_retries=1)
        elapsed = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert applied.value.code == "lock_timeout"
    assert elapsed < 5
    assert snapshot(url) == before


def test_modify_column__set_not_null_with_default__nulls_filled_then_restored_by_rollback(database_factory):
    url = database_factory()
    seed(url, 14)  # every 7th row has team NULL
    before = rows_by_name(url)
    assert sum(1 for row in before if row["team"] is None) == 2
    release = Release(
        url,
        changes_of(
            {
                "type": "modify_column",
                "table": "people",
                "column": {"name": "team", "nullable": False, "default": "none"},
            }
        ),
        "rel_not_null",
    )
    result = release.apply()
    assert [p["kind"] for p in result.preservations] == ["values"]
    assert execute(url, 'SELECT count(*) FROM "people" WHERE "team" = %s', ["none"]) == [(2,)]
    release.rollback()
    assert rows_by_name(url) == before


def rows_by_name(url: str, table: str = "people") -> list[dict]:
    """Rows as dicts (a SQLite rebuild moves the altered column to the end of the table)."""
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute(f'SELECT * FROM "{table}" ORDER BY "id"')
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def test_apply__statement_over_statement_timeout__apply_failed_target_unchanged(pg_database_factory):
    url = pg_database_factory()
    seed(url, 3)
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "people", "column": {"name": "x", "type": "text"}}),
        "rel_slow",
    )
    slow = [dict(entry) for entry in release.plan.changes]
    slow[0]["statements"] = [*slow[0]["statements"], {"sql": "SELECT pg_sleep(3)", "params": None}]
    before = snapshot(url)
    started = time.monotonic()
    with pytest.raises(EngineError) as info:
        release.apply(changes=slow, statement_timeout_ms=300)
    assert info.value.code == "apply_failed" and "300 ms" in info.value.message
    assert time.monotonic() - started < 2.5
    assert snapshot(url) == before


def test_apply__sqlite_foreign_key_violation_left_by_the_transaction__apply_failed_target_unchanged(
    sqlite_database_factory,
):
    url = sqlite_database_factory()
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute('CREATE TABLE "teams" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, "name" text)')
        cursor.execute(
            'CREATE TABLE "members" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
            '"team_id" bigint NULL REFERENCES "teams" ("id"))'
        )
        cursor.execute('INSERT INTO "teams" ("name") VALUES (%s)', ["red"])
        cursor.execute('INSERT INTO "members" ("team_id") VALUES (1)')
    release = Release(
        url,
        changes_of({"type": "add_column", "table": "teams", "column": {"name": "x", "type": "text"}}),
        "rel_fk",
    )
    orphaning = [dict(entry) for entry in release.plan.changes]
    orphaning[0]["statements"] = [*orphaning[0]["statements"], {"sql": 'DELETE FROM "teams"', "params": None}]
    before = snapshot(url, "members"), snapshot(url, "teams")
    with pytest.raises(EngineError) as info:
        release.apply(changes=orphaning)
    assert info.value.code == "apply_failed" and "foreign key" in info.value.message
    assert (snapshot(url, "members"), snapshot(url, "teams")) == before


def test_modify_column__default_with_percent_placeholders__filled_verbatim_and_restored(database_factory):
    url = database_factory()
    seed(url, 7)  # row 0 has team NULL
    before = rows_by_name(url)
    fill = "50%s %% %d ?"
    release = Release(
        url,
        changes_of(
            {
                "type": "modify_column",
                "table": "people",
                "column": {"name": "team", "nullable": False, "default": fill},
            }
        ),
        "rel_percent",
    )
    release.apply()
    assert execute(url, 'SELECT "team" FROM "people" WHERE "id" = 1') == [(fill,)]
    with open_target(url) as target:
        assert introspect(target)["tables"]["people"]["columns"]["team"]["default"] == fill
    release.rollback()
    assert rows_by_name(url) == before


def test_drop_column__tables_keyed_by_uuid_string_and_integer_named_like_aliases__values_restored(
    database_factory,
):
    url = database_factory()
    Release(
        url,
        changes_of(
            {
                "type": "create_table",
                "table": "s",
                "columns": [
                    {"name": "id", "type": "uuid", "primary_key": True, "default": {"function": "uuid"}},
                    {"name": "v", "type": "text", "nullable": False, "default": "q"},
                ],
            },
            {
                "type": "create_table",
                "table": "t",
                "columns": [
                    {"name": "code", "type": "string", "max_length": 5, "primary_key": True},
                    {"name": "n", "type": "integer"},
                ],
            },
            {
                "type": "create_table",
                "table": "saved",
                "columns": [
                    {"name": "k", "type": "integer", "primary_key": True},
                    {"name": "doc", "type": "json"},
                ],
            },
        ),
        "rel_keys",
    ).apply()
    execute(url, 'INSERT INTO "s" ("v") VALUES (%s), (%s)', ["a", "b"])
    execute(url, 'INSERT INTO "t" ("code", "n") VALUES (%s, %s), (%s, %s)', ["x", 1, "y", None])
    execute(url, 'INSERT INTO "saved" ("k", "doc") VALUES (%s, %s), (%s, %s)', [1, '{"a": 1}', 2, None])
    before = {table: rows_by_name_keyed(url, table) for table in ("s", "t", "saved")}
    release = Release(
        url,
        changes_of(
            {"type": "drop_column", "table": "s", "column": "v"},
            {"type": "drop_column", "table": "t", "column": "n"},
            {"type": "drop_column", "table": "saved", "column": "doc"},
        ),
        "rel_keys_drop",
    )
    release.apply()
    release.rollback()
    assert {table: rows_by_name_keyed(url, table) for table in ("s", "t", "saved")} == before


def rows_by_name_keyed(url: str, table: str) -> list[dict]:
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute(f'SELECT * FROM "{table}"')
        names = [column[0] for column in cursor.description]
        return sorted((dict(zip(names, row, strict=True)) for row in cursor.fetchall()), key=repr)


def test_apply__flags_only_release_without_changes__history_row_and_schema_unchanged(database_factory):
    url = database_factory()
    seed(url, 2)
    before = snapshot(url)
    release = Release(url, [], "rel_flags_only", pk=9)
    assert release.plan.changes == [] and release.plan.fingerprint_before == release.plan.fingerprint_after
    result = release.apply()
    assert result.statements == 0 and result.preservations == []
    assert snapshot(url) == before
    with open_target(url) as target:
        assert [(r["release_id"], r["direction"]) for r in history(target, release_pk=9)] == [
            ("rel_flags_only", "forward")
        ]
