"""Dependency checks, the expected schema, and the dry-run that records forward and rollback SQL."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from releasemgr.core.errors import ErrorCode

from .bundle import merge_column, sha256_hex, validate_merged_column
from .errors import PlanError
from .operations import ChangeRunner, Recorder, preservation_key, quote
from .schema import fingerprint, introspect, native_fingerprint, portable_only, table_columns
from .target import Target

SQLITE_REBUILD_NOTE = (
    "SQLite rebuilds the table for this change from a model of it, which would lose: {blockers}. "
    "Change the table by hand or move it to PostgreSQL."
)


# --------------------------------------------------------------------------------------------------
# Simulated schema
# --------------------------------------------------------------------------------------------------


def _portable(column: dict) -> dict:
    return {key: value for key, value in column.items() if key != "name"}


def _fail(code: ErrorCode, path: str, message: str) -> PlanError:
    return PlanError(code, message, {path: message})


def _sqlite_rebuilds(change: dict, schema: dict) -> bool:
    """Whether Django's SQLite editor rebuilds the table for this change or for its rollback."""
    change_type = change["type"]
    if change_type == "modify_column":
        return True
    if change_type == "add_column":
        column = change["column"]
        return (not column["nullable"]) or column["default"] is not None or column["unique"]
    if change_type == "drop_column":
        column = schema["tables"][change["table"]]["columns"][change["column"]]
        return (not column["nullable"]) or column["default"] is not None or column["unique"]
    if change_type == "rename_column":
        # A JSON column's CHECK names the column, so Django rebuilds the table to rename it.
        column = schema["tables"][change["table"]]["columns"].get(change["from"]) or {}
        return column.get("type") == "json"
    return False


