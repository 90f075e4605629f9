"""Bundle validation and normalization: field-path errors, implicit values, canonical hash."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from releases.engine import BundleError, canonical_json, normalize_bundle, sha256_hex
from releases.engine.bundle import MAX_FLAGS


def _table(columns, table="items"):
    return {"database": {"changes": [{"type": "create_table", "table": table, "columns": columns}]}}


def _errors(raw, **kwargs) -> dict[str, str]:
    with pytest.raises(BundleError) as info:
        normalize_bundle(raw, **kwargs)
    assert info.value.details, "a BundleError always names the fields"
    return info.value.details


BAD_INPUTS = [
    ("not_an_object", ["changes"], "bundle"),
    ("changes_not_list", {"database": {"changes": {"type": "drop_table"}}}, "database.changes"),
    ("database_not_object", {"database": "drop everything"}, "database"),
    ("change_not_object", {"database": {"changes": ["drop_table"]}}, "database.changes[0]"),
    (
        "unknown_change_type",
        {"database": {"changes": [{"type": "truncate", "table": "t"}]}},
        "database.changes[0].type",
    ),
    (
        "unknown_column_type",
        _table([{"name": "a", "type": "varchar"}]),
        "database.changes[0].columns[0].type",
    ),
    (
        "table_injection",
        _table([{"name": "a", "type": "text"}], table="x; DROP TABLE y"),
        "database.changes[0].table",
    ),
    (
        "table_quote_injection",
        _table([{"name": "a", "type": "text"}], table='"; --'),
        "database.changes[0].table",
    ),
    (
        "column_injection",
        _table([{"name": 'a"; DROP TABLE t; --', "type": "text"}]),
        "database.changes[0].columns[0].name",
    ),
    ("table_uppercase", _table([{"name": "a", "type": "text"}], table="Items"), "database.changes[0].table"),
    ("table_too_long", _table([{"name": "a", "type": "text"}], table="a" * 64), "database.changes[0].table"),
    (
        "reserved_word_table",
        _table([{"name": "a", "type": "text"}], table="select"),
        "database.changes[0].table",
    ),
    (
        "reserved_word_column",
        _table([{"name": "user", "type": "text"}]),
        "database.changes[0].columns[0].name",
    ),
    (
        "reserved_prefix",
        _table([{"name": "a", "type": "text"}], table="_rm_items"),
        "database.changes[0].table",
    ),
    (
        "sqlite_prefix",
        _table([{"name": "a", "type": "text"}], table="sqlite_items"),
        "database.changes[0].table",
    ),
    (
        "string_without_length",
        _table([{"name": "a", "type": "string"}]),
        "database.changes[0].columns[0].max_length",
    ),
    (
        "string_length_zero",
        _table([{"name": "a", "type": "string", "max_length": 0}]),
        "database.changes[0].columns[0].max_length",
    ),
    (
        "string_length_huge",
        _table([{"name": "a", "type": "string", "max_length": 10485761}]),
        "database.changes[0].columns[0].max_length",
    ),
    (
        "length_not_int",
        _table([{"name": "a", "type": "string", "max_length": "20"}]),
        "database.changes[0].columns[0].max_length",
    ),
    (
        "decimal_without_precision",
        _table([{"name": "a", "type": "decimal"}]),
        "database.changes[0].columns[0].precision",
    ),
    (
        "scale_over_precision",
        _table([{"name": "a", "type": "decimal", "precision": 4, "scale": 5}]),
        "database.changes[0].columns[0].scale",
    ),
    (
        "length_on_integer",
        _table([{"name": "a", "type": "integer", "max_length": 3}]),
        "database.changes[0].columns[0].max_length",
    ),
    (
        "nullable_not_bool",
        _table([{"name": "a", "type": "text", "nullable": "yes"}]),
        "database.changes[0].columns[0].nullable",
    ),
    (
        "default_wrong_type",
        _table([{"name": "a", "type": "integer", "default": "1; DROP TABLE t"}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_bool_for_int",
        _table([{"name": "a", "type": "integer", "default": True}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_too_long",
        _table([{"name": "a", "type": "string", "max_length": 2, "default": "abc"}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_int_range",
        _table([{"name": "a", "type": "smallint", "default": 40000}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_float_for_decimal",
        _table([{"name": "a", "type": "decimal", "precision": 5, "scale": 2, "default": 1.5}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_decimal_too_wide",
        _table([{"name": "a", "type": "decimal", "precision": 3, "scale": 2, "default": "12.5"}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_naive_datetime",
        _table([{"name": "a", "type": "datetime", "default": "2024-01-01T00:00:00"}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_bad_date",
        _table([{"name": "a", "type": "date", "default": "2024-13-01"}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_bad_uuid",
        _table([{"name": "a", "type": "uuid", "default": "not-a-uuid"}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_bad_base64",
        _table([{"name": "a", "type": "binary", "default": "%%%"}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_now_on_text",
        _table([{"name": "a", "type": "text", "default": {"function": "now"}}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_unknown_function",
        _table([{"name": "a", "type": "datetime", "default": {"function": "pg_sleep"}}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "default_raw_sql",
        _table([{"name": "a", "type": "text", "default": {"raw": "now()"}}]),
        "database.changes[0].columns[0].default",
    ),
    (
        "duplicate_column",
        _table([{"name": "a", "type": "text"}, {"name": "a", "type": "text"}]),
        "database.changes[0].columns[1].name",
    ),
    (
        "two_primary_keys",
        _table(
            [
                {"name": "a", "type": "integer", "primary_key": True},
                {"name": "b", "type": "integer", "primary_key": True},
            ]
        ),
        "database.changes[0].columns",
    ),
    (
        "boolean_primary_key",
        _table([{"name": "a", "type": "boolean", "primary_key": True}]),
        "database.changes[0].columns[0].primary_key",
    ),
    ("id_not_primary", _table([{"name": "id", "type": "integer"}]), "database.changes[0].columns"),
    ("empty_columns", _table([]), "database.changes[0].columns"),
    (
        "unknown_column_attribute",
        _table([{"name": "a", "type": "text", "check": "a > 0"}]),
        "database.changes[0].columns[0].check",
    ),
    (
        "unknown_change_attribute",
        {"database": {"changes": [{"type": "drop_table", "table": "t", "cascade": True}]}},
        "database.changes[0].cascade",
    ),
    (
        "modify_primary_key",
        {
            "database": {
                "changes": [
                    {"type": "modify_column", "table": "t", "column": {"name": "a", "primary_key": True}}
                ]
            }
        },
        "database.changes[0].column.primary_key",
    ),
    (
        "modify_nothing",
        {"database": {"changes": [{"type": "modify_column", "table": "t", "column": {"name": "a"}}]}},
        "database.changes[0].column",
    ),
    (
        "drop_column_not_name",
        {"database": {"changes": [{"type": "drop_column", "table": "t", "column": {"name": "a"}}]}},
        "database.changes[0].column",
    ),
    (
        "rename_to_reserved",
        {"database": {"changes": [{"type": "rename_column", "table": "t", "from": "a", "to": "order"}]}},
        "database.changes[0].to",
    ),
    (
        "rename_table_same",
        {"database": {"changes": [{"type": "rename_table", "from": "t", "to": "t"}]}},
        "database.changes[0].to",
    ),
    ("flags_not_object", {"feature_flags": ["a"]}, "feature_flags"),
    ("flag_bad_name", {"feature_flags": {"Bad Name": True}}, "feature_flags.Bad Name"),
    ("flag_bad_value", {"feature_flags": {"beta": 1}}, "feature_flags.beta"),
    ("flag_value_injection", {"feature_flags": {"beta": "x'; DROP TABLE t; --"}}, "feature_flags.beta"),
    ("unknown_section", {"database": {"changes": []}, "scripts": ["rm -rf /"]}, "scripts"),
]


@pytest.mark.parametrize(("label", "raw", "path"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_normalize_bundle__bad_input__bundle_error_names_the_field(label, raw, path):
    errors = _errors(raw)
    assert path in errors, errors


def test_normalize_bundle__more_than_max_changes__refused():
    changes = [{"type": "drop_table", "table": f"t{i}"} for i in range(6)]
    errors = _errors({"database": {"changes": changes}}, max_changes=5)
    assert "at most 5" in errors["database.changes"]


def test_normalize_bundle__more_than_max_flags__refused_500_kept():
    flags = {f"flag_{i}": i % 2 == 0 for i in range(MAX_FLAGS)}
    assert normalize_bundle({"feature_flags": flags})["feature_flags"] == flags
    errors = _errors({"feature_flags": {**flags, "one_more": True}})
    assert f"at most {MAX_FLAGS} feature flags" in errors["feature_flags"]


def test_normalize_bundle__injection_in_default__kept_as_a_literal_string():
    raw = _table([{"name": "note", "type": "text", "default": "'); DROP TABLE t; --"}])
    bundle = normalize_bundle(raw)
    assert bundle["database"]["changes"][0]["columns"][1]["default"] == "'); DROP TABLE t; --"


def test_normalize_bundle__create_table_without_pk__implicit_bigint_id_first():
    bundle = normalize_bundle(_table([{"name": "title", "type": "string", "max_length": 200}]))
    columns = bundle["database"]["changes"][0]["columns"]
    assert [c["name"] for c in columns] == ["id", "title"]
    assert columns[0] == {
        "name": "id",
        "type": "bigint",
        "nullable": False,
        "default": None,
        "unique": False,
        "primary_key": True,
        "max_length": None,
        "precision": None,
        "scale": None,
    }
    assert columns[1]["nullable"] is True and columns[1]["unique"] is False and columns[1]["default"] is None


def test_normalize_bundle__explicit_pk__no_implicit_id_and_not_nullable():
    bundle = normalize_bundle(
        _table([{"name": "code", "type": "string", "max_length": 8, "primary_key": True}])
    )
    columns = bundle["database"]["changes"][0]["columns"]
    assert [c["name"] for c in columns] == ["code"]
    assert columns[0]["nullable"] is False


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ({"type": "decimal", "precision": 10, "scale": 2, "default": "1.5"}, "1.50"),
        ({"type": "decimal", "precision": 10, "scale": 2, "default": 3}, "3.00"),
        ({"type": "float", "default": 1}, "1.0"),
        ({"type": "datetime", "default": "2024-01-15T12:00:00+02:00"}, "2024-01-15T10:00:00+00:00"),
        ({"type": "time", "default": "07:05"}, "07:05:00"),
        (
            {"type": "uuid", "default": "12345678123456781234567812345678"},
            "12345678-1234-5678-1234-567812345678",
        ),
        ({"type": "binary", "default": "AQI="}, "AQI="),
        ({"type": "json", "default": {"b": [1, {"c": None}], "a": "x"}}, {"a": "x", "b": [1, {"c": None}]}),
        ({"type": "datetime", "default": {"function": "now"}}, {"function": "now"}),
        ({"type": "uuid", "default": {"function": "uuid"}}, {"function": "uuid"}),
    ],
)
def test_normalize_bundle__defaults__normalized_to_canonical_json(column, expected):
    bundle = normalize_bundle(_table([{"name": "v", **column}]))
    assert bundle["database"]["changes"][0]["columns"][1]["default"] == expected


def test_normalize_bundle__flags__true_false_and_plan_names():
    bundle = normalize_bundle(
        {"feature_flags": {"custom_domains": True, "beta": "false", "analytics": "pro-plan"}}
    )
    assert bundle == {
        "database": {"changes": []},
        "feature_flags": {"custom_domains": True, "beta": False, "analytics": "pro-plan"},
    }


def test_normalize_bundle__rename_table__table_is_from():
    bundle = normalize_bundle({"database": {"changes": [{"type": "rename_table", "from": "a", "to": "b"}]}})
    assert bundle["database"]["changes"][0] == {"type": "rename_table", "table": "a", "from": "a", "to": "b"}


def test_bundle_sha256__documented_recipe__reproducible_and_key_order_free():
    one = normalize_bundle(_table([{"name": "title", "type": "text", "default": "é"}]))
    two = normalize_bundle(
        json.loads(json.dumps(_table([{"default": "é", "type": "text", "name": "title"}])))
    )
    recipe = hashlib.sha256(
        json.dumps(one, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    ).hexdigest()
    assert sha256_hex(one) == sha256_hex(two) == recipe
    assert b"\\u00e9" in canonical_json(one)


def test_normalize_bundle__normalized_input__is_a_fixed_point():
    raw = _table([{"name": "price", "type": "decimal", "precision": 8, "scale": 3, "default": "2"}])
    once = normalize_bundle(raw)
    assert normalize_bundle(once) == once


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8) | st.floats(allow_nan=False),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
change_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["create_table", "add_column", "modify_column", "drop_column", "rename_column"]
        )
    },
    optional={
        "table": json_values,
        "column": json_values,
        "columns": json_values,
        "from": json_values,
        "to": json_values,
    },
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"database": st.fixed_dictionaries({"changes": st.lists(change_like, max_size=3)})}
        ),
    )
)
def test_normalize_bundle__arbitrary_json__bundle_error_or_valid_never_type_error(raw):
    try:
        bundle = normalize_bundle(raw)
    except BundleError as exc:
        assert exc.details
    else:
        assert normalize_bundle(bundle) == bundle


def test_normalize_bundle__deeply_nested_json_default__bundle_error_not_crash():
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    errors = _errors(_table([{"name": "doc", "type": "json", "default": nested}]))
    assert "database.changes[0].columns[0].default" in errors


def test_normalize_bundle__nan_float_default__bundle_error():
    errors = _errors(_table([{"name": "ratio", "type": "float", "default": float("nan")}]))
    assert "database.changes[0].columns[0].default" in errors
