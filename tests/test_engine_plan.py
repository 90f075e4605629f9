"""Dependency checks and the dry-run: recorded SQL, rollback verification, a target left untouched."""

from __future__ import annotations

import pytest

from releases.engine import (
    PlanError,
    apply,
    check_dependencies,
    introspect,
    native_fingerprint,
    normalize_bundle,
    open_target,
    plan,
    statements_sha256,
)


@pytest.fixture(autouse=True)
def _targets_allowed(django_db_blocker):
    """Targets are private connections, not the control database pytest-django guards."""
    with django_db_blocker.unblock():
        yield


def changes_of(*raw: dict) -> list[dict]:
    return normalize_bundle({"database": {"changes": list(raw)}})["database"]["changes"]


def apply_plan(url: str, changes: list[dict], release_id: str):
    with open_target(url) as target:
        result = plan(target, changes, release_id=release_id)
        assert result.forward_ok and result.rollback_verified, result.error
        apply(
            target,
            release_pk=1,
            release_id=release_id,
            bundle_sha256="0" * 64,
            changes=result.changes,
            expected_native_before=result.native_fingerprint_before,
            expected_fingerprint_after=result.fingerprint_after,
        )
    return result


def snapshot(url: str) -> tuple[dict, str, list]:
    """Full introspection, native fingerprint and every row of `people` (when it exists)."""
    with open_target(url) as target:
        schema = introspect(target)
        rows = []
        if "people" in schema["tables"]:
            with target.connection.cursor() as cursor:
                cursor.execute('SELECT * FROM "people" ORDER BY 1')
                rows = cursor.fetchall()
        return schema, native_fingerprint(target), rows


PEOPLE = {
    "type": "create_table",
    "table": "people",
    "columns": [
        {"name": "email", "type": "string", "max_length": 100, "nullable": False},
        {"name": "team", "type": "string", "max_length": 20},
    ],
}


def seed_people(url: str, rows: list[tuple[str, str]]) -> None:
    apply_plan(url, changes_of(PEOPLE), "rel_seed")
    with open_target(url) as target, target.connection.cursor() as cursor:
        for email, team in rows:
            cursor.execute('INSERT INTO "people" ("email", "team") VALUES (%s, %s)', [email, team])


SCHEMA = {
    "tables": {
        "people": {
            "columns": {
                "id": {
                    "type": "bigint",
                    "nullable": False,
                    "default": None,
                    "primary_key": True,
                    "unique": False,
                    "max_length": None,
                    "precision": None,
                    "scale": None,
                },
                "email": {
                    "type": "string",
                    "nullable": True,
                    "default": None,
                    "primary_key": False,
                    "unique": False,
                    "max_length": 100,
                    "precision": None,
                    "scale": None,
                },
            },
            "column_order": ["id", "email"],
        },
        "tags": {
            "columns": {
                "label": {
                    "type": "text",
                    "nullable": True,
                    "default": None,
                    "primary_key": False,
                    "unique": False,
                    "max_length": None,
                    "precision": None,
                    "scale": None,
                },
            },
            "column_order": ["label"],
        },
    }
}

