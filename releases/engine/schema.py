"""Introspection of a target into the portable schema, fingerprints, and Django models built from it.

Portable schema (docs/ENGINE.md):
`{"tables": {t: {"columns": {c: column}, "column_order": [...]}}, "native": {t: {...}}}` where the
top-level `native` part (auto primary keys, plain indexes, objects a table rebuild would lose) is for
the planner only and, like `column_order`, is not part of the fingerprint.
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import hashlib
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from django.apps.registry import Apps
from django.db import models
from django.db.backends.utils import CursorWrapper
from django.db.models.expressions import RawSQL
from django.db.models.functions import Now

from .bundle import canonical_json, format_decimal, sha256_hex
from .target import Target

PORTABLE_KEYS = ("type", "nullable", "default", "primary_key", "unique", "max_length", "precision", "scale")


def is_internal_table(name: str) -> bool:
    return name.startswith("_rm_") or name.startswith("sqlite_")


# --------------------------------------------------------------------------------------------------
# Default parsing
# --------------------------------------------------------------------------------------------------

_PG_CAST_LITERAL = re.compile(r"^'((?:[^']|'')*)'::[a-z_ ]+(?:\([0-9, ]+\))?(?:\[\])?$", re.S)
_QUOTED = re.compile(r"^'((?:[^']|'')*)'$", re.S)
_NUMBER = re.compile(r"^\(?\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\)?$")
_PG_NOW = {
    "now()",
    "statement_timestamp()",
    "current_timestamp",
    "transaction_timestamp()",
    "clock_timestamp()",
}
_SQLITE_NOW = re.compile(
    r"^\(?\s*(current_timestamp|strftime\('%y-%m-%d %h:%m:%f',\s*'now'\)|datetime\('now'\))\s*\)?$"
)
_SQLITE_UUID = re.compile(r"^\(?\s*lower\(hex\(randomblob\(16\)\)\)\s*\)?$")
SQLITE_UUID_SQL = "lower(hex(randomblob(16)))"
PG_UUID_SQL = "gen_random_uuid()"


_SQLITE_CAST = re.compile(r"^CAST\s*\(\s*'((?:[^']|'')*)'\s+AS\s+[A-Z]+\s*\)$", re.I)


def strip_parentheses(text: str) -> str:
    """`((x))` -> `x` when the outer parentheses enclose the whole expression."""
    while text.startswith("(") and text.endswith(")"):
        depth = 0
        for position, char in enumerate(text):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0 and position < len(text) - 1:
                return text
        text = text[1:-1].strip()
    return text


def _literal_text(vendor: str, text: str) -> tuple[str | None, bool]:
    """(the literal's text, whether it was quoted) or (None, False) when it is no plain literal."""
    text = text.strip()
    match = (_PG_CAST_LITERAL if vendor == "postgresql" else _QUOTED).match(text)
    if match:
        return match.group(1).replace("''", "'"), True
    if vendor == "postgresql":
        match = _QUOTED.match(text)
        if match:
            return match.group(1).replace("''", "'"), True
    match = _NUMBER.match(text)
    if match:
        return match.group(1), False
    if text.lower() in ("true", "false"):
        return text.lower(), False
    return None, False


def parse_default(vendor: str, column_type: str, text: str | None, column: dict) -> Any:
    """A column default as the dialect shows it -> the portable (JSON) default."""
    if text is None:
        return None
    raw = strip_parentheses(text.strip())
    match = _SQLITE_CAST.match(raw)
    if vendor == "sqlite" and match:
        raw = "'" + match.group(1) + "'"
    lowered = raw.lower()
    if lowered == "null":
        return None
    if vendor == "postgresql":
        if lowered in _PG_NOW and column_type == "datetime":
            return {"function": "now"}
        if lowered == PG_UUID_SQL and column_type == "uuid":
            return {"function": "uuid"}
    else:
        if column_type == "datetime" and _SQLITE_NOW.match(lowered):
            return {"function": "now"}
        if column_type == "uuid" and _SQLITE_UUID.match(lowered):
            return {"function": "uuid"}
        if column_type == "binary":
            match = re.match(r"^[xX]'([0-9a-fA-F]*)'$", raw)
            if match:
                return base64.b64encode(bytes.fromhex(match.group(1))).decode("ascii")
    literal, quoted = _literal_text(vendor, raw)
    if literal is None:
        return {"raw": raw}
    try:
        return _convert_literal(vendor, column_type, literal, quoted, column)
    except (ValueError, TypeError, OverflowError, decimal.InvalidOperation, json.JSONDecodeError):
        return {"raw": raw}


def _boolean_literal(literal: str) -> bool:
    if literal in ("true", "1", "t"):
        return True
    if literal in ("false", "0", "f"):
        return False
    raise ValueError("not a boolean")


def _datetime_literal(literal: str) -> str:
    parsed = dt.datetime.fromisoformat(literal)
    if parsed.tzinfo is None:  # SQLite stores naive UTC (USE_TZ)
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.astimezone(dt.UTC).isoformat()


def _binary_literal(vendor: str, literal: str) -> str:
    if vendor == "postgresql" and literal.startswith("\\x"):
        return base64.b64encode(bytes.fromhex(literal[2:])).decode("ascii")
    raise ValueError("not a bytea literal")


# The portable default of an unquoted-or-quoted literal, by column type (the types whose conversion
# needs only the literal; strings, decimals and binary are handled in _convert_literal).
_LITERAL_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "integer": int,
    "bigint": int,
    "smallint": int,
    "boolean": _boolean_literal,
    "date": lambda literal: dt.date.fromisoformat(literal).isoformat(),
    "datetime": _datetime_literal,
    "time": lambda literal: dt.time.fromisoformat(literal).isoformat(),
    "float": lambda literal: repr(float(literal)),
    "uuid": lambda literal: str(uuid.UUID(literal)),
    "json": lambda literal: json.loads(canonical_json(json.loads(literal))),
}


