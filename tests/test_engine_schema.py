"""Target connections, introspection of all 14 types with defaults, portable and native fingerprints."""

from __future__ import annotations

import pytest
from django.db import connections

from releases.engine import (
    TargetError,
    apply,
    fingerprint,
    introspect,
    native_fingerprint,
    normalize_bundle,
    open_target,
    plan,
)


@pytest.fixture(autouse=True)
def _targets_allowed(django_db_blocker):
    """Targets are private connections, not the control database pytest-django guards."""
    with django_db_blocker.unblock():
        yield


ALL_TYPES = [
    {"name": "s", "type": "string", "max_length": 20, "default": "'); DROP TABLE t; --", "nullable": False},
    {"name": "tx", "type": "text", "default": 'say "hi"\nit\'s'},
    {"name": "i", "type": "integer", "default": -5, "nullable": False},
    {"name": "b", "type": "bigint", "default": 9_000_000_000, "unique": True},
    {"name": "sm", "type": "smallint", "default": 3},
    {"name": "bo", "type": "boolean", "default": False, "nullable": False},
    {"name": "d", "type": "date", "default": "2024-01-15"},
    {"name": "dt", "type": "datetime", "default": "2024-01-15T12:00:00.250000+02:00"},
    {"name": "dn", "type": "datetime", "default": {"function": "now"}},
    {"name": "tm", "type": "time", "default": "12:30:15"},
    {"name": "de", "type": "decimal", "precision": 10, "scale": 2, "default": "-1.1"},
    {"name": "f", "type": "float", "default": -1.25},
    {"name": "u", "type": "uuid", "default": "12345678-1234-5678-1234-567812345678"},
    {"name": "uf", "type": "uuid", "default": {"function": "uuid"}},
    {"name": "j", "type": "json", "default": {"a": [1, "x", None], "k": "it's"}},
    {"name": "bi", "type": "binary", "default": "AAEC/w=="},
    {"name": "plain", "type": "text"},
]


def create(url: str, changes_raw: list[dict], release_id: str = "rel_schema") -> dict:
    changes = normalize_bundle({"database": {"changes": changes_raw}})["database"]["changes"]
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
        return introspect(target)


def test_introspect__all_14_types_with_defaults__same_portable_columns_as_the_bundle(database_factory):
    url = database_factory()
    bundle = normalize_bundle(
        {"database": {"changes": [{"type": "create_table", "table": "t", "columns": ALL_TYPES}]}}
    )
    schema = create(url, bundle["database"]["changes"])
    expected = {
        c["name"]: {k: v for k, v in c.items() if k != "name"}
        for c in bundle["database"]["changes"][0]["columns"]
    }
    assert schema["tables"]["t"]["columns"] == expected
    assert schema["tables"]["t"]["column_order"] == [
        c["name"] for c in bundle["database"]["changes"][0]["columns"]
    ]


def test_fingerprint__all_14_types_with_defaults__equal_on_sqlite_and_postgresql(
    sqlite_database_factory, pg_database_factory
):
    change = [{"type": "create_table", "table": "t", "columns": ALL_TYPES}]
    sqlite_schema = create(sqlite_database_factory(), change)
    pg_schema = create(pg_database_factory(), change)
    assert sqlite_schema["tables"] == pg_schema["tables"]
    assert fingerprint(sqlite_schema) == fingerprint(pg_schema)


def test_fingerprint__one_default_differs__fingerprint_differs(sqlite_database_factory):
    one = create(
        sqlite_database_factory(),
        [{"type": "create_table", "table": "t", "columns": [{"name": "a", "type": "integer", "default": 1}]}],
    )
    two = create(
        sqlite_database_factory(),
        [{"type": "create_table", "table": "t", "columns": [{"name": "a", "type": "integer", "default": 2}]}],
    )
    assert fingerprint(one) != fingerprint(two)


