"""Differences between two portable schemas: computed bundles and the prod gate's details.

Pure functions over the portable schema shape of docs/ENGINE.md. `diff_schemas` fails closed with
`DiffError` instead of emitting a change the engine could not express (a `native:` type, a raw
default, a primary key change): a computed bundle must turn the target into exactly the source.
"""

from __future__ import annotations

from typing import Any

from releasemgr.core.errors import ApplicationError, ErrorCode

from .bundle import COLUMN_TYPES

VOCABULARY_TYPES = frozenset(COLUMN_TYPES)
PRIMARY_KEY_TYPES = ("integer", "bigint", "smallint", "string", "uuid")
# Attribute order of a normalized column (after "name"), and of modify_column's listed attributes.
COLUMN_ATTRIBUTES = (
    "type",
    "nullable",
    "default",
    "unique",
    "primary_key",
    "max_length",
    "precision",
    "scale",
)
_COLUMN_DEFAULTS: dict[str, Any] = {
    "nullable": True,
    "default": None,
    "unique": False,
    "primary_key": False,
    "max_length": None,
    "precision": None,
    "scale": None,
}
_IGNORED_PREFIXES = ("_rm_", "sqlite_")


class DiffError(ApplicationError, ValueError):
    """A difference that cannot be expressed as normalized changes; `column` names the culprit."""

    code = ErrorCode.VALIDATION_ERROR

    def __init__(self, message: str, *, column: str = "") -> None:
        super().__init__(message)
        self.column = column