def _convert_literal(vendor: str, column_type: str, literal: str, quoted: bool, column: dict) -> Any:
    if column_type in ("string", "text"):
        if not quoted:
            raise ValueError("unquoted")
        return literal
    if column_type == "decimal":
        return format_decimal(decimal.Decimal(literal), column.get("precision"), column.get("scale"))
    if column_type == "binary":
        return _binary_literal(vendor, literal)
    convert = _LITERAL_CONVERTERS.get(column_type)
    if convert is None:
        raise ValueError("native type")
    return convert(literal)


# --------------------------------------------------------------------------------------------------
# Type mapping
# --------------------------------------------------------------------------------------------------


def _pg_type(format_type: str) -> dict[str, Any]:
    text = format_type.strip().lower()
    simple = {
        "text": "text",
        "integer": "integer",
        "bigint": "bigint",
        "smallint": "smallint",
        "boolean": "boolean",
        "date": "date",
        "timestamp with time zone": "datetime",
        "time without time zone": "time",
        "double precision": "float",
        "uuid": "uuid",
        "jsonb": "json",
        "bytea": "binary",
    }
    if text in simple:
        return {"type": simple[text]}
    match = re.fullmatch(r"character varying\((\d+)\)", text)
    if match:
        return {"type": "string", "max_length": int(match.group(1))}
    match = re.fullmatch(r"numeric\((\d+),\s*(\d+)\)", text)
    if match:
        return {"type": "decimal", "precision": int(match.group(1)), "scale": int(match.group(2))}
    return {"type": f"native:postgresql:{text}"}


def _sqlite_type(declared: str, *, json_checked: bool, autoincrement: bool) -> dict[str, Any]:
    text = re.sub(r"\s+", " ", declared.strip().lower())
    if text == "integer" and autoincrement:
        return {"type": "bigint"}
    if text == "text" and json_checked:
        return {"type": "json"}
    simple = {
        "text": "text",
        "integer": "integer",
        "bigint": "bigint",
        "smallint": "smallint",
        "bool": "boolean",
        "boolean": "boolean",
        "date": "date",
        "datetime": "datetime",
        "time": "time",
        "real": "float",
        "char(32)": "uuid",
        "blob": "binary",
    }
    if text in simple:
        return {"type": simple[text]}
    match = re.fullmatch(r"varchar ?\((\d+)\)", text)
    if match:
        return {"type": "string", "max_length": int(match.group(1))}
    match = re.fullmatch(r"decimal ?\((\d+), ?(\d+)\)", text)
    if match:
        return {"type": "decimal", "precision": int(match.group(1)), "scale": int(match.group(2))}
    return {"type": f"native:sqlite:{text}"}


