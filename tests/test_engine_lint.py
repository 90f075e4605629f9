"""Safety lint: each rule fires on the unsafe change and stays quiet on its safe variant."""

from __future__ import annotations

from typing import Any

import pytest

from releases.engine.lint import LINT_RULES, SAFE_ALTERNATIVES, lint, type_change_risk

COLUMN_KEYS = ("type", "nullable", "default", "unique", "primary_key", "max_length", "precision", "scale")


def column(name: str, type_: str = "text", **attributes: Any) -> dict[str, Any]:
    """A normalized column: every key present."""
    value = {"name": name, "type": type_, "nullable": True, "default": None, "unique": False}
    value.update({"primary_key": False, "max_length": None, "precision": None, "scale": None})
    value.update(attributes)
    return value


def schema_with(table: str, *columns: dict[str, Any]) -> dict[str, Any]:
    """A portable schema holding one table."""
    return {
        "tables": {
            table: {
                "columns": {c["name"]: {k: c[k] for k in COLUMN_KEYS} for c in columns},
                "column_order": [c["name"] for c in columns],
            }
        }
    }


ORDERS = schema_with(
    "orders",
    column("id", "bigint", nullable=False, primary_key=True),
    column("note", "text"),
    column("code", "string", max_length=20, nullable=False),
    column("amount", "decimal", precision=10, scale=2),
    column("quantity", "integer"),
    column("email", "string", max_length=100),
)


def rules(findings: list[dict[str, Any]]) -> list[str]:
    return [f["rule"] for f in findings]


def test_lint_rules__listed__every_rule_has_a_severity_and_advice():
    assert set(LINT_RULES) == set(SAFE_ALTERNATIVES)
    assert set(LINT_RULES.values()) == {"error", "warning"}


# adding-required-field


def test_adding_required_field__not_null_without_default_on_existing_table__error():
    change = {"type": "add_column", "table": "orders", "column": column("status", nullable=False)}
    findings = lint([change], ORDERS)
    assert rules(findings) == ["adding-required-field"]
    finding = findings[0]
    assert finding["severity"] == "error"
    assert finding["change"] == 0
    assert "orders.status" in finding["message"]
    assert "backfill" in finding["safe_alternative"]


def test_adding_required_field__constant_default_or_nullable__no_finding():
    with_default = {
        "type": "add_column",
        "table": "orders",
        "column": column("status", nullable=False, default="new"),
    }
    nullable = {"type": "add_column", "table": "orders", "column": column("status2")}
    assert lint([with_default, nullable], ORDERS) == []


def test_adding_required_field__table_created_in_same_bundle__no_finding():
    changes = [
        {"type": "create_table", "table": "fresh", "columns": [column("id", "bigint", primary_key=True)]},
        {"type": "add_column", "table": "fresh", "column": column("status", nullable=False)},
    ]
    assert lint(changes, ORDERS) == []


# adding-not-nullable-field


def test_adding_not_nullable_field__set_not_null_on_nullable_column__error():
    change = {"type": "modify_column", "table": "orders", "column": {"name": "note", "nullable": False}}
    findings = lint([change], ORDERS)
    assert rules(findings) == ["adding-not-nullable-field"]
    assert findings[0]["severity"] == "error"
    assert "NOT VALID" in findings[0]["safe_alternative"]
    assert "one transaction" in findings[0]["safe_alternative"]


def test_adding_not_nullable_field__column_already_not_null__no_finding():
    change = {"type": "modify_column", "table": "orders", "column": {"name": "code", "nullable": False}}
    assert lint([change], ORDERS) == []


# changing-column-type


@pytest.mark.parametrize(
    "given",
    [
        {"name": "code", "type": "integer", "max_length": None},
        {"name": "quantity", "type": "bigint"},
        {"name": "quantity", "type": "smallint"},
        {"name": "code", "max_length": 10},
        {"name": "amount", "precision": 8},
        {"name": "amount", "scale": 1},
        {"name": "note", "type": "string", "max_length": 50},
    ],
)
def test_changing_column_type__rewrite_or_narrowing__error(given):
    change = {"type": "modify_column", "table": "orders", "column": given}
    findings = lint([change], ORDERS)
    assert rules(findings) == ["changing-column-type"]
    assert findings[0]["severity"] == "error"


@pytest.mark.parametrize(
    "given",
    [
        {"name": "code", "max_length": 200},
        {"name": "code", "type": "text", "max_length": None},
        {"name": "amount", "precision": 14},
        {"name": "amount", "precision": None, "scale": None},
        {"name": "note", "type": "string", "max_length": None},
        {"name": "quantity", "type": "integer", "default": 3},
    ],
)
def test_changing_column_type__catalog_only_widening__no_finding(given):
    change = {"type": "modify_column", "table": "orders", "column": given}
    assert lint([change], ORDERS) == []