# One branch per change type: issue 14 gives each type its own module.
def apply_change_to_schema(schema: dict, change: dict, path: str = "change") -> None:  # noqa: C901
    """Advance a (portable + native) schema by one change; PlanError when it does not apply."""
    tables = schema.setdefault("tables", {})
    native_all = schema.setdefault("native", {})
    change_type = change["type"]
    table = change.get("table")

    if change_type == "create_table":
        if table in tables:
            raise _fail(ErrorCode.VALIDATION_ERROR, f"{path}.table", f"table '{table}' already exists")
        tables[table] = {
            "columns": {column["name"]: _portable(column) for column in change["columns"]},
            "column_order": [column["name"] for column in change["columns"]],
        }
        primary = [c for c in change["columns"] if c["primary_key"]]
        auto = (
            primary[0]["name"]
            if primary and primary[0]["type"] == "bigint" and primary[0]["default"] is None
            else None
        )
        native_all[table] = {
            "vendor": schema.get("vendor"),
            "auto_pk": auto,
            "indexes": [],
            "blockers": [],
            "has_primary_key": bool(primary),
        }
        return
    source = change.get("from") if change_type == "rename_table" else table
    if source not in tables:
        raise _fail(
            ErrorCode.VALIDATION_ERROR,
            f"{path}.{'from' if change_type == 'rename_table' else 'table'}",
            f"table '{source}' does not exist",
        )
    entry = tables[source]
    native = native_all.get(source) or {"blockers": [], "indexes": [], "has_primary_key": True}
    blockers = list(native.get("blockers", []))
    if not native.get("has_primary_key", True):
        blockers.append("the table has no primary key")
    vendor = native.get("vendor") or schema.get("vendor")
    columns = entry["columns"]

    if change_type == "drop_table":
        if blockers and vendor == "postgresql":
            raise _fail(
                ErrorCode.UNSUPPORTED_TABLE,
                f"{path}.table",
                f"dropping '{table}' cannot be rolled back exactly (it has {', '.join(blockers)})",
            )
        del tables[table]
        native_all.pop(table, None)
        return
    if change_type == "rename_table":
        target_name = change["to"]
        if target_name in tables:
            raise _fail(ErrorCode.VALIDATION_ERROR, f"{path}.to", f"table '{target_name}' already exists")
        tables[target_name] = tables.pop(source)
        if source in native_all:
            native_all[target_name] = native_all.pop(source)
        return
    if (
        vendor == "sqlite"
        and blockers
        and change_type in ("add_column", "drop_column", "modify_column", "rename_column")
    ):
        subject = {"drop_column": change.get("column"), "rename_column": change.get("from")}.get(change_type)
        if change_type == "modify_column":
            subject = change["column"]["name"]
        if change_type != "add_column" and subject not in columns:
            pass  # reported below as a validation error
        elif _sqlite_rebuilds(change, schema):
            raise _fail(
                ErrorCode.UNSUPPORTED_TABLE,
                f"{path}.table",
                SQLITE_REBUILD_NOTE.format(blockers=", ".join(blockers)),
            )
    order = entry.setdefault("column_order", list(columns))

    if change_type == "add_column":
        column = change["column"]
        if column["name"] in columns:
            raise _fail(
                ErrorCode.VALIDATION_ERROR,
                f"{path}.column.name",
                f"column '{column['name']}' already exists in '{table}'",
            )
        if column["primary_key"]:
            raise _fail(
                ErrorCode.VALIDATION_ERROR,
                f"{path}.column.primary_key",
                "cannot add a primary key to an existing table",
            )
        columns[column["name"]] = _portable(column)
        order.append(column["name"])
    elif change_type == "drop_column":
        name = change["column"]
        if name not in columns:
            raise _fail(
                ErrorCode.VALIDATION_ERROR, f"{path}.column", f"column '{name}' does not exist in '{table}'"
            )
        if columns[name].get("primary_key"):
            raise _fail(
                ErrorCode.VALIDATION_ERROR, f"{path}.column", f"'{name}' is the primary key of '{table}'"
            )
        if len(columns) == 1:
            raise _fail(
                ErrorCode.VALIDATION_ERROR, f"{path}.column", f"'{name}' is the only column of '{table}'"
            )
        lost = (native.get("column_objects") or {}).get(name)
        if lost:
            raise _fail(
                ErrorCode.UNSUPPORTED_TABLE,
                f"{path}.column",
                f"dropping '{table}.{name}' would also drop {', '.join(lost)}, which the rollback cannot "
                "restore; drop or change those first",
            )
        if preservation_key(list(columns.items()), exclude=name) is None:
            raise _fail(
                ErrorCode.VALIDATION_ERROR,
                f"{path}.column",
                f"drop_column needs a single-column primary key or a non-null unique key on '{table}' "
                "so the values can be restored on rollback",
            )
        del columns[name]
        order.remove(name)
    elif change_type == "modify_column":
        modification = change["column"]
        name = modification["name"]
        if name not in columns:
            raise _fail(
                ErrorCode.VALIDATION_ERROR,
                f"{path}.column.name",
                f"column '{name}' does not exist in '{table}'",
            )
        current = dict(columns[name])
        merged = merge_column(current, modification)
        errors = validate_merged_column(merged, f"{path}.column")
        if errors:
            first = next(iter(errors.items()))
            raise PlanError(ErrorCode.VALIDATION_ERROR, f"{first[0]}: {first[1]}", errors)
        if str(current.get("type", "")).startswith("native:"):
            raise _fail(
                ErrorCode.VALIDATION_ERROR,
                f"{path}.column.name",
                f"column '{name}' has a type outside the vocabulary",
            )
        if merged == current:
            raise _fail(
                ErrorCode.VALIDATION_ERROR,
                f"{path}.column",
                f"modify_column changes nothing on '{table}.{name}'",
            )
        if current.get("primary_key") and merged.get("type") != current.get("type"):
            raise _fail(
                ErrorCode.VALIDATION_ERROR,
                f"{path}.column.type",
                "changing the type of a primary key is not supported",
            )
        if current.get("primary_key") and native.get("auto_pk") == name:
            raise _fail(
                ErrorCode.VALIDATION_ERROR, f"{path}.column", "an identity primary key cannot be modified"
            )
        columns[name] = merged
    elif change_type == "rename_column":
        old, new = change["from"], change["to"]
        if old not in columns:
            raise _fail(
                ErrorCode.VALIDATION_ERROR, f"{path}.from", f"column '{old}' does not exist in '{table}'"
            )
        if new in columns:
            raise _fail(
                ErrorCode.VALIDATION_ERROR, f"{path}.to", f"column '{new}' already exists in '{table}'"
            )
        entry["columns"] = {(new if n == old else n): c for n, c in columns.items()}
        entry["column_order"] = [new if n == old else n for n in order]
        if table in native_all:
            native_all[table] = copy.deepcopy(native_all[table])
            if native_all[table].get("auto_pk") == old:
                native_all[table]["auto_pk"] = new
            for index in native_all[table].get("indexes", []):
                index["columns"] = [new if c == old else c for c in index["columns"]]
            objects = native_all[table].get("column_objects") or {}
            if old in objects:
                objects[new] = objects.pop(old)
    else:  # pragma: no cover - normalize_bundle only lets known types through
        raise _fail(ErrorCode.VALIDATION_ERROR, f"{path}.type", f"unknown change type {change_type}")


