"""What the dry-run costs on the target: each statement runs once, the catalog is read a fixed number
of times whatever the bundle's size (the issue-3 benchmark, benchmarks/run.py, measures the time)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from releases.engine import introspect, normalize_bundle, open_target, plan

_CONTROL = re.compile(r"^\s*(SELECT|BEGIN|SET|SAVEPOINT|RELEASE|ROLLBACK|COMMIT|PRAGMA)\b", re.I)


@pytest.fixture(autouse=True)
def _targets_allowed(django_db_blocker):
    """Targets are private connections, not the control database pytest-django guards."""
    with django_db_blocker.unblock():
        yield


def seeded(url: str, tables: int) -> None:
    with open_target(url) as target, target.connection.cursor() as cursor:
        for i in range(tables):
            cursor.execute(f"CREATE TABLE t_{i} (id bigint PRIMARY KEY, name text NOT NULL, qty integer)")
            cursor.execute(f"INSERT INTO t_{i} (id, name, qty) VALUES (1, 'a', 1), (2, 'b', NULL)")


def bundle(tables: int) -> list[dict]:
    raw = []
    for i in range(tables):
        raw.append({"type": "add_column", "table": f"t_{i}", "column": {"name": "extra", "type": "text"}})
        raw.append({"type": "modify_column", "table": f"t_{i}", "column": {"name": "qty", "type": "bigint"}})
        raw.append({"type": "rename_column", "table": f"t_{i}", "from": "name", "to": "title"})
        raw.append({"type": "create_table", "table": f"new_{i}", "columns": [{"name": "a", "type": "text"}]})
    return normalize_bundle({"database": {"changes": raw}})["database"]["changes"]


def executed_during_plan(url: str, changes: list[dict]) -> tuple[object, list[str]]:
    executed: list[str] = []

    def spy(execute, sql, params, many, context):
        executed.append(str(sql))
        return execute(sql, params, many, context)

    with open_target(url) as target:
        with target.connection.execute_wrapper(spy):
            result = plan(target, changes, release_id="rel_cost")
        assert introspect(target)["tables"].keys() == {f"t_{i}" for i in range(len(changes) // 4)}
    return result, executed


def test_plan__postgresql_bundle__every_forward_and_rollback_statement_executed_exactly_once(
    pg_database_factory,
):
    url = pg_database_factory()
    seeded(url, 3)
    result, executed = executed_during_plan(url, bundle(3))
    assert result.forward_ok and result.rollback_verified, result.error
    recorded = [
        s["sql"] for entry in result.changes for s in entry["statements"] + entry["rollback_statements"]
    ]
    assert recorded and all("CASCADE" not in sql for sql in recorded)
    # The spy sits outside the engine's recorder, which strips the editor's CASCADE before running.
    writes = [re.sub(r"\s+CASCADE\s*$", "", sql) for sql in executed if not _CONTROL.match(sql)]
    assert Counter(writes) == Counter(recorded)


def test_plan__postgresql_bundle_four_times_larger__same_number_of_catalog_reads(pg_database_factory):
    counts = []
    for tables in (1, 4):
        url = pg_database_factory()
        seeded(url, tables)
        result, executed = executed_during_plan(url, bundle(tables))
        assert result.forward_ok and result.rollback_verified, result.error
        # Our catalog reads (introspection, fingerprints) join pg_namespace; Django's editor reads
        # constraint names on its own, per altered column, which psql would not need either.
        counts.append(sum(1 for sql in executed if "pg_namespace" in sql and "pg_attribute" in sql))
    assert counts[0] == counts[1] > 0, counts
