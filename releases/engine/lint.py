"""Safety lint for normalized changes (rule ids follow Squawk, advice follows strong_migrations).

`lint(changes, schema)` is pure: it walks the changes in order over a copy of the target's portable
schema, so a column added or a table created earlier in the same bundle is judged as what it will be
when that change runs. A table created in the bundle is empty when later changes touch it (apply is
one transaction), so rules about rewriting or scanning existing rows do not fire for it. A table the
schema does not know and the bundle did not create is treated as an existing table with rows: the
lint fails towards more findings, never fewer.

The rules judge PostgreSQL behaviour (the primary dialect); on SQLite almost every alteration
rebuilds the table anyway. Decisions worth knowing:

- `changing-column-type` follows PostgreSQL's rewrite rules: varchar(n) -> varchar(m >= n), varchar ->
  text, text -> unbounded varchar and numeric(p, s) -> numeric(q >= p, s) (or unbounded numeric) are
  catalog-only; every other type change rewrites the table (int -> bigint included) or narrows it.
- `adding-field-with-default` fires for both function defaults, as SPEC 13 requires. `uuid`
  (gen_random_uuid) is volatile and rewrites the table. `now` is only *stable* in PostgreSQL, so PG 11+
  stores one value without a rewrite, but every existing row then gets the migration's timestamp as
  if it were real data, and SQLite rebuilds the table: still worth an explicit override.
- `prefer-text-field` is a warning on new string columns with a max_length (Squawk's rule): changing
  the limit later needs an ACCESS EXCLUSIVE lock, narrowing it rewrites the table.
- `prefer-bigint-over-int` is a warning for integer/smallint primary keys only.
- `ban-drop-not-null` is a warning: instant, but running code may rely on NOT NULL, and a rollback
  cannot restore NOT NULL once NULLs were written.
- `safe_alternative` is advice: releasemgr applies a release in one transaction, so CONCURRENTLY and
  multi-step NOT VALID / VALIDATE sequences have to be separate releases (or run out of band).
"""

from __future__ import annotations

import copy
from typing import Any, TypeGuard, cast

Finding = dict[str, Any]

LINT_RULES: dict[str, str] = {
    "adding-field-with-default": "error",
    "adding-not-nullable-field": "error",
    "adding-required-field": "error",
    "ban-drop-column": "warning",
    "ban-drop-not-null": "warning",
    "ban-drop-table": "warning",
    "changing-column-type": "error",
    "disallowed-unique-constraint": "error",
    "prefer-bigint-over-int": "warning",
    "prefer-text-field": "warning",
    "renaming-column": "error",
    "renaming-table": "error",
}

ONE_TRANSACTION_NOTE = (
    " releasemgr applies a release in one transaction, so CONCURRENTLY and NOT VALID/VALIDATE steps must be "
    "separate releases or run out of band."
)

SAFE_ALTERNATIVES: dict[str, str] = {
    "adding-field-with-default": (
        "Add the column nullable without a default, set the default in a second change (new rows only), "
        "backfill existing rows in small batches, then add NOT NULL if needed."
    ),
    "adding-not-nullable-field": (
        "Backfill NULLs in batches first. On PostgreSQL 12+: ADD CONSTRAINT ... CHECK (col IS NOT NULL) "
        "NOT VALID, then VALIDATE CONSTRAINT (no exclusive lock), then SET NOT NULL (uses the validated "
        "check, no scan), then drop the check." + ONE_TRANSACTION_NOTE
    ),
    "adding-required-field": (
        "Add the column nullable (or with a constant default, which PostgreSQL 11+ stores without a "
        "rewrite), backfill existing rows in batches, then make it NOT NULL in a later release."
    ),
    "ban-drop-column": (
        "Expand/contract: first deploy code that no longer reads or writes the column, then drop it. "
        "releasemgr preserves the values so a rollback restores them."
    ),
    "ban-drop-not-null": (
        "Make sure every reader tolerates NULL first; after NULLs are written, a rollback cannot restore "
        "NOT NULL until they are backfilled."
    ),
    "ban-drop-table": (
        "Expand/contract: first deploy code that no longer uses the table, then drop it. releasemgr "
        "preserves the rows so a rollback restores them."
    ),
    "changing-column-type": (
        "Expand/contract: add a new column of the new type, write to both, backfill in batches, switch "
        "reads, then drop the old column. Widening varchar or numeric precision is catalog-only."
    ),
    "disallowed-unique-constraint": (
        "CREATE UNIQUE INDEX CONCURRENTLY, then ALTER TABLE ... ADD CONSTRAINT ... UNIQUE USING INDEX; "
        "or add the column without unique and enforce it once the index exists." + ONE_TRANSACTION_NOTE
    ),
    "prefer-bigint-over-int": (
        "Use bigint for primary keys (or omit the key: releasemgr adds an id bigint identity); a 32-bit key "
        "runs out at 2,147,483,647 and widening it later rewrites the table."
    ),
    "prefer-text-field": (
        "Use text and validate the length in the application (or a CHECK constraint added NOT VALID then "
        "validated): changing a varchar limit later takes an ACCESS EXCLUSIVE lock."
    ),
    "renaming-column": (
        "Expand/contract: add the new column, write to both, backfill, switch reads, then drop the old one "
        "in a later release."
    ),
    "renaming-table": (
        "Expand/contract: create the new table (or a view with the new name), migrate readers and writers, "
        "then drop the old table in a later release."
    ),
}