def _with_vendor(schema: dict) -> dict:
    result = copy.deepcopy(schema)
    vendors = {n.get("vendor") for n in result.get("native", {}).values() if n.get("vendor")}
    if len(vendors) == 1:
        result["vendor"] = vendors.pop()
    return result


def check_dependencies(schema: dict, changes: list[dict]) -> None:
    """Check the changes one by one against the schema each leaves; PlanError on the first problem."""
    state = _with_vendor(schema)
    for index, change in enumerate(changes):
        apply_change_to_schema(state, change, f"database.changes[{index}]")


def expected_schema(schema: dict, changes: list[dict]) -> dict:
    """The schema the changes should leave behind (PlanError when they do not apply)."""
    state = _with_vendor(schema)
    for index, change in enumerate(changes):
        apply_change_to_schema(state, change, f"database.changes[{index}]")
    state.pop("vendor", None)
    return state


# --------------------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A dry-run's result: per change SQL and results, and what the target looks like around it."""

    changes: list[dict] = field(default_factory=list)
    forward_ok: bool = False
    rollback_verified: bool = False
    error: str | None = None
    fingerprint_before: str = ""
    fingerprint_after: str = ""
    schema_before: dict = field(default_factory=dict)
    schema_after: dict = field(default_factory=dict)
    native_fingerprint_before: str = ""
    sql_sha256: str = ""
    tables_touched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.forward_ok and self.rollback_verified

    def to_dict(self) -> dict:
        return asdict(self)


def statements_sha256(changes: list[Any]) -> str:
    """sha256 over the canonical JSON of every forward and rollback statement, in order.

    `changes` are change dicts (Plan changes, or recorded ones), in position order.
    """
    return sha256_hex(
        [
            {
                "statements": list(change.get("statements") or []),
                "rollback_statements": list(change.get("rollback_statements") or []),
            }
            for change in changes
        ]
    )


def render_sql(target: Target, statements: list[dict]) -> str:
    """Readable SQL text: parameters quoted by the dialect, one statement per line-terminated block."""
    parts = []
    editor = target.connection.schema_editor(collect_sql=True, atomic=False)
    for statement in statements:
        sql, params = statement["sql"], statement.get("params")
        if params:
            sql = sql % tuple(editor.quote_value(p) for p in params)
        parts.append(sql.rstrip().rstrip(";") + ";")
    return "\n".join(parts)


def tables_touched(changes: list[dict]) -> list[str]:
    names: set[str] = set()
    for change in changes:
        if change.get("table"):
            names.add(change["table"])
        if change["type"] == "rename_table":
            names.add(change["to"])
    return sorted(names)


def begin(
    target: Target, lock_timeout_ms: int, statement_timeout_ms: int, *, immediate: bool = False
) -> None:
    connection = target.connection
    with connection.cursor() as cursor:
        if target.is_sqlite:
            connection.disable_constraint_checking()
            cursor.execute(f"PRAGMA busy_timeout = {int(lock_timeout_ms)}")
            cursor.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        else:
            cursor.execute("BEGIN")
            cursor.execute(f"SET LOCAL lock_timeout = '{int(lock_timeout_ms)}ms'")
            cursor.execute(f"SET LOCAL statement_timeout = '{int(statement_timeout_ms)}ms'")


def rollback_transaction(target: Target) -> None:
    connection = target.connection
    try:
        with connection.cursor() as cursor:
            cursor.execute("ROLLBACK")
    except Exception:  # noqa: BLE001 - nothing open (or the connection died): the target keeps its state
        if target.is_postgresql:
            connection.close()
    finally:
        if target.is_sqlite and connection.connection is not None:
            connection.enable_constraint_checking()


BATCH_STATEMENTS = 100
BATCH_CHARS = 1_000_000