def _portable_column(**values: Any) -> dict[str, Any]:
    column: dict[str, Any] = {key: None for key in PORTABLE_KEYS}
    column.update(nullable=True, unique=False, primary_key=False)
    column.update(values)
    if column["primary_key"]:
        column["nullable"] = False
        column["unique"] = False
    return column


# --------------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------------

_PG_COLUMNS = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attcollation <> t.typcollation
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
WHERE n.nspname = current_schema(){only} AND c.relkind IN ('r', 'p')
ORDER BY c.relname, a.attnum
"""
_PG_CONSTRAINTS = """
SELECT c.relname, con.conname, con.contype,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(num, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num ORDER BY k.ord)
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema(){only} AND c.relkind IN ('r', 'p')
ORDER BY c.relname, con.conname
"""
_PG_INDEXES = """
SELECT c.relname, i.relname, ix.indisunique, ix.indisprimary, ix.indexprs IS NOT NULL OR ix.indpred IS NOT NULL,
       ARRAY(SELECT a.attname FROM unnest(ix.indkey) WITH ORDINALITY k(num, ord)
             JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = k.num ORDER BY k.ord),
       EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = ix.indexrelid),
       pg_get_indexdef(ix.indexrelid)
FROM pg_index ix
JOIN pg_class c ON c.oid = ix.indrelid
JOIN pg_class i ON i.oid = ix.indexrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema(){only} AND c.relkind IN ('r', 'p')
ORDER BY c.relname, i.relname
"""
_PG_TRIGGERS = """
SELECT c.relname, t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema(){only} AND NOT t.tgisinternal
"""
_PG_REFERENCED = """
SELECT DISTINCT c.relname FROM pg_constraint con JOIN pg_class c ON c.oid = con.confrelid
JOIN pg_namespace n ON n.oid = c.relnamespace WHERE con.contype = 'f' AND n.nspname = current_schema(){only}
"""


def _new_native(vendor: str) -> dict[str, Any]:
    return {
        "vendor": vendor,
        "auto_pk": None,
        "indexes": [],
        "blockers": [],
        "has_primary_key": False,
        # column -> objects a DROP COLUMN would take with it that a rollback cannot put back
        "column_objects": {},
    }


def _mention(native: dict, columns: list[str], description: str) -> None:
    for column in columns:
        objects = native["column_objects"].setdefault(column, [])
        if description not in objects:
            objects.append(description)


def _mentioned_columns(text: str, names: list[str]) -> list[str]:
    return [name for name in names if re.search(rf"(?<![a-z0-9_]){re.escape(name)}(?![a-z0-9_])", text, re.I)]


def _pg_read_constraints(
    result: dict[str, Any], constraint_rows: list[tuple], wanted: Callable[[str], bool]
) -> tuple[dict[str, list[str]], dict[str, set[str]]]:
    """Primary keys and single-column unique constraints by table; every other constraint is a
    blocker, mentioned for the columns it covers."""
    primary: dict[str, list[str]] = {}
    unique_columns: dict[str, set[str]] = {}
    for table, name, contype, columns in constraint_rows:
        if not wanted(table):
            continue
        native = result["native"].setdefault(table, _new_native("postgresql"))
        if contype == "p":
            primary[table] = list(columns)
        elif contype == "u" and len(columns) == 1:
            unique_columns.setdefault(table, set()).add(columns[0])
        elif contype == "u":
            native["blockers"].append(f"multi-column unique constraint {name}")
            _mention(native, list(columns), f"unique constraint {name}")
        elif contype == "c":
            native["blockers"].append(f"check constraint {name}")
            _mention(native, list(columns), f"check constraint {name}")
        elif contype == "f":
            native["blockers"].append(f"foreign key {name}")
            _mention(native, list(columns), f"foreign key {name}")
        else:
            native["blockers"].append(f"constraint {name} ({contype})")
            _mention(native, list(columns), f"constraint {name}")
    return primary, unique_columns


def _pg_read_indexes(
    result: dict[str, Any],
    index_rows: list[tuple],
    wanted: Callable[[str], bool],
    unique_columns: dict[str, set[str]],
) -> list[tuple[str, str, list[str], str]]:
    """Indexes that back no constraint: a single-column unique one makes its column unique; each is a
    blocker (Django's `_like` pattern_ops indexes excepted). Returns (table, index, columns,
    definition) for the column mentions, made once the column names are known."""
    pending_mentions: list[tuple[str, str, list[str], str]] = []
    for (
        table,
        index_name,
        is_unique,
        _is_primary,
        is_partial,
        columns,
        backs_constraint,
        definition,
    ) in index_rows:
        if not wanted(table) or backs_constraint:
            continue
        native = result["native"].setdefault(table, _new_native("postgresql"))
        if is_unique and not is_partial and len(columns) == 1:
            unique_columns.setdefault(table, set()).add(columns[0])
            native["blockers"].append(f"unique index {index_name}")
        elif index_name.endswith("_like") and "pattern_ops" in definition and len(columns) == 1:
            continue  # Django's LIKE index of a unique/indexed varchar column: recreated with it
        else:
            native["blockers"].append(f"index {index_name}")
        pending_mentions.append((table, index_name, list(columns), definition.split(" USING ", 1)[-1]))
    return pending_mentions


def _pg_portable_column(
    native: dict[str, Any],
    name: str,
    format_type: str,
    *,
    nullable: bool,
    primary_key: bool,
    unique: bool,
    default_sql: str | None,
    auto: bool,
    generated: Any,
    collated: Any,
) -> dict[str, Any]:
    """One catalog column as a portable column; what the portable form cannot carry goes to the
    table's `native` (its identity/serial key, or a blocker)."""
    column = _portable_column(
        **_pg_type(format_type), nullable=nullable, primary_key=primary_key, unique=unique
    )
    if auto and primary_key:
        native["auto_pk"] = name
    elif auto:
        native["blockers"].append(f"identity/serial column {name}")
    if generated:
        native["blockers"].append(f"generated column {name}")
    if collated:
        native["blockers"].append(f"collation on column {name}")
    if not auto and not generated:
        column["default"] = parse_default("postgresql", column["type"], default_sql, column)
    if str(column["type"]).startswith("native:"):
        native["blockers"].append(f"column {name} of type {format_type}")
    if isinstance(column["default"], dict) and "raw" in column["default"]:
        native["blockers"].append(f"default of {name} is not a literal")
    return column