DEPENDENCY_CASES = [
    (
        "add_to_missing_table",
        {"type": "add_column", "table": "ghost", "column": {"name": "a", "type": "text"}},
        "database.changes[0].table",
    ),
    (
        "create_existing_table",
        {"type": "create_table", "table": "people", "columns": [{"name": "a", "type": "text"}]},
        "database.changes[0].table",
    ),
    ("drop_missing_table", {"type": "drop_table", "table": "ghost"}, "database.changes[0].table"),
    (
        "drop_missing_column",
        {"type": "drop_column", "table": "people", "column": "ghost"},
        "database.changes[0].column",
    ),
    (
        "duplicate_column",
        {"type": "add_column", "table": "people", "column": {"name": "email", "type": "text"}},
        "database.changes[0].column.name",
    ),
    (
        "drop_without_key",
        {"type": "drop_column", "table": "tags", "column": "label"},
        "database.changes[0].column",
    ),
    (
        "drop_primary_key",
        {"type": "drop_column", "table": "people", "column": "id"},
        "database.changes[0].column",
    ),
    (
        "rename_missing_column",
        {"type": "rename_column", "table": "people", "from": "ghost", "to": "x"},
        "database.changes[0].from",
    ),
    (
        "rename_onto_existing",
        {"type": "rename_column", "table": "people", "from": "email", "to": "id"},
        "database.changes[0].to",
    ),
    (
        "rename_missing_table",
        {"type": "rename_table", "from": "ghost", "to": "x"},
        "database.changes[0].from",
    ),
    (
        "rename_table_onto_existing",
        {"type": "rename_table", "from": "people", "to": "tags"},
        "database.changes[0].to",
    ),
    (
        "modify_missing_column",
        {"type": "modify_column", "table": "people", "column": {"name": "ghost", "nullable": False}},
        "database.changes[0].column.name",
    ),
    (
        "modify_to_string_without_length",
        {"type": "modify_column", "table": "tags", "column": {"name": "label", "type": "string"}},
        "database.changes[0].column.max_length",
    ),
    (
        "modify_nothing_changes",
        {"type": "modify_column", "table": "people", "column": {"name": "email", "max_length": 100}},
        "database.changes[0].column",
    ),
]


@pytest.mark.parametrize(("label", "raw", "path"), DEPENDENCY_CASES, ids=[c[0] for c in DEPENDENCY_CASES])
def test_check_dependencies__change_that_does_not_apply__validation_error_with_path(label, raw, path):
    with pytest.raises(PlanError) as info:
        check_dependencies(SCHEMA, changes_of(raw))
    assert info.value.code == "validation_error"
    assert path in info.value.details, info.value.details


def test_check_dependencies__second_change_depends_on_first__checked_in_order():
    ok = changes_of(
        {"type": "create_table", "table": "orders", "columns": [{"name": "total", "type": "integer"}]},
        {"type": "add_column", "table": "orders", "column": {"name": "note", "type": "text"}},
        {"type": "rename_table", "from": "orders", "to": "purchases"},
        {"type": "drop_column", "table": "purchases", "column": "note"},
    )
    check_dependencies(SCHEMA, ok)
    with pytest.raises(PlanError) as info:
        check_dependencies(SCHEMA, [*ok, *changes_of({"type": "drop_table", "table": "orders"})])
    assert "database.changes[4].table" in info.value.details


def test_plan__sqlite_table_with_trigger_and_check__unsupported_table_and_untouched(sqlite_database_factory):
    url = sqlite_database_factory()
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute(
            'CREATE TABLE "accounts" ("id" integer NOT NULL PRIMARY KEY AUTOINCREMENT, '
            '"balance" integer NOT NULL CHECK ("balance" >= 0))'
        )
        cursor.execute('CREATE TRIGGER "accounts_audit" AFTER UPDATE ON "accounts" BEGIN SELECT 1; END')
    before = snapshot(url)
    rebuilding = changes_of(
        {"type": "modify_column", "table": "accounts", "column": {"name": "balance", "type": "bigint"}}
    )
    with open_target(url) as target:
        with pytest.raises(PlanError) as info:
            plan(target, rebuilding, release_id="rel_unsupported")
    assert info.value.code == "unsupported_table"
    assert "accounts_audit" in info.value.message
    assert snapshot(url) == before
    # A change that does not rebuild the table is fine.
    in_place = changes_of(
        {"type": "add_column", "table": "accounts", "column": {"name": "note", "type": "text"}}
    )
    with open_target(url) as target:
        assert plan(target, in_place, release_id="rel_in_place").rollback_verified


def test_plan__three_changes_last_fails__error_on_that_change_and_target_exactly_as_before(database_factory):
    url = database_factory()
    seed_people(url, [("a@example.com", "red"), ("b@example.com", "red"), ("c@example.com", "blue")])
    before = snapshot(url)
    changes = changes_of(
        {
            "type": "add_column",
            "table": "people",
            "column": {"name": "age", "type": "integer", "default": 0, "nullable": False},
        },
        {
            "type": "create_table",
            "table": "teams",
            "columns": [{"name": "name", "type": "string", "max_length": 20}],
        },
        {"type": "modify_column", "table": "people", "column": {"name": "team", "unique": True}},
    )
    with open_target(url) as target:
        result = plan(target, changes, release_id="rel_three")
    assert result.forward_ok is False and result.rollback_verified is False
    assert [c["dry_run_result"]["ok"] for c in result.changes] == [True, True, False]
    failing = result.changes[2]["dry_run_result"]
    assert failing["error"] and "change 2" in result.error
    assert result.changes[0]["statements"] and result.changes[0]["rollback_statements"]
    assert snapshot(url) == before