def run_statements(target: Target, statements: list[dict]) -> None:
    """Run recorded statements in order. On PostgreSQL, consecutive statements without parameters go
    to the server together, up to BATCH_STATEMENTS at a time (one round trip each batch instead of one
    per statement; the server still runs them one by one, stops at the first error, and applies
    statement_timeout to each)."""
    with target.connection.cursor() as cursor:
        if not target.is_postgresql:
            for statement in statements:
                cursor.execute(statement["sql"], statement.get("params"))
            return
        batch: list[str] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if batch:
                # A newline before each `;` so a trailing line comment cannot swallow it.
                cursor.execute("\n;\n".join(batch))
                batch.clear()
                size = 0

        for statement in statements:
            if statement.get("params") is not None:  # ran with parameters: run it alike, alone
                flush()
                cursor.execute(statement["sql"], statement["params"])
                continue
            batch.append(statement["sql"])
            size += len(statement["sql"])
            if len(batch) >= BATCH_STATEMENTS or size >= BATCH_CHARS:
                flush()
        flush()


def _compare(left: dict, right: dict) -> list[str]:
    """Differences between two portable schemas, as short sentences (empty when equal)."""
    differences = []
    a, b = portable_only(left)["tables"], portable_only(right)["tables"]
    for table in sorted(set(a) | set(b)):
        if table not in a or table not in b:
            differences.append(f"table {table} only in {'expected' if table in a else 'actual'}")
            continue
        for column in sorted(set(a[table]["columns"]) | set(b[table]["columns"])):
            if a[table]["columns"].get(column) != b[table]["columns"].get(column):
                differences.append(
                    f"{table}.{column}: expected {a[table]['columns'].get(column)} got {b[table]['columns'].get(column)}"
                )
    native_a = {
        t: sorted((i["name"], tuple(i["columns"])) for i in n.get("indexes", []))
        for t, n in left.get("native", {}).items()
    }
    native_b = {
        t: sorted((i["name"], tuple(i["columns"])) for i in n.get("indexes", []))
        for t, n in right.get("native", {}).items()
    }
    for table in sorted(set(native_a) & set(native_b)):
        if native_a[table] != native_b[table]:
            differences.append(f"indexes of {table} differ")
    return differences


def _record_rollbacks_of_the_changes_that_worked(
    target: Target,
    result: Plan,
    count: int,
    reverse_pass: Callable[[int], str | None],
    lock_timeout_ms: int,
    statement_timeout_ms: int,
) -> None:
    """After change `count` failed: the rollback SQL of changes 0 .. count-1, for the report.

    The failed change may have aborted the transaction (PostgreSQL): start over, replay the recorded
    forward SQL of the changes that worked, and record their rollbacks (the plan is not ok anyway; the
    first error stays the forward one)."""
    rollback_transaction(target)
    begin(target, lock_timeout_ms, statement_timeout_ms)
    try:
        run_statements(target, [s for e in result.changes[:count] for s in e["statements"]])
        reverse_pass(count)
    except Exception:  # noqa: BLE001,S110 - only the report's rollback SQL is missing then
        pass


def _verify_forward_schema_then_rollback(
    target: Target,
    result: Plan,
    count: int,
    reverse_pass: Callable[[int], str | None],
    *,
    expected: dict,
    before: dict,
) -> None:
    """After a forward pass that worked: the live schema must be `expected`; then the rollback of all
    `count` changes runs and must restore `before` (sets forward_ok, error, rollback_verified)."""
    differences = _compare(expected, introspect(target))
    if differences:
        result.forward_ok = False
        result.error = "the schema after the changes is not the expected one: " + "; ".join(differences[:5])
        return
    result.error = reverse_pass(count)
    if result.error is not None:
        return
    differences = _compare(before, introspect(target))
    if differences:
        result.error = "the rollback does not restore the schema: " + "; ".join(differences[:5])
    else:
        result.rollback_verified = True