def _pg_mention_index_columns(
    result: dict[str, Any], pending_mentions: list[tuple[str, str, list[str], str]]
) -> None:
    """Each index is mentioned for its own columns and those its definition names (expressions)."""
    for table, index_name, columns, definition in pending_mentions:
        if table in result["tables"]:
            names = result["tables"][table]["column_order"]
            touched = sorted(set(columns) | set(_mentioned_columns(definition, names)))
            _mention(result["native"][table], touched, f"index {index_name}")


def _introspect_postgresql(target: Target, tables: set[str] | None) -> dict:
    result: dict[str, Any] = {"tables": {}, "native": {}}
    # Only the tables asked for are read (filtered in SQL: reading a whole large catalog per change
    # made planning super-linear in the number of tables).
    only, params = ("", None) if tables is None else (" AND c.relname = ANY(%s)", [sorted(tables)])

    def rows(query: str) -> list[tuple]:
        cursor.execute(query.format(only=only), params)
        return cursor.fetchall()

    with target.connection.cursor() as cursor:
        column_rows = rows(_PG_COLUMNS)
        constraint_rows = rows(_PG_CONSTRAINTS)
        index_rows = rows(_PG_INDEXES)
        trigger_rows = rows(_PG_TRIGGERS)
        referenced = {row[0] for row in rows(_PG_REFERENCED)}

    def wanted(table: str) -> bool:
        return not is_internal_table(table) and (tables is None or table in tables)

    primary, unique_columns = _pg_read_constraints(result, constraint_rows, wanted)
    pending_mentions = _pg_read_indexes(result, index_rows, wanted, unique_columns)
    for table, trigger in trigger_rows:
        if wanted(table):
            result["native"].setdefault(table, _new_native("postgresql"))["blockers"].append(
                f"trigger {trigger}"
            )
    for table in referenced:
        if wanted(table):
            result["native"].setdefault(table, _new_native("postgresql"))["blockers"].append(
                "referenced by a foreign key"
            )

    for table, name, format_type, not_null, default_sql, identity, generated, collated in column_rows:
        if not wanted(table):
            continue
        entry = result["tables"].setdefault(table, {"columns": {}, "column_order": []})
        native = result["native"].setdefault(table, _new_native("postgresql"))
        column = _pg_portable_column(
            native,
            name,
            format_type,
            nullable=not not_null,
            primary_key=primary.get(table) == [name],
            unique=name in unique_columns.get(table, set()),
            default_sql=default_sql,
            auto=bool(identity) or (default_sql is not None and default_sql.startswith("nextval(")),
            generated=generated,
            collated=collated,
        )
        entry["columns"][name] = column
        entry["column_order"].append(name)
    _pg_mention_index_columns(result, pending_mentions)
    for table, columns in primary.items():
        if table in result["native"]:
            result["native"][table]["has_primary_key"] = True
            if len(columns) > 1:
                result["native"][table]["blockers"].append("multi-column primary key")
    for table in list(result["native"]):
        if table not in result["tables"]:
            del result["native"][table]
    return result