def test_plan__apply_of_a_failing_plan__apply_failed_and_nothing_changed(database_factory):
    from releases.engine import EngineError

    url = database_factory()
    seed_people(url, [("a@example.com", "red"), ("b@example.com", "red")])
    before = snapshot(url)
    changes = changes_of(
        {"type": "add_column", "table": "people", "column": {"name": "age", "type": "integer"}},
        {"type": "create_table", "table": "teams", "columns": [{"name": "name", "type": "text"}]},
        {"type": "modify_column", "table": "people", "column": {"name": "team", "unique": True}},
    )
    with open_target(url) as target:
        result = plan(target, changes, release_id="rel_fail_apply")
        assert result.changes[2]["statements"], "the failing statement was recorded"
        with pytest.raises(EngineError) as info:
            apply(
                target,
                release_pk=7,
                release_id="rel_fail_apply",
                bundle_sha256="0" * 64,
                changes=result.changes,
                expected_native_before=result.native_fingerprint_before,
                expected_fingerprint_after=result.fingerprint_after,
            )
    assert info.value.code == "apply_failed"
    assert snapshot(url) == before


def test_plan__dry_run__target_untouched_and_sql_recorded(database_factory):
    url = database_factory()
    seed_people(url, [("a@example.com", "red")])
    before = snapshot(url)
    changes = changes_of(
        {"type": "drop_column", "table": "people", "column": "team"},
        {"type": "rename_column", "table": "people", "from": "email", "to": "mail"},
        {"type": "drop_table", "table": "people"},
    )
    with open_target(url) as target:
        result = plan(target, changes, release_id="rel_dry")
    assert result.forward_ok and result.rollback_verified, result.error
    assert snapshot(url) == before
    assert result.tables_touched == ["people"]
    assert set(result.schema_before["tables"]) == {"people"} and result.schema_after == {"tables": {}}
    for entry in result.changes:
        assert entry["dry_run_result"]["ok"] and entry["dry_run_result"]["duration_ms"] >= 0
        assert entry["dry_run_result"]["statements"] == len(entry["statements"]) > 0
        assert entry["sql"].endswith(";") and entry["rollback_sql"].endswith(";")
        for statement in entry["statements"] + entry["rollback_statements"]:
            assert "CASCADE" not in statement["sql"].upper()
    assert '"_rm_rel_dry_0f"' in result.changes[0]["sql"]


def test_plan__same_changes_twice__same_sql_and_sql_sha256(database_factory):
    url = database_factory()
    seed_people(url, [("a@example.com", "red")])
    changes = changes_of(
        {"type": "drop_column", "table": "people", "column": "team"},
        {
            "type": "add_column",
            "table": "people",
            "column": {"name": "joined", "type": "date", "default": "2024-01-01"},
        },
    )
    with open_target(url) as target:
        first = plan(target, changes, release_id="rel_repeat")
        second = plan(target, changes, release_id="rel_repeat")
    assert first.sql_sha256 == second.sql_sha256 == statements_sha256(second.changes)
    assert [c["sql"] for c in first.changes] == [c["sql"] for c in second.changes]


def test_plan__long_release_id__preservation_names_fit_63_chars(database_factory):
    url = database_factory()
    seed_people(url, [("a@example.com", "red")])
    changes = changes_of({"type": "drop_column", "table": "people", "column": "team"})
    with open_target(url) as target:
        result = plan(target, changes, release_id="rel_20240115_1200_" + "9" * 60)
    assert result.rollback_verified, result.error
    names = [
        word
        for s in result.changes[0]["statements"]
        for word in s["sql"].split('"')
        if word.startswith("_rm_")
    ]
    assert names and all(len(name) <= 63 for name in names)


