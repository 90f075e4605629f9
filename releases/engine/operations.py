"""Running one change (or its undo) on a live target connection through Django's schema editor.

Statements are recorded as they run (`connection.execute_wrapper`), so the SQL stored with a plan is
exactly what the dry-run executed; the executor replays that list later. Data about to be lost is
copied into `_rm_` side tables first, with names derived from release id, position and direction.

No committed write is lost. On PostgreSQL every copy aside is preceded by `LOCK TABLE ... IN ACCESS
EXCLUSIVE MODE` (recorded and approved like every other statement, bounded by the apply's
lock_timeout), so the copy holds every value committed before the change takes effect: no writer can
commit between the copy and the ALTER. On SQLite the apply runs in `BEGIN IMMEDIATE`, which keeps
every other writer out for the whole transaction.

Rolling back a `modify_column` keeps the application's writes: a row still holding what the promote
made of its pre-release value gets its pre-release value back (exactly, even when the change was
lossy); a value written since the promote stays in the table, cast back, when the old definition can
hold it (PostgreSQL: the cast back succeeds and casts forward to the same value; SQLite, which does
not enforce types or lengths: any value but a NULL under NOT NULL). Only values the old definition
cannot hold go to the `_rm_<release>_<position>r` side table with their key (reported with its row
count); their rows get the pre-release value, or NULL for rows inserted since the promote (the
rollback is then blocked if the old definition is NOT NULL: nothing is run).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
from collections.abc import Iterator
from typing import Any

from django.apps.registry import Apps

from .bundle import merge_column
from .schema import build_model, field_attribute, introspect, table_columns
from .target import Target

_READ_ONLY = re.compile(r"^\s*(SELECT|PRAGMA|SHOW|EXPLAIN)\b", re.I)
# Django's PostgreSQL editor ends its DROP TABLE / DROP COLUMN / DROP SEQUENCE with CASCADE, which would
# silently take dependent views, foreign keys and defaults along: without it such a drop fails instead.
_PG_CASCADE = re.compile(r"^\s*(DROP\b.*|ALTER TABLE\b.*\bDROP\b.*?)\s+CASCADE\s*$", re.I | re.S)
VALUE_ATTRIBUTES = ("type", "max_length", "precision", "scale")


def _jsonable_params(params: Any) -> list | None:
    if params is None:
        return None
    values = list(params)
    for value in values:
        if not isinstance(value, (str, int, float, bool, type(None))):
            raise TypeError(f"statement parameter of type {type(value).__name__} cannot be recorded")
    return values


class Recorder:
    """An execute_wrapper that records the writes the schema editor runs (and strips CASCADE)."""

    def __init__(self, vendor: str) -> None:
        self.vendor = vendor
        self.capturing = False
        self.force = False
        self.statements: list[dict] = []

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: dict) -> Any:
        if self.capturing and not many and (self.force or not _READ_ONLY.match(str(sql))):
            sql = str(sql)
            if self.vendor == "postgresql":
                match = _PG_CASCADE.match(sql)
                if match:
                    sql = match.group(1)
            self.statements.append({"sql": sql, "params": _jsonable_params(params)})
        return execute(sql, params, many, context)

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[dict]]:
        start = len(self.statements)
        self.capturing = True
        collected: list[dict] = []
        try:
            yield collected
        finally:
            self.capturing = False
            collected.extend(self.statements[start:])
            del self.statements[start:]


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def preservation_name(release_id: str, position: int, direction: str) -> str:
    """`_rm_<release>_<position><f|r>`: deterministic (re-planning gives the same SQL), <= 59 chars."""
    slug = re.sub(r"[^a-z0-9_]", "_", str(release_id).lower())
    suffix = f"_{position}{'f' if direction == 'forward' else 'r'}"
    name = f"_rm_{slug}{suffix}"
    if len(name) > 59:
        name = f"_rm_{hashlib.sha256(str(release_id).encode()).hexdigest()[:20]}{suffix}"
    return name


def preservation_key(columns: list[tuple[str, dict]], exclude: str | None) -> str | None:
    """The single-column primary key, else a non-null unique column, other than `exclude`."""
    for name, column in columns:
        if column.get("primary_key") and name != exclude:
            primary = [n for n, c in columns if c.get("primary_key")]
            if len(primary) == 1:
                return name
    for name, column in columns:
        if name != exclude and column.get("unique") and not column.get("nullable"):
            return name
    return None


class ChangeRunner:
    """Runs one change's forward or rollback work on the target inside the caller's transaction."""

    def __init__(self, target: Target, recorder: Recorder, release_id: str) -> None:
        self.target = target
        self.vendor = target.vendor
        self.recorder = recorder
        self.release_id = release_id
        # When set: table -> (columns, native) as the caller knows the table to be right now, used
        # instead of reading the catalog (the planner's simulated schema on PostgreSQL, proven
        # against the catalog after the forward pass and after the rollback pass).
        self.known: dict[str, tuple[list[tuple[str, dict]], dict]] | None = None

    # -- helpers -----------------------------------------------------------------------------------
    def live(self, table: str) -> tuple[list[tuple[str, dict]], dict]:
        if self.known is not None:
            if table not in self.known:
                raise RuntimeError(f"table {table} does not exist")
            columns, native = self.known[table]
            # Copies, so the work cannot change the caller's schema (column values are JSON scalars
            # or small dicts nobody mutates; the native part is copied whole).
            return [(name, dict(column)) for name, column in columns], copy.deepcopy(native)
        schema = introspect(self.target, {table})
        if table not in schema["tables"]:
            raise RuntimeError(f"table {table} does not exist")
        return table_columns(schema, table), schema["native"].get(table, {})

    def model(self, table: str, columns: list[tuple[str, dict]], native: dict) -> Any:
        return build_model(self.vendor, table, columns, native, apps=Apps())

    def sql(self, statement: str) -> None:
        """Run one statement of our own (preservation); it is recorded like the editor's."""
        self.recorder.force = True
        try:
            with self.target.connection.cursor() as cursor:
                cursor.execute(statement)
        finally:
            self.recorder.force = False

    def editor(self) -> Any:
        editor = self.target.connection.schema_editor(atomic=False, collect_sql=False)
        if self.vendor == "sqlite":
            # Django's SQLite editor inlines literals (defaults) into its SQL and then executes it with
            # params=(), which makes the driver wrapper rewrite `%s` to `?` and `%%` to `%` inside
            # those literals (a default "50%s" would be copied into rows as "50?"). Its SQL never
            # carries real placeholders there, so run parameterless statements without parameters.
            execute = editor.execute

            def execute_literal(sql: Any, params: Any = ()) -> Any:
                return execute(sql, None if params is not None and len(params) == 0 else params)

            editor.execute = execute_literal  # type: ignore[method-assign]  # this editor only
        return editor

    def lock(self, table: str) -> None:
        """PostgreSQL: take the table's ACCESS EXCLUSIVE lock now, before anything is read from it, so
        no write commits between a copy aside and the ALTER that follows (SQLite: BEGIN IMMEDIATE)."""
        if self.vendor == "postgresql":
            self.sql(f"LOCK TABLE {quote(table)} IN ACCESS EXCLUSIVE MODE")

    def copy_aside(self, table: str, name: str, columns: list[str] | None) -> None:
        self.lock(table)
        selected = "*" if columns is None else ", ".join(quote(c) for c in columns)
        if self.vendor == "postgresql" and columns is None:
            self.sql(f"CREATE TABLE {quote(name)} AS TABLE {quote(table)}")
        else:
            self.sql(f"CREATE TABLE {quote(name)} AS SELECT {selected} FROM {quote(table)}")
        if columns:
            self.sql(f"CREATE INDEX {quote(name + '_k')} ON {quote(name)} ({quote(columns[0])})")

    def fill_from(self, table: str, side: str, key: str, column: str) -> None:
        # The side table's alias uses the reserved prefix, so no user table name can collide with it.
        t, s, k, c = quote(table), quote(side), quote(key), quote(column)
        saved = quote("_rm_saved")
        if self.vendor == "postgresql":
            self.sql(f"UPDATE {t} SET {c} = {saved}.{c} FROM {s} AS {saved} WHERE {t}.{k} = {saved}.{k}")
        else:
            self.sql(
                f"UPDATE {t} SET {c} = (SELECT {saved}.{c} FROM {s} AS {saved} WHERE {saved}.{k} = {t}.{k}) "
                f"WHERE {t}.{k} IN (SELECT {saved}.{k} FROM {s} AS {saved})"
            )

    def reset_identity(self, table: str, native: dict) -> None:
        auto = native.get("auto_pk")
        if self.vendor == "postgresql" and auto:
            self.sql(
                f"SELECT setval(pg_get_serial_sequence('{quote(table)}', '{auto}'), "
                f"COALESCE(MAX({quote(auto)}), 0) + 1, false) FROM {quote(table)}"
            )

    # -- operations --------------------------------------------------------------------------------
    def run(self, change: dict, position: int, direction: str, state: dict, out: list[dict]) -> list[dict]:
        """Forward or rollback work of `change`, its statements appended to `out` even when it fails;
        `state` carries what forward saw, for the rollback."""
        method = getattr(self, f"{direction}_{change['type']}")
        try:
            with self.recorder.capture() as statements:
                method(change, position, state)
        finally:
            out.extend(statements)
        return out

    def forward_create_table(self, change: dict, position: int, state: dict) -> None:
        columns = [(column["name"], _portable(column)) for column in change["columns"]]
        primary = [name for name, column in columns if column["primary_key"]]
        native = {"auto_pk": primary[0] if primary and _auto_candidate(dict(columns)[primary[0]]) else None}
        with self.editor() as editor:
            editor.create_model(self.model(change["table"], columns, native))

    def rollback_create_table(self, change: dict, position: int, state: dict) -> None:
        table = change["table"]
        columns, native = self.live(table)
        self.copy_aside(table, preservation_name(self.release_id, position, "rollback"), None)
        with self.editor() as editor:
            editor.delete_model(self.model(table, columns, native))

    def forward_drop_table(self, change: dict, position: int, state: dict) -> None:
        table = change["table"]
        columns, native = self.live(table)
        state["columns"], state["native"] = columns, native
        side = preservation_name(self.release_id, position, "forward")
        if self.vendor == "sqlite":
            with self.editor() as editor:
                editor.alter_db_table(self.model(table, columns, native), table, side)
        else:
            self.copy_aside(table, side, None)
            with self.editor() as editor:
                editor.delete_model(self.model(table, columns, native))

    def rollback_drop_table(self, change: dict, position: int, state: dict) -> None:
        table = change["table"]
        side = preservation_name(self.release_id, position, "forward")
        columns, native = state["columns"], state["native"]
        if self.vendor == "sqlite":
            with self.editor() as editor:
                editor.alter_db_table(self.model(side, columns, native), side, table)
            return
        with self.editor() as editor:
            editor.create_model(self.model(table, columns, native))
        names = ", ".join(quote(name) for name, _ in columns)
        overriding = " OVERRIDING SYSTEM VALUE" if native.get("auto_pk") else ""
        self.sql(f"INSERT INTO {quote(table)} ({names}){overriding} SELECT {names} FROM {quote(side)}")
        self.reset_identity(table, native)

    def forward_add_column(self, change: dict, position: int, state: dict) -> None:
        table, column = change["table"], change["column"]
        columns, native = self.live(table)
        after = [*columns, (column["name"], _portable(column))]
        # As migrations do: the model as it is now, the field as it will be (a model that already has
        # the column would make SQLite's rebuild copy "column" from a table that lacks it).
        from_model = self.model(table, columns, native)
        to_model = self.model(table, after, native)
        with self.editor() as editor:
            editor.add_field(from_model, to_model._meta.get_field(field_attribute(column["name"])))

    def rollback_add_column(self, change: dict, position: int, state: dict) -> None:
        table, name = change["table"], change["column"]["name"]
        columns, native = self.live(table)
        key = preservation_key(columns, exclude=name)
        side = preservation_name(self.release_id, position, "rollback")
        self.copy_aside(table, side, [key, name] if key else None)
        model = self.model(table, columns, native)
        with self.editor() as editor:
            editor.remove_field(model, model._meta.get_field(field_attribute(name)))

    def forward_drop_column(self, change: dict, position: int, state: dict) -> None:
        table, name = change["table"], change["column"]
        columns, native = self.live(table)
        state["column"] = dict(columns)[name]
        state["native"] = native
        key = preservation_key(columns, exclude=name)
        if key is None:
            raise RuntimeError(f"drop_column needs a primary key or a non-null unique key on {table}")
        state["key"] = key
        self.copy_aside(table, preservation_name(self.release_id, position, "forward"), [key, name])
        model = self.model(table, columns, native)
        with self.editor() as editor:
            editor.remove_field(model, model._meta.get_field(field_attribute(name)))

    def rollback_drop_column(self, change: dict, position: int, state: dict) -> None:
        table, name = change["table"], change["column"]
        original = state["column"]
        columns, native = self.live(table)
        relaxed = {**original, "nullable": True, "unique": False}
        relaxed_columns = [*columns, (name, relaxed)]
        relaxed_model = self.model(table, relaxed_columns, native)
        with self.editor() as editor:
            editor.add_field(
                self.model(table, columns, native), relaxed_model._meta.get_field(field_attribute(name))
            )
        self.fill_from(table, preservation_name(self.release_id, position, "forward"), state["key"], name)
        if not original["nullable"] or original["unique"]:
            final_model = self.model(table, [*columns, (name, original)], native)
            with self.editor() as editor:
                editor.alter_field(
                    relaxed_model,
                    relaxed_model._meta.get_field(field_attribute(name)),
                    final_model._meta.get_field(field_attribute(name)),
                )

    def _alter(
        self, table: str, columns: list, native: dict, name: str, new_name: str, new_column: dict
    ) -> None:
        after = [(new_name if n == name else n, new_column if n == name else c) for n, c in columns]
        from_model = self.model(table, columns, native)
        after_native = copy.deepcopy(native)
        if after_native.get("auto_pk") == name:
            after_native["auto_pk"] = new_name
        for index in after_native.get("indexes", []):
            index["columns"] = [new_name if c == name else c for c in index["columns"]]
        to_model = self.model(table, after, after_native)
        with self.editor() as editor:
            editor.alter_field(
                from_model,
                from_model._meta.get_field(field_attribute(name)),
                to_model._meta.get_field(field_attribute(new_name)),
            )

    def forward_modify_column(self, change: dict, position: int, state: dict) -> None:
        table, modification = change["table"], change["column"]
        name = modification["name"]
        columns, native = self.live(table)
        current = dict(columns)[name]
        new = merge_column(current, modification)
        state["column"] = current
        key = preservation_key(columns, exclude=name)
        state["key"] = key
        state["preserved"] = False
        # Values can change with the type or size, and when NOT NULL is set (SQLite's rebuild fills
        # NULLs with the default): copy them first so the rollback puts back exactly what was there.
        fills_nulls = current.get("nullable") and not new.get("nullable")
        if key and (fills_nulls or any(current.get(a) != new.get(a) for a in VALUE_ATTRIBUTES)):
            self.copy_aside(table, preservation_name(self.release_id, position, "forward"), [key, name])
            state["preserved"] = True
        self._alter(table, columns, native, name, name, new)

    def rollback_modify_column(self, change: dict, position: int, state: dict) -> None:
        table, name = change["table"], change["column"]["name"]
        columns, native = self.live(table)
        if state.get("preserved"):
            self.restore_values(table, columns, native, name, state["column"], state["key"], position)
        else:
            self._alter(table, columns, native, name, name, state["column"])

    def restore_values(
        self,
        table: str,
        columns: list[tuple[str, dict]],
        native: dict,
        name: str,
        old: dict,
        key: str,
        position: int,
    ) -> None:
        """Put `name` back to its `old` definition, keeping the application's writes (module docstring).

        Forward preserved (key, pre-release value) in the `f` table. `u` (dropped at the end) keeps
        the keys of rows the application has not written since the promote; `r` receives the values
        written since that the old definition cannot hold."""
        new = dict(columns)[name]
        old_model = self.model(table, [(n, old if n == name else c) for n, c in columns], native)
        new_model = self.model(table, columns, native)
        connection = self.target.connection
        old_type = old_model._meta.get_field(field_attribute(name)).db_type(connection)
        new_type = new_model._meta.get_field(field_attribute(name)).db_type(connection)
        pg = self.vendor == "postgresql"
        same = "IS NOT DISTINCT FROM" if pg else "IS"
        side = preservation_name(self.release_id, position, "rollback")
        t, k, c = quote(table), quote(key), quote(name)
        f, r, u = (
            quote(preservation_name(self.release_id, position, "forward")),
            quote(side),
            quote(side + "_u"),
        )

        self.lock(table)
        # Rows nobody wrote since the promote: they hold what the promote made of the pre-release value
        # (the same cast, or the default it filled a NULL with when NOT NULL was set).
        unchanged = f"{t}.{c} {same} CAST({f}.{c} AS {new_type})"
        fill = (
            self.default_literal(new_model, name, new)
            if old.get("nullable") and not new.get("nullable")
            else None
        )
        if fill is not None:
            unchanged = f"({unchanged} OR ({f}.{c} IS NULL AND {t}.{c} {same} CAST({fill} AS {new_type})))"
        self.sql(
            f"CREATE TABLE {u} AS SELECT {t}.{k} FROM {t} JOIN {f} ON {f}.{k} = {t}.{k} WHERE {unchanged}"
        )
        written = f"NOT EXISTS (SELECT 1 FROM {u} WHERE {u}.{k} = {t}.{k})"
        # Values written since the promote that the old definition cannot hold: set aside with their key.
        self.sql(f"CREATE TABLE {r} AS SELECT {k}, {c} FROM {t} WHERE 1 = 0")
        null_kept = (
            "CONTINUE;"
            if old.get("nullable")
            else f"INSERT INTO {r} ({k}, {c}) VALUES (_rm_row.rm_key, NULL); CONTINUE;"
        )
        if pg:
            # PostgreSQL 15 has no pg_input_is_valid: try the cast back per written row, in a
            # subtransaction; a value fits when it casts back and forward to itself.
            self.sql(
                "DO $_rm_$\n#variable_conflict use_column\nDECLARE _rm_row record;\nBEGIN\n"
                f"  FOR _rm_row IN SELECT {k} AS rm_key, {c} AS rm_value FROM {t} WHERE {written} LOOP\n"
                f"    IF _rm_row.rm_value IS NULL THEN {null_kept} END IF;\n"
                "    BEGIN\n"
                f"      IF CAST(CAST(_rm_row.rm_value AS {old_type}) AS {new_type}) IS DISTINCT FROM _rm_row.rm_value THEN\n"
                f"        INSERT INTO {r} ({k}, {c}) VALUES (_rm_row.rm_key, _rm_row.rm_value);\n"
                "      END IF;\n"
                "    EXCEPTION WHEN data_exception THEN\n"
                f"      INSERT INTO {r} ({k}, {c}) VALUES (_rm_row.rm_key, _rm_row.rm_value);\n"
                "    END;\n"
                "  END LOOP;\n"
                "END\n$_rm_$"
            )
        elif not old.get("nullable"):
            self.sql(f"INSERT INTO {r} ({k}, {c}) SELECT {k}, {c} FROM {t} WHERE {c} IS NULL AND {written}")
        self.sql(f"CREATE INDEX {quote(side + '_k')} ON {r} ({k})")
        # Their rows: the pre-release value (it fits: the promote cast it), NULL for rows inserted since.
        self.sql(
            f"UPDATE {t} SET {c} = (SELECT CAST({f}.{c} AS {new_type}) FROM {f} WHERE {f}.{k} = {t}.{k}) "
            f"WHERE {t}.{k} IN (SELECT {k} FROM {r})"
        )
        self._alter(table, columns, native, name, name, old)
        # The exact pre-release values where nothing was written since (a lossy change cast them) and
        # where a written value was set aside.
        restore = f"({t}.{k} IN (SELECT {k} FROM {u}) OR {t}.{k} IN (SELECT {k} FROM {r}))"
        saved = quote("_rm_saved")
        if pg:
            self.sql(
                f"UPDATE {t} SET {c} = {saved}.{c} FROM {f} AS {saved} WHERE {t}.{k} = {saved}.{k} "
                f"AND {restore} AND {t}.{c} IS DISTINCT FROM {saved}.{c}"
            )
        else:
            self.sql(
                f"UPDATE {t} SET {c} = (SELECT {saved}.{c} FROM {f} AS {saved} WHERE {saved}.{k} = {t}.{k}) "
                f"WHERE {restore} AND EXISTS (SELECT 1 FROM {f} AS {saved} WHERE {saved}.{k} = {t}.{k} "
                f"AND {t}.{c} IS NOT {saved}.{c})"
            )
        self.sql(f"DROP TABLE {u}")

    def default_literal(self, model: Any, name: str, column: dict) -> str | None:
        """SQL of `column`'s literal default as the schema editor writes it; None for none or a function."""
        default = column.get("default")
        if default is None or isinstance(default, dict):
            return None
        field = model._meta.get_field(field_attribute(name))
        editor = self.target.connection.schema_editor(collect_sql=True, atomic=False)
        sql, params = editor.db_default_sql(field)
        if params:
            sql = sql % tuple(editor.quote_value(p) for p in params)
        return str(sql)

    def forward_rename_column(self, change: dict, position: int, state: dict) -> None:
        columns, native = self.live(change["table"])
        self._alter(
            change["table"], columns, native, change["from"], change["to"], dict(columns)[change["from"]]
        )

    def rollback_rename_column(self, change: dict, position: int, state: dict) -> None:
        columns, native = self.live(change["table"])
        self._alter(
            change["table"], columns, native, change["to"], change["from"], dict(columns)[change["to"]]
        )

    def forward_rename_table(self, change: dict, position: int, state: dict) -> None:
        columns, native = self.live(change["from"])
        with self.editor() as editor:
            editor.alter_db_table(self.model(change["from"], columns, native), change["from"], change["to"])

    def rollback_rename_table(self, change: dict, position: int, state: dict) -> None:
        columns, native = self.live(change["to"])
        with self.editor() as editor:
            editor.alter_db_table(self.model(change["to"], columns, native), change["to"], change["from"])


def _portable(column: dict) -> dict:
    return {key: value for key, value in column.items() if key != "name"}


def _auto_candidate(column: dict) -> bool:
    return column.get("type") == "bigint" and column.get("default") is None


def preservations_for(change: dict, position: int, release_id: str, direction: str) -> list[dict]:
    """The `_rm_` tables a change's forward or rollback work creates (for the Preservation model)."""
    kind_by_change = {
        ("forward", "drop_column"): "column",
        ("forward", "drop_table"): "table",
        ("forward", "modify_column"): "values",
        ("rollback", "create_table"): "table",
        ("rollback", "add_column"): "column",
        ("rollback", "modify_column"): "values",
    }
    kind = kind_by_change.get((direction, change["type"]))
    if kind is None:
        return []
    column = change.get("column")
    if isinstance(column, dict):
        column = column.get("name")
    return [
        {
            "position": position,
            "direction": direction,
            "kind": kind,
            "source_table": change["table"],
            "source_column": column or "",
            "preserved_table": preservation_name(release_id, position, direction),
        }
    ]