_SQLITE_JSON_CHECK = 'JSON_VALID("{name}")'


def _sqlite_quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_table_body_checks(sql: str) -> list[str]:
    """CHECK clauses in a CREATE TABLE that are not Django's JSON_VALID checks."""
    found = []
    for match in re.finditer(r"\bCHECK\s*\(", sql, flags=re.I):
        depth, position = 1, match.end()
        while position < len(sql) and depth:
            depth += {"(": 1, ")": -1}.get(sql[position], 0)
            position += 1
        clause = sql[match.start() : position]
        if not re.fullmatch(
            r'CHECK\s*\(\(JSON_VALID\("[a-z0-9_]+"\) OR "[a-z0-9_]+" IS NULL\)\)', clause, re.I
        ):
            found.append(clause)
    return found


def _sqlite_read_indexes(
    cursor: CursorWrapper, native: dict[str, Any], quoted: str, info: list[tuple]
) -> set[str]:
    """The table's indexes: returns the columns a single-column unique one makes unique; plain ones
    go to `native["indexes"]` (recreated on a rebuild), every other one is a blocker."""
    cursor.execute(f"PRAGMA index_list({quoted})")
    index_rows = cursor.fetchall()
    unique_columns: set[str] = set()
    for _seq, index_name, is_unique, origin, is_partial in index_rows:
        cursor.execute(f"PRAGMA index_xinfo({_sqlite_quote(index_name)})")
        key_columns = [row for row in cursor.fetchall() if row[5]]  # key columns only
        names = [row[2] for row in key_columns if row[2] is not None]
        has_expression = any(row[1] == -2 for row in key_columns)
        if origin == "pk":
            continue
        if origin == "u" and is_unique and len(names) == 1 and not is_partial:
            unique_columns.add(names[0])
        elif origin == "c" and not is_unique and not is_partial and not has_expression:
            native["indexes"].append({"name": index_name, "columns": names})
            _mention(native, names, f"index {index_name}")
        else:
            native["blockers"].append(f"index {index_name}")
            cursor.execute("SELECT sql FROM sqlite_master WHERE name = %s", [index_name])
            index_sql = (cursor.fetchone() or [""])[0] or ""
            table_columns_now = [row[1] for row in info]
            _mention(
                native,
                sorted(set(names) | set(_mentioned_columns(index_sql, table_columns_now))),
                f"index {index_name}",
            )
    return unique_columns