def test_introspect__hand_written_postgresql_ddl__maps_to_the_vocabulary(pg_database_factory):
    url = pg_database_factory()
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE legacy (id serial PRIMARY KEY, name varchar(30) NOT NULL DEFAULT 'x', "
            "at timestamptz DEFAULT now(), naive timestamp, doc json, price numeric, code char(3), "
            "n integer DEFAULT (-7), ok boolean DEFAULT 'true')"
        )
        cursor.execute("CREATE TABLE _rm_side (a int)")
        schema = introspect(target)
    columns = schema["tables"]["legacy"]["columns"]
    assert "_rm_side" not in schema["tables"]
    assert (
        columns["id"]["type"] == "integer"
        and columns["id"]["default"] is None
        and columns["id"]["primary_key"]
    )
    assert schema["native"]["legacy"]["auto_pk"] == "id"
    assert columns["name"] == {
        "type": "string",
        "nullable": False,
        "default": "x",
        "primary_key": False,
        "unique": False,
        "max_length": 30,
        "precision": None,
        "scale": None,
    }
    assert columns["at"]["type"] == "datetime" and columns["at"]["default"] == {"function": "now"}
    assert columns["naive"]["type"] == "native:postgresql:timestamp without time zone"
    assert columns["doc"]["type"] == "native:postgresql:json"
    assert columns["price"]["type"] == "native:postgresql:numeric"
    assert columns["code"]["type"] == "native:postgresql:character(3)"
    assert columns["n"]["default"] == -7
    assert columns["ok"]["default"] is True


def test_introspect__hand_written_sqlite_ddl__pk_not_null_and_natives(sqlite_database_factory):
    url = sqlite_database_factory()
    with open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute(
            'CREATE TABLE legacy ("id" integer PRIMARY KEY, "v" varchar(5) DEFAULT \'a\', "w" numeric, '
            '"x" text CHECK (length(x) < 5))'
        )
        cursor.execute("CREATE TRIGGER legacy_t AFTER INSERT ON legacy BEGIN SELECT 1; END")
        schema = introspect(target)
    columns = schema["tables"]["legacy"]["columns"]
    assert columns["id"]["nullable"] is False and columns["id"]["primary_key"] is True
    assert columns["id"]["type"] == "integer"  # no AUTOINCREMENT: not the engine's bigint identity
    assert columns["v"]["default"] == "a" and columns["v"]["max_length"] == 5
    assert columns["w"]["type"] == "native:sqlite:numeric"
    blockers = " ".join(schema["native"]["legacy"]["blockers"])
    assert "trigger legacy_t" in blockers and "check constraint" in blockers


def test_native_fingerprint__index_added__changes_but_portable_does_not(database_factory):
    url = database_factory()
    schema = create(
        url, [{"type": "create_table", "table": "t", "columns": [{"name": "a", "type": "integer"}]}]
    )
    with open_target(url) as target:
        native = native_fingerprint(target)
        with target.connection.cursor() as cursor:
            cursor.execute('CREATE INDEX "t_a_idx" ON "t" ("a")')
        assert native_fingerprint(target) != native
        assert fingerprint(introspect(target)) == fingerprint(schema)


def test_native_fingerprint__rm_tables__ignored(database_factory):
    url = database_factory()
    create(url, [{"type": "create_table", "table": "t", "columns": [{"name": "a", "type": "integer"}]}])
    with open_target(url) as target:
        native = native_fingerprint(target)
        portable = fingerprint(introspect(target))
        with target.connection.cursor() as cursor:
            cursor.execute('CREATE TABLE "_rm_x_0f" AS SELECT * FROM "t"')
            cursor.execute('CREATE INDEX "_rm_x_0f_k" ON "_rm_x_0f" ("a")')
        assert native_fingerprint(target) == native
        assert fingerprint(introspect(target)) == portable


def test_open_target__private_alias__never_default_and_not_in_global_connections(database_factory):
    url = database_factory()
    with open_target(url) as target:
        assert target.alias != "default"
        assert target.alias not in connections
        with target.connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        wrapper = target.connection
    assert wrapper.connection is None  # closed on exit


@pytest.mark.parametrize(
    "url",
    ["mysql://u:p@h/db", "", "redis://localhost:6379/0", "http://example.invalid/db"],
)
def test_open_target__unsupported_url__target_error(url):
    with pytest.raises(TargetError), open_target(url):
        pass


def test_open_target__unreachable_postgres__scrubbed_target_error():
    url = "postgres://secretuser:s3cretpw@127.0.0.1:1/secretdb"
    with pytest.raises(TargetError) as info, open_target(url):
        pass
    message = str(info.value)
    assert "s3cretpw" not in message and "secretuser" not in message
    assert message.startswith("cannot connect to the target database")


def test_open_target__unknown_pg_database__scrubbed_target_error(pg_database_factory):
    url = pg_database_factory().rsplit("/", 1)[0] + "/no_such_db_for_engine_tests"
    with pytest.raises(TargetError) as info, open_target(url):
        pass
    assert "no_such_db_for_engine_tests" not in str(info.value)


def test_open_target__file_that_is_not_a_database__target_error(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"this is not an SQLite database, just text. " * 100)
    with pytest.raises(TargetError) as info, open_target(f"sqlite:///{path}"):
        pass
    assert "not a database" in str(info.value)