def plan(
    target: Target,
    changes: list[dict],
    *,
    release_id: str,
    lock_timeout_ms: int = 1000,
    statement_timeout_ms: int = 60_000,
) -> Plan:
    """Check dependencies, then dry-run every change (and its rollback) in one rolled-back transaction."""
    schema_before = introspect(target)
    result = Plan(
        schema_before=portable_only(schema_before),
        fingerprint_before=fingerprint(schema_before),
        native_fingerprint_before=native_fingerprint(target),
        tables_touched=tables_touched(changes),
    )
    check_dependencies(schema_before, changes)
    expected = expected_schema(schema_before, changes)
    result.schema_after = portable_only(expected)
    result.fingerprint_after = fingerprint(expected)
    for position, change in enumerate(changes):
        result.changes.append(
            {
                "position": position,
                "operation": change["type"],
                "table": change["table"],
                "change": change,
                "statements": [],
                "rollback_statements": [],
                "sql": "",
                "rollback_sql": "",
                "dry_run_result": {"ok": False, "duration_ms": 0, "statements": 0, "error": "not run"},
            }
        )

    connection = target.connection
    recorder = Recorder(target.vendor)
    runner = ChangeRunner(target, recorder, release_id)
    # One pass each way, every statement executed once (as psql would run forward then rollback):
    # the forward work of every change, recorded as it runs; then, after the forward schema is checked,
    # each change's rollback is generated and run in reverse order of changes, recorded as it runs.
    # A change's rollback is thus generated after its forward SQL ran, in the same transaction, on the
    # live table exactly as the stored rollback statements will find it when replayed in that order
    # (the later changes already undone); the schema it all leaves must be the one before.
    states: list[dict[str, Any]] = []
    # PostgreSQL alters tables in place (its editor reads constraint names from the catalog itself), so
    # the runner takes each table's columns from the simulated schema, advanced change by change,
    # instead of re-reading the catalog twice per change; the whole catalog is read after the forward
    # pass and after the rollback pass, and both must match. SQLite rebuilds tables from the model, so
    # there the model always comes from the live table.
    simulated = _with_vendor(schema_before) if target.is_postgresql else None
    known_after: list[dict[str, tuple[list, dict]]] = []

    def known(names: list[str]) -> dict[str, tuple[list, dict]]:
        assert simulated is not None
        # apply_change_to_schema replaces column dicts and copies a native dict before changing it,
        # so a new list of the table's columns is a stable snapshot (the runner copies on use).
        return {
            name: (table_columns(simulated, name), simulated["native"].get(name, {}))
            for name in names
            if name in simulated["tables"]
        }

    def reverse_pass(count: int) -> str | None:
        """Generate and run the rollback of changes count-1 .. 0; the first failure's message."""
        for position in reversed(range(count)):
            entry = result.changes[position]
            if simulated is not None:
                runner.known = known_after[position]
            try:
                runner.run(
                    changes[position], position, "rollback", states[position], entry["rollback_statements"]
                )
            except Exception as exc:  # noqa: BLE001
                message = target.scrub(str(exc)).strip() or exc.__class__.__name__
                return f"the rollback of change {position} cannot be generated or failed in the dry-run: {message}"
        return None

    with connection.execute_wrapper(recorder):
        begin(target, lock_timeout_ms, statement_timeout_ms)
        try:
            result.forward_ok = True
            for position, change in enumerate(changes):
                entry = result.changes[position]
                state: dict[str, Any] = {}
                started = time.monotonic()
                if simulated is not None:
                    runner.known = known([change["table"]])
                try:
                    runner.run(change, position, "forward", state, entry["statements"])
                except Exception as exc:  # noqa: BLE001 - any failure ends the dry-run with its message
                    message = target.scrub(str(exc)).strip() or exc.__class__.__name__
                    entry["dry_run_result"] = {
                        "ok": False,
                        "duration_ms": round((time.monotonic() - started) * 1000, 3),
                        "statements": len(entry["statements"]),
                        "error": message,
                    }
                    result.forward_ok = False
                    result.error = f"change {position} ({change['type']} {change['table']}) failed: {message}"
                    break
                entry["dry_run_result"] = {
                    "ok": True,
                    "duration_ms": round((time.monotonic() - started) * 1000, 3),
                    "statements": len(entry["statements"]),
                    "error": None,
                }
                states.append(state)
                if simulated is not None:
                    apply_change_to_schema(simulated, change, f"database.changes[{position}]")
                    renamed_to = [change["to"]] if change["type"] == "rename_table" else []
                    known_after.append(known([change["table"], *renamed_to]))
            if not result.forward_ok and states:
                _record_rollbacks_of_the_changes_that_worked(
                    target, result, len(states), reverse_pass, lock_timeout_ms, statement_timeout_ms
                )
            if result.forward_ok:
                _verify_forward_schema_then_rollback(
                    target, result, len(changes), reverse_pass, expected=expected, before=schema_before
                )
        finally:
            rollback_transaction(target)
    for entry in result.changes:
        entry["sql"] = render_sql(target, entry["statements"])
        entry["rollback_sql"] = render_sql(target, entry["rollback_statements"])
    result.sql_sha256 = statements_sha256(result.changes)
    return result


__all__ = [
    "Plan",
    "apply_change_to_schema",
    "begin",
    "check_dependencies",
    "expected_schema",
    "plan",
    "quote",
    "render_sql",
    "rollback_transaction",
    "run_statements",
    "statements_sha256",
    "tables_touched",
]