# The rewrite rules above are PostgreSQL's: check them against a real server (relfilenode changes
# exactly when the table is rewritten).
PG_TYPES = {
    "string": lambda c: f"varchar({c['max_length']})" if c.get("max_length") else "varchar",
    "text": lambda c: "text",
    "integer": lambda c: "integer",
    "bigint": lambda c: "bigint",
    "smallint": lambda c: "smallint",
    "decimal": lambda c: f"numeric({c['precision']},{c['scale']})" if c.get("precision") else "numeric",
    "float": lambda c: "double precision",
}
TYPE_PAIRS = [
    ({"type": "string", "max_length": 50}, {"type": "string", "max_length": 100}),
    ({"type": "string", "max_length": 100}, {"type": "string", "max_length": 50}),
    ({"type": "string", "max_length": 50}, {"type": "text"}),
    ({"type": "text"}, {"type": "string"}),
    ({"type": "text"}, {"type": "string", "max_length": 20}),
    ({"type": "integer"}, {"type": "bigint"}),
    ({"type": "smallint"}, {"type": "integer"}),
    ({"type": "bigint"}, {"type": "integer"}),
    ({"type": "decimal", "precision": 10, "scale": 2}, {"type": "decimal", "precision": 12, "scale": 2}),
    ({"type": "decimal", "precision": 10, "scale": 2}, {"type": "decimal", "precision": 12, "scale": 4}),
    ({"type": "decimal", "precision": 10, "scale": 2}, {"type": "decimal", "precision": 8, "scale": 2}),
    ({"type": "decimal", "precision": 10, "scale": 2}, {"type": "decimal"}),
    ({"type": "string", "max_length": 10}, {"type": "integer"}),
    ({"type": "integer"}, {"type": "float"}),
]


@pytest.mark.postgres
def test_type_change_risk__each_pair__matches_postgresql_rewrite(pg_database_factory):
    import environ
    import psycopg2

    config = environ.Env.db_url_config(pg_database_factory())
    connection = psycopg2.connect(
        host=config["HOST"], port=config["PORT"], user=config["USER"], dbname=config["NAME"]
    )
    connection.autocommit = True
    mismatches = []
    try:
        with connection.cursor() as cursor:
            for number, (old, new) in enumerate(TYPE_PAIRS):
                table = f"t{number}"
                old_sql, new_sql = PG_TYPES[old["type"]](old), PG_TYPES[new["type"]](new)
                cursor.execute(f"CREATE TABLE {table} (c {old_sql})")
                cursor.execute("SELECT relfilenode FROM pg_class WHERE relname = %s", [table])
                before = cursor.fetchone()[0]
                cursor.execute(f"ALTER TABLE {table} ALTER COLUMN c TYPE {new_sql} USING c::{new_sql}")
                cursor.execute("SELECT relfilenode FROM pg_class WHERE relname = %s", [table])
                rewritten = cursor.fetchone()[0] != before
                flagged = type_change_risk(old, new) is not None
                if rewritten != flagged:
                    mismatches.append((old_sql, new_sql, rewritten, flagged))
    finally:
        connection.close()
    assert mismatches == []


# disallowed-unique-constraint


def test_disallowed_unique_constraint__unique_on_existing_table__error_for_add_and_modify():
    changes = [
        {"type": "add_column", "table": "orders", "column": column("ref", unique=True)},
        {"type": "modify_column", "table": "orders", "column": {"name": "email", "unique": True}},
    ]
    findings = lint(changes, ORDERS)
    assert [(f["change"], f["rule"]) for f in findings] == [
        (0, "disallowed-unique-constraint"),
        (1, "disallowed-unique-constraint"),
    ]
    assert "CONCURRENTLY" in findings[0]["safe_alternative"]


def test_disallowed_unique_constraint__unique_in_create_table__no_finding():
    change = {
        "type": "create_table",
        "table": "fresh",
        "columns": [column("id", "bigint", primary_key=True), column("ref", unique=True)],
    }
    assert lint([change], ORDERS) == []


# ban-drop-column, ban-drop-table


def test_ban_drop_column__drop__warning():
    findings = lint([{"type": "drop_column", "table": "orders", "column": "note"}], ORDERS)
    assert rules(findings) == ["ban-drop-column"]
    assert findings[0]["severity"] == "warning"


def test_ban_drop_table__drop__warning():
    findings = lint([{"type": "drop_table", "table": "orders"}], ORDERS)
    assert rules(findings) == ["ban-drop-table"]
    assert findings[0]["severity"] == "warning"


def test_ban_drop__adding_instead__no_drop_finding():
    change = {"type": "add_column", "table": "orders", "column": column("extra")}
    assert lint([change], ORDERS) == []


# renaming-column, renaming-table


def test_renaming_column__rename__error():
    change = {"type": "rename_column", "table": "orders", "from": "note", "to": "comment"}
    findings = lint([change], ORDERS)
    assert rules(findings) == ["renaming-column"]
    assert findings[0]["severity"] == "error"
    assert "Expand/contract" in findings[0]["safe_alternative"]


def test_renaming_table__rename__error():
    change = {"type": "rename_table", "table": "orders", "from": "orders", "to": "purchases"}
    findings = lint([change], ORDERS)
    assert rules(findings) == ["renaming-table"]
    assert findings[0]["severity"] == "error"


def test_renaming__expand_with_new_column__no_rename_finding():
    change = {"type": "add_column", "table": "orders", "column": column("comment")}
    assert "renaming-column" not in rules(lint([change], ORDERS))