def _sqlite_table_sql_blockers(native: dict[str, Any], sql: str, info: list[tuple]) -> None:
    """Blockers read from the CREATE TABLE statement: checks, foreign keys, collations, table options."""
    for check in _sqlite_table_body_checks(sql):
        native["blockers"].append(f"check constraint {check[:60]}")
        _mention(
            native,
            _mentioned_columns(check, [row[1] for row in info]),
            f"check constraint {check[:60]}",
        )
    if re.search(r"\b(FOREIGN\s+KEY|REFERENCES)\b", sql, re.I):
        native["blockers"].append("foreign key")
    if re.search(r"\bCOLLATE\b", sql, re.I):
        native["blockers"].append("collation")
    if re.search(r"\)\s*(WITHOUT\s+ROWID|STRICT)", sql, re.I):
        native["blockers"].append("WITHOUT ROWID/STRICT table")


def _introspect_sqlite(target: Target, tables: set[str] | None) -> dict:
    result: dict[str, Any] = {"tables": {}, "native": {}}
    with target.connection.cursor() as cursor:
        cursor.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name")
        table_rows = [(name, sql) for name, sql in cursor.fetchall() if not is_internal_table(name)]
        cursor.execute("SELECT tbl_name, name, sql FROM sqlite_master WHERE type = 'trigger'")
        triggers = cursor.fetchall()
        for table, sql in table_rows:
            if tables is not None and table not in tables:
                continue
            quoted = _sqlite_quote(table)
            native = _new_native("sqlite")
            result["native"][table] = native
            entry: dict[str, Any] = {"columns": {}, "column_order": []}
            result["tables"][table] = entry
            sql = sql or ""
            autoincrement = bool(re.search(r"\bAUTOINCREMENT\b", sql, re.I))
            cursor.execute(f"PRAGMA table_xinfo({quoted})")
            info = cursor.fetchall()
            primary = [row for row in info if row[5]]
            unique_columns = _sqlite_read_indexes(cursor, native, quoted, info)
            _sqlite_table_sql_blockers(native, sql, info)
            if len(primary) > 1:
                native["blockers"].append("multi-column primary key")
            native["has_primary_key"] = bool(primary)
            for trigger_table, trigger, trigger_sql in triggers:
                if trigger_table == table:
                    native["blockers"].append(f"trigger {trigger}")
                    mentioned = _mentioned_columns(trigger_sql or "", [row[1] for row in info])
                    _mention(native, mentioned, f"trigger {trigger}")
            for _cid, name, declared, not_null, default_sql, pk_position, hidden in info:
                if hidden:
                    native["blockers"].append(f"generated or hidden column {name}")
                    continue
                is_primary = bool(pk_position) and len(primary) == 1
                json_checked = _SQLITE_JSON_CHECK.format(name=name).lower() in sql.lower()
                mapped = _sqlite_type(
                    declared or "", json_checked=json_checked, autoincrement=is_primary and autoincrement
                )
                column = _portable_column(
                    **mapped,
                    nullable=not not_null,
                    primary_key=is_primary,
                    unique=name in unique_columns,
                )
                if is_primary and autoincrement:
                    native["auto_pk"] = name
                column["default"] = parse_default("sqlite", column["type"], default_sql, column)
                if str(column["type"]).startswith("native:"):
                    native["blockers"].append(f"column {name} of type {declared}")
                if isinstance(column["default"], dict) and "raw" in column["default"]:
                    native["blockers"].append(f"default of {name} is not a literal")
                entry["columns"][name] = column
                entry["column_order"].append(name)
    return result


def introspect(target: Target, tables: set[str] | None = None) -> dict:
    """The target's portable schema (see the module docstring), `_rm_*` and `sqlite_*` ignored."""
    with target.lock_errors("introspection"):
        if target.is_postgresql:
            return _introspect_postgresql(target, tables)
        return _introspect_sqlite(target, tables)