def _tables(schema: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    tables = (schema or {}).get("tables") or {}
    return {name: table for name, table in tables.items() if not name.startswith(_IGNORED_PREFIXES)}


def _columns(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return table.get("columns") or {}


def _ordered_names(table: dict[str, Any]) -> list[str]:
    """Column names in the table's column_order, then any it forgot, sorted."""
    columns = _columns(table)
    order = [name for name in table.get("column_order") or [] if name in columns]
    return order + sorted(set(columns) - set(order))


def _full(column: dict[str, Any]) -> dict[str, Any]:
    return {key: column.get(key, _COLUMN_DEFAULTS.get(key)) for key in COLUMN_ATTRIBUTES}


def _check_expressible(table: str, name: str, column: dict[str, Any], why: str) -> None:
    """Raise DiffError when the engine cannot write this column definition back."""
    qualified = f"{table}.{name}"
    kind = column.get("type")
    if kind not in VOCABULARY_TYPES:
        raise DiffError(
            f"Column {qualified} has type {kind!r}, which releasemgr cannot express, so it cannot {why}; "
            "change it by hand or give it one of the supported types.",
            column=qualified,
        )
    if kind == "string" and column.get("max_length") is None:
        raise DiffError(
            f"Column {qualified} is a string without a maximum length, which a bundle cannot express, so it "
            f"cannot {why}; use text or give it a max_length.",
            column=qualified,
        )
    if kind == "decimal" and column.get("precision") is None:
        raise DiffError(
            f"Column {qualified} is a decimal without a precision, which a bundle cannot express, so it cannot "
            f"{why}.",
            column=qualified,
        )
    if column.get("primary_key") and kind not in PRIMARY_KEY_TYPES:
        raise DiffError(
            f"Column {qualified} is a {kind} primary key; primary keys must be one of "
            f"{', '.join(PRIMARY_KEY_TYPES)}, so it cannot {why}.",
            column=qualified,
        )
    default = column.get("default")
    if _is_raw_default(kind, default):
        shown = default.get("raw", default) if isinstance(default, dict) else default
        raise DiffError(
            f"Column {qualified} has a database default releasemgr cannot express ({shown!r}), so it cannot {why}.",
            column=qualified,
        )


def _is_raw_default(kind: Any, default: Any) -> bool:
    """A default introspection kept as SQL: `{"raw": sql}` (or any other object on a non-json column)."""
    if not isinstance(default, dict):
        return False
    if set(default) == {"raw"}:
        return True
    if set(default) == {"function"} and default["function"] in ("now", "uuid"):
        return False
    return kind != "json"


def _normalized_column(table: str, name: str, column: dict[str, Any], why: str) -> dict[str, Any]:
    _check_expressible(table, name, column, why)
    return {"name": name, **_full(column)}


def _create_table(name: str, table: dict[str, Any]) -> dict[str, Any]:
    columns = _columns(table)
    keys = [column for column in _ordered_names(table) if columns[column].get("primary_key")]
    if len(keys) != 1:
        detail = "no primary key" if not keys else f"a composite primary key ({', '.join(keys)})"
        raise DiffError(
            f"Table {name} has {detail}; create_table would not reproduce it exactly.",
            column=f"{name}.{keys[0] if keys else ''}".rstrip("."),
        )
    return {
        "type": "create_table",
        "table": name,
        "columns": [
            _normalized_column(name, column, columns[column], "be created")
            for column in _ordered_names(table)
        ],
    }


def _table_changes(name: str, source: dict[str, Any], target: dict[str, Any]) -> list[dict[str, Any]]:
    source_columns, target_columns = _columns(source), _columns(target)
    adds: list[dict[str, Any]] = []
    modifies: list[dict[str, Any]] = []
    drops: list[dict[str, Any]] = []
    for column in _ordered_names(source):
        if column in target_columns:
            continue
        definition = source_columns[column]
        if definition.get("primary_key"):
            raise DiffError(
                f"Column {name}.{column} is a primary key only in the source; changing a table's primary key "
                "is not supported.",
                column=f"{name}.{column}",
            )
        adds.append(
            {
                "type": "add_column",
                "table": name,
                "column": _normalized_column(name, column, definition, "be added"),
            }
        )
    for column in sorted(set(source_columns) & set(target_columns)):
        wanted, current = _full(source_columns[column]), _full(target_columns[column])
        differing = [key for key in COLUMN_ATTRIBUTES if wanted[key] != current[key]]
        if not differing:
            continue
        if "primary_key" in differing:
            raise DiffError(
                f"Column {name}.{column} differs in primary_key; modify_column cannot change a primary key.",
                column=f"{name}.{column}",
            )
        # Both definitions must be expressible: the new one is applied, the old one is what rollback restores.
        _check_expressible(name, column, wanted, "be modified")
        _check_expressible(name, column, current, "be modified (rollback restores it)")
        modifies.append(
            {
                "type": "modify_column",
                "table": name,
                "column": {"name": column, **{key: wanted[key] for key in differing}},
            }
        )
    for column in sorted(set(target_columns) - set(source_columns)):
        definition = target_columns[column]
        if definition.get("primary_key"):
            raise DiffError(
                f"Column {name}.{column} is a primary key only in the target; changing a table's primary key "
                "is not supported.",
                column=f"{name}.{column}",
            )
        _check_expressible(name, column, definition, "be dropped (rollback restores it)")
        drops.append({"type": "drop_column", "table": name, "column": column})
    return adds + modifies + drops


def diff_schemas(source: dict[str, Any], target: dict[str, Any]) -> list[dict[str, Any]]:
    """The normalized changes that turn `target` into `source`, in a deterministic order.

    Order: create_table (sorted by table), then per common table (sorted) add_column (in the
    source's column order), modify_column (listing only differing attributes), drop_column; then
    drop_table (sorted). Raises DiffError naming the column when a difference cannot be expressed.
    Column order alone is not a difference (fingerprints ignore it).
    """
    source_tables, target_tables = _tables(source), _tables(target)
    changes: list[dict[str, Any]] = []
    for name in sorted(set(source_tables) - set(target_tables)):
        changes.append(_create_table(name, source_tables[name]))
    for name in sorted(set(source_tables) & set(target_tables)):
        changes.extend(_table_changes(name, source_tables[name], target_tables[name]))
    for name in sorted(set(target_tables) - set(source_tables)):
        changes.append({"type": "drop_table", "table": name})
    return changes


def schema_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """What differs between schemas `a` and `b`, for humans (the prod gate's 409 details).

    `only_in_a` / `only_in_b`: sorted table names, and `table.column` for columns of tables both
    have. `different`: `{"table.column": {attribute: [value in a, value in b]}}`.
    """
    tables_a, tables_b = _tables(a), _tables(b)
    only_in_a = sorted(set(tables_a) - set(tables_b))
    only_in_b = sorted(set(tables_b) - set(tables_a))
    different: dict[str, dict[str, list[Any]]] = {}
    for table in sorted(set(tables_a) & set(tables_b)):
        columns_a, columns_b = _columns(tables_a[table]), _columns(tables_b[table])
        only_in_a.extend(f"{table}.{c}" for c in sorted(set(columns_a) - set(columns_b)))
        only_in_b.extend(f"{table}.{c}" for c in sorted(set(columns_b) - set(columns_a)))
        for column in sorted(set(columns_a) & set(columns_b)):
            left, right = columns_a[column], columns_b[column]
            keys = [k for k in COLUMN_ATTRIBUTES if k in left or k in right]
            keys += sorted((set(left) | set(right)) - set(COLUMN_ATTRIBUTES))
            changed = {k: [left.get(k), right.get(k)] for k in keys if left.get(k) != right.get(k)}
            if changed:
                different[f"{table}.{column}"] = changed
    return {"only_in_a": sorted(only_in_a), "only_in_b": sorted(only_in_b), "different": different}