def test_renaming_table__then_changes_on_new_name__judged_as_existing_table():
    changes = [
        {"type": "rename_table", "table": "orders", "from": "orders", "to": "purchases"},
        {"type": "modify_column", "table": "purchases", "column": {"name": "note", "nullable": False}},
    ]
    assert [(f["change"], f["rule"]) for f in lint(changes, ORDERS)] == [
        (0, "renaming-table"),
        (1, "adding-not-nullable-field"),
    ]


# prefer-bigint-over-int


@pytest.mark.parametrize("type_", ["integer", "smallint"])
def test_prefer_bigint_over_int__small_integer_primary_key__warning(type_):
    change = {
        "type": "create_table",
        "table": "fresh",
        "columns": [column("id", type_, nullable=False, primary_key=True)],
    }
    findings = lint([change], ORDERS)
    assert rules(findings) == ["prefer-bigint-over-int"]
    assert findings[0]["severity"] == "warning"


def test_prefer_bigint_over_int__bigint_key_or_plain_integer_column__no_finding():
    change = {
        "type": "create_table",
        "table": "fresh",
        "columns": [column("id", "bigint", nullable=False, primary_key=True), column("count", "integer")],
    }
    assert lint([change], ORDERS) == []


# adding-field-with-default


@pytest.mark.parametrize("function", ["now", "uuid"])
def test_adding_field_with_default__volatile_default_on_existing_table__error(function):
    type_ = "datetime" if function == "now" else "uuid"
    change = {
        "type": "add_column",
        "table": "orders",
        "column": column("stamp", type_, default={"function": function}),
    }
    findings = lint([change], ORDERS)
    assert rules(findings) == ["adding-field-with-default"]
    assert findings[0]["severity"] == "error"


def test_adding_field_with_default__constant_default_or_new_table__no_finding():
    constant = {
        "type": "add_column",
        "table": "orders",
        "column": column("stamp", "datetime", default="2024-01-01T00:00:00+00:00"),
    }
    new_table = {
        "type": "create_table",
        "table": "fresh",
        "columns": [
            column("id", "bigint", primary_key=True),
            column("created", "datetime", default={"function": "now"}),
            column("token", "uuid", default={"function": "uuid"}),
        ],
    }
    assert lint([constant, new_table], ORDERS) == []


# prefer-text-field


def test_prefer_text_field__new_varchar_columns__one_warning_naming_them():
    change = {
        "type": "create_table",
        "table": "fresh",
        "columns": [
            column("id", "bigint", primary_key=True),
            column("code", "string", max_length=10),
            column("label", "string", max_length=80),
        ],
    }
    findings = lint([change], ORDERS)
    assert rules(findings) == ["prefer-text-field"]
    assert findings[0]["severity"] == "warning"
    assert "code, label" in findings[0]["message"]


def test_prefer_text_field__text_column__no_finding():
    change = {"type": "add_column", "table": "orders", "column": column("label", "text")}
    assert lint([change], ORDERS) == []


# ban-drop-not-null


def test_ban_drop_not_null__nullable_on_not_null_column__warning():
    change = {"type": "modify_column", "table": "orders", "column": {"name": "code", "nullable": True}}
    findings = lint([change], ORDERS)
    assert rules(findings) == ["ban-drop-not-null"]
    assert findings[0]["severity"] == "warning"


def test_ban_drop_not_null__column_already_nullable__no_finding():
    change = {"type": "modify_column", "table": "orders", "column": {"name": "note", "nullable": True}}
    assert lint([change], ORDERS) == []


# ordering, robustness


def test_lint__several_changes__ordered_by_change_then_rule_and_deterministic():
    changes = [
        {"type": "drop_table", "table": "orders"},
        {
            "type": "create_table",
            "table": "orders",
            "columns": [column("id", "integer", primary_key=True), column("code", "string", max_length=5)],
        },
        {"type": "add_column", "table": "legacy", "column": column("ref", unique=True, nullable=False)},
    ]
    findings = lint(changes, ORDERS)
    assert [(f["change"], f["rule"]) for f in findings] == [
        (0, "ban-drop-table"),
        (1, "prefer-bigint-over-int"),
        (1, "prefer-text-field"),
        (2, "adding-required-field"),
        (2, "disallowed-unique-constraint"),
    ]
    assert lint(changes, ORDERS) == findings


def test_lint__unknown_table_and_column__treated_as_existing_with_rows():
    changes = [{"type": "modify_column", "table": "ghost", "column": {"name": "x", "type": "bigint"}}]
    assert rules(lint(changes, {"tables": {}})) == ["changing-column-type"]


def test_lint__does_not_mutate_its_inputs():
    import copy

    changes = [
        {"type": "modify_column", "table": "orders", "column": {"name": "note", "nullable": False}},
        {"type": "rename_column", "table": "orders", "from": "note", "to": "comment"},
    ]
    before_changes, before_schema = copy.deepcopy(changes), copy.deepcopy(ORDERS)
    lint(changes, ORDERS)
    assert (changes, ORDERS) == (before_changes, before_schema)