def portable_only(schema: dict) -> dict:
    """The schema without planner-only parts: what fingerprints and comparisons look at."""
    return {
        "tables": {
            table: {"columns": {name: dict(column) for name, column in entry["columns"].items()}}
            for table, entry in schema.get("tables", {}).items()
        }
    }


def fingerprint(schema: dict) -> str:
    """sha256 of the canonical JSON of the schema without column_order (and the native part)."""
    return sha256_hex(portable_only(schema))


_PG_NATIVE_QUERIES = (
    (
        "column",
        """SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attcollation::regcollation::text
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
           LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
           WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm')
           ORDER BY c.relname, a.attnum""",
    ),
    (
        "index",
        """SELECT c.relname, i.relname, pg_get_indexdef(ix.indexrelid)
           FROM pg_index ix JOIN pg_class c ON c.oid = ix.indrelid JOIN pg_class i ON i.oid = ix.indexrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = current_schema() ORDER BY c.relname, i.relname""",
    ),
    (
        "constraint",
        """SELECT c.relname, con.conname, pg_get_constraintdef(con.oid)
           FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = current_schema() ORDER BY c.relname, con.conname""",
    ),
    (
        "trigger",
        """SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
           FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = current_schema() AND NOT t.tgisinternal ORDER BY c.relname, t.tgname""",
    ),
    (
        "view",
        """SELECT c.relname, c.relkind::text, pg_get_viewdef(c.oid)
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = current_schema() AND c.relkind IN ('v', 'm') ORDER BY c.relname""",
    ),
)


def native_fingerprint(target: Target) -> str:
    """Catalog-level fingerprint (columns, indexes, constraints, triggers), `_rm_*`/`sqlite_*` ignored."""
    digest = hashlib.sha256()
    with target.lock_errors("reading the catalog"), target.connection.cursor() as cursor:
        if target.is_postgresql:
            for kind, query in _PG_NATIVE_QUERIES:
                cursor.execute(query)
                for row in cursor.fetchall():
                    if is_internal_table(row[0]):
                        continue
                    digest.update(canonical_json([kind, *[None if v is None else str(v) for v in row]]))
                    digest.update(b"\n")
        else:
            cursor.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
            for kind, name, table, sql in cursor.fetchall():
                if is_internal_table(table) or is_internal_table(name):
                    continue
                digest.update(canonical_json([kind, name, table, sql]))
                digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Django models built from the schema
# --------------------------------------------------------------------------------------------------


def python_default(column: dict) -> Any:
    """The Python value (or expression) Django's db_default needs for a portable default."""
    value: Any = column.get("default")
    column_type = column["type"]
    if value is None:
        return models.NOT_PROVIDED
    if isinstance(value, dict) and column_type != "json":
        if value.get("function") == "now":
            return Now()
        if value.get("function") == "uuid":
            return ("uuid",)
        if "raw" in value:
            return ("raw", value["raw"])
    if column_type == "date":
        return dt.date.fromisoformat(value)
    if column_type == "datetime":
        return dt.datetime.fromisoformat(value)
    if column_type == "time":
        return dt.time.fromisoformat(value)
    if column_type == "decimal":
        return decimal.Decimal(value)
    if column_type == "float":
        return float(value)
    if column_type == "uuid":
        return uuid.UUID(value)
    if column_type == "binary":
        return base64.b64decode(value)
    return value


class NativeField(models.Field):
    """A column whose type is outside the vocabulary, kept verbatim so a model can mirror it."""

    def __init__(self, *args: Any, native_type: str = "", **kwargs: Any) -> None:
        self.native_type = native_type
        super().__init__(*args, **kwargs)

    def db_type(self, connection: Any) -> str:
        return self.native_type

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        kwargs["native_type"] = self.native_type
        return name, path, args, kwargs