_NUMERIC_WIDTH = {"smallint": 2, "integer": 4, "bigint": 8}


def _name(mapping: dict[str, Any], key: str) -> str:
    """The table or column name under `key`: normalized changes and columns always carry it."""
    return cast(str, mapping.get(key))


def _finding(rule: str, index: int, message: str) -> Finding:
    return {
        "rule": rule,
        "severity": LINT_RULES[rule],
        "change": index,
        "message": message,
        "safe_alternative": SAFE_ALTERNATIVES[rule],
    }


def _describe_type(column: dict[str, Any]) -> str:
    kind = column.get("type")
    if kind == "string" and column.get("max_length") is not None:
        return f"string({column['max_length']})"
    if kind == "decimal" and column.get("precision") is not None:
        return f"decimal({column['precision']},{column.get('scale') or 0})"
    return str(kind)


def _string_length_risk(old_length: int | None, new_length: int | None) -> str | None:
    """varchar(n) -> varchar(m): only a shorter limit (or a first one) rewrites and checks the rows."""
    if old_length == new_length or new_length is None:
        return None
    if old_length is None or new_length < old_length:
        return "narrows the maximum length (PostgreSQL rewrites and checks every row)"
    return None


def _decimal_risk(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """numeric(p, s) -> numeric(q, t): only a wider precision at the same scale (or none) is free."""
    old_precision, new_precision = old.get("precision"), new.get("precision")
    old_scale, new_scale = old.get("scale"), new.get("scale")
    if (old_precision, old_scale) == (new_precision, new_scale) or new_precision is None:
        return None
    if old_precision is None:
        return "limits an unbounded numeric (PostgreSQL rewrites and may reject values)"
    if (new_scale or 0) < (old_scale or 0):
        return "reduces the scale (values are rounded, PostgreSQL rewrites the table)"
    if new_precision - (new_scale or 0) < old_precision - (old_scale or 0):
        return "reduces the integer digits (values may no longer fit)"
    if (new_scale or 0) != (old_scale or 0):
        return "changes the scale (PostgreSQL rewrites the table)"
    return None


def type_change_risk(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """Why changing `old`'s type to `new`'s is unsafe on PostgreSQL (rewrite or narrowing), or None.

    None also when nothing about the type changes. Follows ATColumnChangeRequiresRewrite: only
    binary-coercible changes without a length/precision check avoid the rewrite.
    """
    old_type, new_type = old.get("type"), new.get("type")
    new_length = new.get("max_length")
    if old_type == new_type:
        if old_type == "string":
            return _string_length_risk(old.get("max_length"), new_length)
        if old_type == "decimal":
            return _decimal_risk(old, new)
        return None
    if old_type == "string" and new_type == "text":
        return None
    if old_type == "text" and new_type == "string":
        if new_length is None:
            return None
        return "narrows text to a maximum length (PostgreSQL rewrites and checks every row)"
    if old_type in _NUMERIC_WIDTH and new_type in _NUMERIC_WIDTH:
        if _NUMERIC_WIDTH[new_type] < _NUMERIC_WIDTH[old_type]:
            return (
                f"narrows {old_type} to {new_type} (values may no longer fit; PostgreSQL rewrites the table)"
            )
        return f"widens {old_type} to {new_type}, which PostgreSQL does by rewriting the whole table"
    return (
        f"converts {_describe_type(old)} to {_describe_type(new)}: PostgreSQL rewrites the whole table under "
        "an ACCESS EXCLUSIVE lock and values may fail to convert"
    )


class _State:
    """The schema as it will be when each change runs, and which tables the bundle created."""

    def __init__(self, schema: dict[str, Any] | None) -> None:
        tables = (schema or {}).get("tables") or {}
        self.tables: dict[str, dict[str, dict[str, Any]]] = {
            name: copy.deepcopy((table or {}).get("columns") or {}) for name, table in tables.items()
        }
        self.created: set[str] = set()

    def is_existing(self, table: str) -> bool:
        return table not in self.created

    def column(self, table: str, name: str) -> dict[str, Any] | None:
        return self.tables.get(table, {}).get(name)

    def apply(self, change: dict[str, Any]) -> None:
        kind = change.get("type")
        table = _name(change, "table")
        if kind == "create_table":
            columns = {c["name"]: dict(c) for c in change.get("columns") or [] if isinstance(c, dict)}
            self.tables[table] = columns
            self.created.add(table)
        elif kind == "drop_table":
            self.tables.pop(table, None)
            self.created.discard(table)
        elif kind == "add_column":
            column = change.get("column") or {}
            self.tables.setdefault(table, {})[_name(column, "name")] = dict(column)
        elif kind == "drop_column":
            self.tables.get(table, {}).pop(_name(change, "column"), None)
        elif kind == "modify_column":
            given = change.get("column") or {}
            current = self.tables.setdefault(table, {}).setdefault(_name(given, "name"), {})
            current.update({k: v for k, v in given.items() if k != "name"})
        elif kind == "rename_column":
            columns = self.tables.get(table, {})
            if change.get("from") in columns:
                columns[_name(change, "to")] = columns.pop(_name(change, "from"))
        elif kind == "rename_table":
            source, target = _name(change, "from"), _name(change, "to")
            if source in self.tables:
                self.tables[target] = self.tables.pop(source)
            if source in self.created:
                self.created.discard(source)
                self.created.add(target)


def _is_function_default(default: Any) -> TypeGuard[dict[str, Any]]:
    return isinstance(default, dict) and "function" in default


def _volatile_default_message(table: str, name: str, default: dict[str, Any]) -> str:
    function = default.get("function")
    if function == "uuid":
        return (
            f"Adding {table}.{name} with a uuid default to an existing table: the generator is volatile, so "
            "PostgreSQL rewrites every row under an ACCESS EXCLUSIVE lock."
        )
    return (
        f"Adding {table}.{name} with a {function} default to an existing table: PostgreSQL evaluates it "
        "once (no rewrite on 11+), so every existing row gets the migration's timestamp as if it were real "
        "data; SQLite rebuilds the table."
    )


def _lint_new_columns(
    index: int, table: str, columns: list[dict[str, Any]], *, existing: bool
) -> list[Finding]:
    findings: list[Finding] = []
    for column in columns:
        name = column.get("name")
        if column.get("primary_key") and column.get("type") in ("integer", "smallint"):
            findings.append(
                _finding(
                    "prefer-bigint-over-int",
                    index,
                    f"Primary key {table}.{name} is {column.get('type')}: it can run out of values.",
                )
            )
    long_strings = [_name(c, "name") for c in columns if c.get("type") == "string" and c.get("max_length")]
    if long_strings:
        findings.append(
            _finding(
                "prefer-text-field",
                index,
                f"{table}: varchar column(s) {', '.join(long_strings)}; changing the limit later locks "
                "the table.",
            )
        )
    if not existing:
        return findings
    for column in columns:
        name = _name(column, "name")
        default = column.get("default")
        if column.get("nullable") is False and default is None:
            findings.append(
                _finding(
                    "adding-required-field",
                    index,
                    f"Adding NOT NULL column {table}.{name} without a default to an existing table fails "
                    "when the table has rows.",
                )
            )
        if column.get("unique") or column.get("primary_key"):
            findings.append(
                _finding(
                    "disallowed-unique-constraint",
                    index,
                    f"Adding a unique {table}.{name} builds its index under an ACCESS EXCLUSIVE lock that "
                    "blocks reads and writes for the whole scan.",
                )
            )
        if _is_function_default(default):
            findings.append(
                _finding("adding-field-with-default", index, _volatile_default_message(table, name, default))
            )
    return findings


def _lint_modify(index: int, change: dict[str, Any], state: _State) -> list[Finding]:
    table = _name(change, "table")
    given = change.get("column") or {}
    name = _name(given, "name")
    current = state.column(table, name)
    new = {**(current or {}), **given}
    findings: list[Finding] = []
    type_keys = ("type", "max_length", "precision", "scale")
    type_changed = any(key in given and given[key] != (current or {}).get(key) for key in type_keys)
    if type_changed and new.get("primary_key") and new.get("type") in ("integer", "smallint"):
        findings.append(
            _finding(
                "prefer-bigint-over-int",
                index,
                f"Primary key {table}.{name} becomes {new.get('type')}: it can run out of values.",
            )
        )
    if not state.is_existing(table):
        return findings
    if type_changed:
        risk: str | None
        if current is None:
            risk = "changes the type of a column whose current type is unknown"
        else:
            risk = type_change_risk(current, new)
        if risk:
            findings.append(_finding("changing-column-type", index, f"Changing {table}.{name} {risk}."))
    was_nullable = True if current is None else current.get("nullable", True) is not False
    if given.get("nullable") is False and was_nullable:
        findings.append(
            _finding(
                "adding-not-nullable-field",
                index,
                f"SET NOT NULL on {table}.{name} scans the whole table under an ACCESS EXCLUSIVE lock and "
                "fails if any row is NULL.",
            )
        )
    dropping_not_null = (
        given.get("nullable") is True and current is not None and current.get("nullable") is False
    )
    if dropping_not_null and current is not None and not current.get("primary_key"):
        findings.append(
            _finding(
                "ban-drop-not-null",
                index,
                f"Dropping NOT NULL on {table}.{name} can break code that expects a value.",
            )
        )
    was_unique = bool(current and (current.get("unique") or current.get("primary_key")))
    if given.get("unique") is True and not was_unique:
        findings.append(
            _finding(
                "disallowed-unique-constraint",
                index,
                f"Making {table}.{name} unique builds its index under an ACCESS EXCLUSIVE lock that blocks "
                "reads and writes for the whole scan, and fails on duplicates.",
            )
        )
    return findings


def lint(changes: list[dict[str, Any]], schema: dict[str, Any] | None) -> list[Finding]:
    """Findings for `changes` applied in order to a target whose portable schema is `schema`.

    Ordered by change index, then rule id. Pure: reads no database.
    """
    state = _State(schema)
    findings: list[Finding] = []
    for index, change in enumerate(changes):
        kind = change.get("type")
        table = _name(change, "table")
        found: list[Finding] = []
        if kind == "create_table":
            columns = [c for c in change.get("columns") or [] if isinstance(c, dict)]
            found = _lint_new_columns(index, table, columns, existing=False)
        elif kind == "add_column":
            column = change.get("column") or {}
            found = _lint_new_columns(index, table, [column], existing=state.is_existing(table))
        elif kind == "modify_column":
            found = _lint_modify(index, change, state)
        elif kind == "drop_column":
            found = [
                _finding(
                    "ban-drop-column",
                    index,
                    f"Dropping {table}.{change.get('column')} breaks code that still reads it.",
                )
            ]
        elif kind == "drop_table":
            found = [
                _finding("ban-drop-table", index, f"Dropping table {table} breaks code that still uses it.")
            ]
        elif kind == "rename_column":
            found = [
                _finding(
                    "renaming-column",
                    index,
                    f"Renaming {table}.{change.get('from')} to {change.get('to')} breaks running code "
                    "that uses the old name.",
                )
            ]
        elif kind == "rename_table":
            found = [
                _finding(
                    "renaming-table",
                    index,
                    f"Renaming table {change.get('from')} to {change.get('to')} breaks running code that "
                    "uses the old name.",
                )
            ]
        findings.extend(sorted(found, key=lambda f: f["rule"]))
        state.apply(change)
    return findings
