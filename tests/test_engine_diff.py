"""Schema diff: computed changes turn the target into the source, deterministically, or fail closed."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from releases.engine.diff import COLUMN_ATTRIBUTES, DiffError, diff_schemas, schema_difference


def col(type_: str, **attributes: Any) -> dict[str, Any]:
    """A portable-schema column (no name), every attribute present."""
    value = {"type": type_, "nullable": True, "default": None, "primary_key": False, "unique": False}
    value.update({"max_length": None, "precision": None, "scale": None})
    value.update(attributes)
    return value


def table(*pairs: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return {"columns": dict(pairs), "column_order": [name for name, _ in pairs]}


ID = ("id", col("bigint", nullable=False, primary_key=True))

# Every one of the 14 types, with literal and function defaults, nullability and unique.
ALL_TYPES = table(
    ID,
    ("code", col("string", max_length=40, nullable=False, unique=True, default="n/a")),
    ("body", col("text", default="")),
    ("count", col("integer", default=0, nullable=False)),
    ("big", col("bigint", default=9007199254740993)),
    ("small", col("smallint", default=-3)),
    ("active", col("boolean", default=True, nullable=False)),
    ("day", col("date", default="2024-02-29")),
    ("created", col("datetime", default={"function": "now"}, nullable=False)),
    ("at", col("time", default="12:30:00")),
    ("price", col("decimal", precision=12, scale=2, default="1.10")),
    ("ratio", col("float", default="0.5")),  # no floats in bundles: numbers as strings
    ("token", col("uuid", default={"function": "uuid"}, unique=True)),
    ("meta", col("json", default={"a": [1, 2]})),
    ("blob", col("binary", default="AAEC")),
)


def apply_changes(schema: dict[str, Any], changes: list[dict[str, Any]]) -> dict[str, Any]:
    """The documented meaning of normalized changes, applied to a portable schema."""
    result = copy.deepcopy(schema)
    tables = result.setdefault("tables", {})
    for change in changes:
        kind, name = change["type"], change["table"]
        if kind == "create_table":
            columns = [dict(c) for c in change["columns"]]
            if not any(c["primary_key"] for c in columns):
                columns.insert(0, {"name": "id", **col("bigint", nullable=False, primary_key=True)})
            assert name not in tables
            tables[name] = {
                "columns": {c.pop("name"): c for c in columns},
                "column_order": [c["name"] for c in change["columns"]],
            }
        elif kind == "add_column":
            column = dict(change["column"])
            column_name = column.pop("name")
            assert column_name not in tables[name]["columns"]
            tables[name]["columns"][column_name] = column
            tables[name]["column_order"].append(column_name)
        elif kind == "modify_column":
            given = dict(change["column"])
            column_name = given.pop("name")
            assert given, "modify_column lists at least one attribute"
            assert all(tables[name]["columns"][column_name][k] != v for k, v in given.items())
            tables[name]["columns"][column_name].update(given)
        elif kind == "drop_column":
            del tables[name]["columns"][change["column"]]
            tables[name]["column_order"].remove(change["column"])
        elif kind == "drop_table":
            del tables[name]
    return result


def columns_only(schema: dict[str, Any]) -> dict[str, Any]:
    return {name: t["columns"] for name, t in schema["tables"].items()}


SOURCE = {
    "tables": {
        "all_types": ALL_TYPES,
        "accounts": table(
            ID,
            ("email", col("string", max_length=200, nullable=False, unique=True)),
            ("plan", col("string", max_length=20, default="free")),
            ("balance", col("decimal", precision=14, scale=2, default="0.00")),
            ("joined", col("date")),
        ),
        "keyed": table(("key", col("uuid", nullable=False, primary_key=True)), ("value", col("json"))),
    }
}
TARGET = {
    "tables": {
        "accounts": table(
            ID,
            ("email", col("string", max_length=100, nullable=True)),
            ("plan", col("text", default="trial")),
            ("balance", col("decimal", precision=10, scale=2, default="0.00")),
            ("legacy", col("integer", nullable=False)),
        ),
        "old_stuff": table(ID, ("x", col("text"))),
        "_rm_preserved_1": table(ID),
    }
}


def test_diff_schemas__hand_written_schemas__applying_changes_gives_the_source():
    changes = diff_schemas(SOURCE, TARGET)
    result = apply_changes(TARGET, changes)
    result["tables"].pop("_rm_preserved_1")
    assert columns_only(result) == columns_only(SOURCE)
    assert result["tables"]["all_types"]["column_order"] == ALL_TYPES["column_order"]


def summary(change: dict[str, Any]) -> tuple[str, str, str | None]:
    column = change.get("column")
    return change["type"], change["table"], column["name"] if isinstance(column, dict) else column


def test_diff_schemas__hand_written_schemas__expected_changes_in_order():
    changes = diff_schemas(SOURCE, TARGET)
    assert [summary(c) for c in changes] == [
        ("create_table", "all_types", None),
        ("create_table", "keyed", None),
        ("add_column", "accounts", "joined"),
        ("modify_column", "accounts", "balance"),
        ("modify_column", "accounts", "email"),
        ("modify_column", "accounts", "plan"),
        ("drop_column", "accounts", "legacy"),
        ("drop_table", "old_stuff", None),
    ]
    modifies = {c["column"]["name"]: c["column"] for c in changes if c["type"] == "modify_column"}
    assert modifies["balance"] == {"name": "balance", "precision": 14}
    assert modifies["email"] == {"name": "email", "nullable": False, "unique": True, "max_length": 200}
    assert modifies["plan"] == {"name": "plan", "type": "string", "default": "free", "max_length": 20}


def test_diff_schemas__computed_changes__already_a_normalized_bundle():
    from releases.engine.bundle import normalize_bundle

    bundle = {"database": {"changes": diff_schemas(SOURCE, TARGET)}, "feature_flags": {}}
    assert normalize_bundle(bundle) == bundle


def test_diff_schemas__create_table__every_column_normalized_in_column_order():
    change = diff_schemas({"tables": {"all_types": ALL_TYPES}}, {"tables": {}})[0]
    assert [c["name"] for c in change["columns"]] == ALL_TYPES["column_order"]
    assert {c["type"] for c in change["columns"]} == {
        "string", "text", "integer", "bigint", "smallint", "boolean", "date",
        "datetime", "time", "decimal", "float", "uuid", "json", "binary",
    }  # fmt: skip
    for column in change["columns"]:
        assert list(column) == ["name", *COLUMN_ATTRIBUTES]


def test_diff_schemas__each_attribute_differs__only_that_attribute_listed():
    base = col("string", max_length=10)
    variants = {
        "nullable": False,
        "default": "x",
        "unique": True,
        "max_length": 30,
    }
    for attribute, value in variants.items():
        source = {"tables": {"t": table(ID, ("c", {**base, attribute: value}))}}
        target = {"tables": {"t": table(ID, ("c", base))}}
        assert diff_schemas(source, target) == [
            {"type": "modify_column", "table": "t", "column": {"name": "c", attribute: value}}
        ]
        assert apply_changes(target, diff_schemas(source, target))["tables"] == source["tables"]


def test_diff_schemas__identical_or_reordered__no_changes():
    reordered = copy.deepcopy(SOURCE)
    reordered["tables"]["all_types"]["column_order"].reverse()
    assert diff_schemas(SOURCE, SOURCE) == []
    assert diff_schemas(SOURCE, reordered) == []


def shuffled(schema: dict[str, Any], seed: int) -> dict[str, Any]:
    """The same schema with every dict built in another insertion order."""
    rng = random.Random(seed)
    tables = list(schema["tables"].items())
    rng.shuffle(tables)
    result = {"tables": {}}
    for name, t in tables:
        columns = list(t["columns"].items())
        rng.shuffle(columns)
        result["tables"][name] = {
            "columns": {c: dict(rng.sample(list(v.items()), len(v))) for c, v in columns},
            "column_order": list(t["column_order"]),
        }
    return result


def test_diff_schemas__insertion_order_varies__same_output_bytes():
    expected = json.dumps(diff_schemas(SOURCE, TARGET))
    for seed in range(20):
        assert json.dumps(diff_schemas(shuffled(SOURCE, seed), shuffled(TARGET, seed + 100))) == expected


NATIVE = col("native:postgresql:tsvector")
RAW_DEFAULT = col("text", default={"raw": "upper('x')"})


@pytest.mark.parametrize(
    ("source", "target", "culprit"),
    [
        ({"t": table(ID, ("doc", NATIVE))}, {}, "t.doc"),
        ({"t": table(ID, ("doc", NATIVE))}, {"t": table(ID)}, "t.doc"),
        ({"t": table(ID, ("doc", NATIVE))}, {"t": table(ID, ("doc", col("text")))}, "t.doc"),
        ({"t": table(ID, ("doc", col("text")))}, {"t": table(ID, ("doc", NATIVE))}, "t.doc"),
        ({"t": table(ID)}, {"t": table(ID, ("doc", NATIVE))}, "t.doc"),
        ({"t": table(ID, ("v", RAW_DEFAULT))}, {"t": table(ID)}, "t.v"),
        ({"t": table(ID, ("v", col("text")))}, {"t": table(ID, ("v", RAW_DEFAULT))}, "t.v"),
        ({"t": table(("a", col("text")))}, {}, "t"),
        ({"t": table(ID, ("s", col("string")))}, {"t": table(ID)}, "t.s"),
        ({"t": table(ID, ("s", col("text")))}, {"t": table(ID, ("s", col("string")))}, "t.s"),
        ({"t": table(ID, ("d", col("decimal")))}, {"t": table(ID)}, "t.d"),
        ({"t": table(("day", col("date", nullable=False, primary_key=True)))}, {}, "t.day"),
        ({"t": table(("k", col("uuid", nullable=False, primary_key=True)))}, {"t": table(ID)}, "t.k"),
    ],
)
def test_diff_schemas__inexpressible_difference__diff_error_naming_the_column(source, target, culprit):
    with pytest.raises(DiffError) as raised:
        diff_schemas({"tables": source}, {"tables": target})
    assert raised.value.column == culprit
    assert culprit in raised.value.message


def test_diff_schemas__native_column_unchanged__no_error():
    schema = {"tables": {"t": table(ID, ("doc", NATIVE))}}
    other = {"tables": {"t": table(ID, ("doc", NATIVE), ("extra", col("text")))}}
    assert diff_schemas(schema, other) == [{"type": "drop_column", "table": "t", "column": "extra"}]


def test_schema_difference__differing_schemas__tables_columns_and_attributes():
    difference = schema_difference(SOURCE, TARGET)
    assert difference["only_in_a"] == ["accounts.joined", "all_types", "keyed"]
    assert difference["only_in_b"] == ["accounts.legacy", "old_stuff"]
    assert difference["different"] == {
        "accounts.balance": {"precision": [14, 10]},
        "accounts.email": {"nullable": [False, True], "unique": [True, False], "max_length": [200, 100]},
        "accounts.plan": {"type": ["string", "text"], "default": ["free", "trial"], "max_length": [20, None]},
    }


def test_schema_difference__equal_schemas__empty():
    assert schema_difference(SOURCE, shuffled(SOURCE, 7)) == {
        "only_in_a": [],
        "only_in_b": [],
        "different": {},
    }


# Property: for any two expressible schemas, applying the diff to one gives the other.

TYPE_SAMPLES: dict[str, dict[str, Any]] = {
    "string": {"max_length": 30, "default": "x"},
    "text": {"default": "t"},
    "integer": {"default": 1},
    "bigint": {"default": 2},
    "smallint": {"default": 3},
    "boolean": {"default": False},
    "date": {"default": "2024-01-01"},
    "datetime": {"default": {"function": "now"}},
    "time": {"default": "01:02:03"},
    "decimal": {"precision": 8, "scale": 3, "default": "1.500"},
    "float": {"default": "2.5"},
    "uuid": {"default": {"function": "uuid"}},
    "json": {"default": [1]},
    "binary": {"default": "AQ=="},
}


@st.composite
def columns(draw) -> dict[str, Any]:
    type_ = draw(st.sampled_from(sorted(TYPE_SAMPLES)))
    sample = TYPE_SAMPLES[type_]
    return col(
        type_,
        nullable=draw(st.booleans()),
        unique=draw(st.booleans()),
        default=sample["default"] if draw(st.booleans()) else None,
        **{k: v for k, v in sample.items() if k != "default"},
    )


NAMES = st.sampled_from(["a", "b", "c", "d", "e"])


@st.composite
def schemas(draw) -> dict[str, Any]:
    tables = {}
    for name in draw(st.sets(st.sampled_from(["t1", "t2", "t3"]))):
        pairs = [ID] + [(c, draw(columns())) for c in sorted(draw(st.sets(NAMES)))]
        tables[name] = table(*pairs)
    return {"tables": tables}


@settings(max_examples=200, deadline=None)
@given(source=schemas(), target=schemas())
def test_diff_schemas__any_two_schemas__applying_the_diff_reaches_the_source(source, target):
    changes = diff_schemas(source, target)
    assert columns_only(apply_changes(target, changes)) == columns_only(source)
    assert diff_schemas(source, apply_changes(target, changes)) == []