_FIELD_CLASSES: dict[str, type[models.Field]] = {
    "string": models.CharField,
    "text": models.TextField,
    "integer": models.IntegerField,
    "bigint": models.BigIntegerField,
    "smallint": models.SmallIntegerField,
    "boolean": models.BooleanField,
    "date": models.DateField,
    "datetime": models.DateTimeField,
    "time": models.TimeField,
    "decimal": models.DecimalField,
    "float": models.FloatField,
    "uuid": models.UUIDField,
    "json": models.JSONField,
    "binary": models.BinaryField,
}
_AUTO_CLASSES: dict[str, type[models.Field]] = {
    "bigint": models.BigAutoField,
    "integer": models.AutoField,
    "smallint": models.SmallAutoField,
}


def field_attribute(column_name: str) -> str:
    return f"c_{column_name}"


def make_field(vendor: str, name: str, column: dict, *, auto: bool = False) -> models.Field:
    """A Django field that renders exactly this portable column on `vendor`."""
    column_type = column["type"]
    kwargs: dict[str, Any] = {"db_column": name}
    if auto and column_type in _AUTO_CLASSES and column.get("primary_key"):
        return _AUTO_CLASSES[column_type](primary_key=True, db_column=name)
    kwargs["null"] = bool(column.get("nullable")) and not column.get("primary_key")
    kwargs["primary_key"] = bool(column.get("primary_key"))
    if column.get("unique") and not column.get("primary_key"):
        kwargs["unique"] = True
    if column_type == "string":
        kwargs["max_length"] = column.get("max_length")
    if column_type == "decimal":
        kwargs["max_digits"] = column.get("precision")
        kwargs["decimal_places"] = column.get("scale") or 0
    default = python_default(column)
    if isinstance(default, tuple):
        if default[0] == "uuid":
            default = RawSQL(PG_UUID_SQL if vendor == "postgresql" else SQLITE_UUID_SQL, [])  # noqa: S611 - constant
        else:
            # The target's own default expression read back from its catalog (bundles cannot carry raw SQL).
            default = RawSQL(default[1], [])  # noqa: S611
    if default is not models.NOT_PROVIDED:
        kwargs["db_default"] = default
    if str(column_type).startswith("native:"):
        native_type = str(column_type).split(":", 2)[2]
        return NativeField(native_type=native_type, **kwargs)
    return _FIELD_CLASSES[column_type](**kwargs)


def build_model(
    vendor: str,
    table: str,
    columns: list[tuple[str, dict]],
    native: dict | None = None,
    *,
    overrides: dict[str, models.Field] | None = None,
    apps: Apps | None = None,
) -> type[models.Model]:
    """An unmanaged model in a private app registry mirroring `table` as introspection shows it."""
    native = native or {}
    apps = apps or Apps()
    overrides = overrides or {}
    attributes: dict[str, Any] = {"__module__": "releases.engine.dynamic_models"}
    has_primary_key = False
    for name, column in columns:
        field = overrides.get(name) or make_field(vendor, name, column, auto=native.get("auto_pk") == name)
        has_primary_key = has_primary_key or field.primary_key
        attributes[field_attribute(name)] = field
    if not has_primary_key:
        # Django insists on a primary key; this one is never rendered because such tables are only
        # altered in place (the planner refuses rebuilds and re-creations of tables without one).
        attributes["rm_no_primary_key"] = models.BigAutoField(
            primary_key=True, db_column="_rm_no_primary_key"
        )
    index_list = [
        models.Index(fields=[field_attribute(c) for c in index["columns"]], name=index["name"])
        for index in native.get("indexes", [])
        if all(any(c == name for name, _ in columns) for c in index["columns"])
    ]
    meta = type(
        "Meta",
        (),
        {"app_label": "rm_target", "db_table": table, "apps": apps, "managed": False, "indexes": index_list},
    )
    attributes["Meta"] = meta
    class_name = "T_" + re.sub(r"\W", "_", table)
    return type(class_name, (models.Model,), attributes)


def table_columns(schema: dict, table: str) -> list[tuple[str, dict]]:
    entry = schema["tables"][table]
    order = entry.get("column_order") or list(entry["columns"])
    return [(name, entry["columns"][name]) for name in order]