def test_plan__injection_default__stored_as_a_literal_value(database_factory):
    url = database_factory()
    payload = "'); DROP TABLE people; --"
    changes = changes_of(
        PEOPLE,
        {
            "type": "add_column",
            "table": "people",
            "column": {"name": "motto", "type": "text", "default": payload},
        },
    )
    apply_plan(url, changes, "rel_injection")
    with open_target(url) as target:
        schema = introspect(target)
        with target.connection.cursor() as cursor:
            cursor.execute('INSERT INTO "people" ("email") VALUES (%s)', ["x@example.com"])
            cursor.execute('SELECT "motto" FROM "people"')
            assert cursor.fetchone()[0] == payload
    assert schema["tables"]["people"]["columns"]["motto"]["default"] == payload


def test_plan__postgresql_drop_with_dependent_view__fails_instead_of_cascading(pg_database_factory):
    url = pg_database_factory()
    seed_people(url, [("a@example.com", "red")])
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute('CREATE VIEW "red_people" AS SELECT "email", "team" FROM "people"')
    before = snapshot(url)
    with open_target(url) as target:
        result = plan(
            target,
            changes_of({"type": "drop_column", "table": "people", "column": "team"}),
            release_id="rel_view",
        )
    assert result.forward_ok is False
    assert "depend" in result.changes[0]["dry_run_result"]["error"]
    assert snapshot(url) == before


def test_plan__sqlite_rebuild_of_table_with_plain_index__index_kept_and_rollback_verified(
    sqlite_database_factory,
):
    url = sqlite_database_factory()
    seed_people(url, [("a@example.com", "red"), ("b@example.com", "blue")])
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute('CREATE INDEX "people_team_idx" ON "people" ("team", "email")')
    changes = changes_of(
        {"type": "modify_column", "table": "people", "column": {"name": "team", "max_length": 40}}
    )
    result = apply_plan(url, changes, "rel_indexed")
    assert "CREATE TABLE" in result.changes[0]["sql"]  # SQLite rebuilt the table
    with open_target(url) as target:
        schema = introspect(target)
        with target.connection.cursor() as cursor:
            cursor.execute("SELECT sql FROM sqlite_master WHERE name = 'people_team_idx'")
            assert cursor.fetchone()[0] == 'CREATE INDEX "people_team_idx" ON "people" ("team", "email")'
    assert schema["tables"]["people"]["columns"]["team"]["max_length"] == 40
    assert schema["native"]["people"]["indexes"] == [
        {"name": "people_team_idx", "columns": ["team", "email"]}
    ]


def test_plan__postgresql_drop_table_with_extra_index__unsupported_table(pg_database_factory):
    url = pg_database_factory()
    seed_people(url, [("a@example.com", "red")])
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute('CREATE INDEX "people_team_lower" ON "people" (lower("team"))')
    before = snapshot(url)
    with open_target(url) as target, pytest.raises(PlanError) as info:
        plan(target, changes_of({"type": "drop_table", "table": "people"}), release_id="rel_drop_indexed")
    assert info.value.code == "unsupported_table" and "people_team_lower" in info.value.message
    assert snapshot(url) == before


@pytest.mark.parametrize(
    "ddl",
    [
        'CREATE INDEX "people_team_email" ON "people" ("email", "team")',
        'CREATE UNIQUE INDEX "people_team_upper" ON "people" (upper("team"))',
    ],
    ids=["plain_index", "expression_index"],
)
def test_plan__drop_column_that_an_index_uses__unsupported_table_and_untouched(database_factory, ddl):
    url = database_factory()
    seed_people(url, [("a@example.com", "red")])
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute(ddl)
    before = snapshot(url)
    with open_target(url) as target, pytest.raises(PlanError) as info:
        plan(
            target,
            changes_of({"type": "drop_column", "table": "people", "column": "team"}),
            release_id="rel_idx",
        )
    assert info.value.code == "unsupported_table"
    assert ddl.split('"')[1] in info.value.message
    assert snapshot(url) == before
