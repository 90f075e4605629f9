"""Extreme literals at prepare: a 4xx in the envelope naming the field, or a release, never a 500.

Issue 13 point 7: fuzzed prepare requests gave 500s from a decimal default such as "1e400", a scale
larger than the precision at big values, and datetime defaults near year 1 or 9999 with an offset.
Every literal a bundle can carry (defaults of every column type, precisions, scales, lengths) is
generated here at and beyond its edges and sent through POST /api/releases/prepare against a SQLite
and a PostgreSQL target. The property: a 400 `validation_error` whose details name a field of the
bundle, or a release whose dry-run ran on the target (a literal the bundle accepts, the target
accepts too). The default profile runs a handful of examples per dialect; the `slow` test runs many.
"""

from __future__ import annotations

import datetime as dt
import decimal

import pytest
from django.contrib.auth import get_user_model
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from releases import engine, services
from releases.engine.bundle import COLUMN_TYPES
from tenants.services import tenant_setup, token_issue

pytestmark = pytest.mark.django_db

FAST_EXAMPLES = 20
SLOW_EXAMPLES = 400

# The table every add_column / modify_column example works on: one nullable column per type.
BASE_COLUMNS = [
    {"name": f"c_{kind}", "type": kind}
    | ({"max_length": 20} if kind == "string" else {})
    | ({"precision": 10, "scale": 2} if kind == "decimal" else {})
    for kind in COLUMN_TYPES
]


class Literals:
    """A tenant on one dialect whose staging has the `base` table, and an API client for it."""

    def __init__(self, client: APIClient, vendor: str) -> None:
        self.client = client
        self.vendor = vendor

    def prepare(self, change: dict):
        body = {"from_env": "dev", "to_env": "staging", "bundle_data": {"database": {"changes": [change]}}}
        return self.client.post("/api/releases/prepare", body, format="json")


@pytest.fixture
def literals(request, database_factory, settings) -> Literals:
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"releases": "100000/min", "tools": "100000/min"},
    }
    urls = {stage: database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="lit", environments=urls, admins=["lit-admin"])
    admin = get_user_model().objects.get(username="lit-admin")
    release = services.release_prepare(
        tenant=tenant,
        user=admin,
        from_env="dev",
        to_env="staging",
        bundle_data={
            "database": {"changes": [{"type": "create_table", "table": "base", "columns": BASE_COLUMNS}]}
        },
    )
    assert release.status == "prepared", release.error_message
    assert services.release_promote(release=release, user=admin).status == "promoted"
    _, token = token_issue(tenant=tenant, user=admin)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG="lit")
    client.raise_request_exception = False  # a 500 is an answer to assert on, not a test error
    with engine.open_target(urls["staging"]) as target:
        vendor = target.vendor
    return Literals(client, vendor)


# --------------------------------------------------------------------------------------------------
# Strategies: literals at and beyond their edges
# --------------------------------------------------------------------------------------------------

EXPONENTS = [
    0,
    1,
    15,
    38,
    131072,
    16383,
    307,
    308,
    309,
    324,
    400,
    999,
    1000,
    1001,
    10**6,
    10**9,
    10**18,
    10**30,
]
decimal_texts = st.one_of(
    st.builds(
        lambda digits, sign, exponent: f"{digits}e{sign}{exponent}",
        st.integers(0, 10**6),
        st.sampled_from(["", "-", "+"]),
        st.sampled_from(EXPONENTS),
    ),
    st.integers(1, 1100).map(lambda n: "9" * n),
    st.integers(1, 1100).map(lambda n: "0." + "0" * (n - 1) + "1"),
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(
        [
            "NaN",
            "-Infinity",
            "sNaN",
            " 1.5 ",
            "1_000",
            "",
            "-",
            "0e-1000000",
            "-0",
            "1e400",
            "0E+400",
            "1.",
            ".5",
        ]
    ),
)
decimal_defaults = st.one_of(decimal_texts, st.integers(-(10**400), 10**400), st.floats(allow_nan=False))
precisions = st.one_of(
    st.sampled_from([-1, 0, 1, 2, 38, 131072, 999, 1000, 1001, 10**20]), st.integers(1, 1000)
)

YEARS = st.one_of(st.sampled_from([0, 1, 2, 1969, 1970, 2038, 9998, 9999, 10000]), st.integers(1, 9999))
OFFSETS = st.one_of(
    st.sampled_from(
        ["Z", "+00:00", "-12:00", "+14:00", "+23:59", "-23:59", "+01:00", "-00:01", "", "+24:00"]
    ),
    st.integers(-1439, 1439).map(
        lambda minutes: f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    ),
)
EDGE_DAYS = st.sampled_from([(1, 1), (12, 31), (2, 29), (2, 28), (1, 2), (12, 30)])
EDGE_TIMES = st.sampled_from(
    ["00:00:00", "23:59:59", "23:59:59.999999", "00:00", "12:00:00.5", "24:00:00", "23:59:60"]
)
date_texts = st.one_of(
    st.builds(lambda year, day: f"{year:04d}-{day[0]:02d}-{day[1]:02d}", YEARS, EDGE_DAYS),
    st.sampled_from(["0000-01-01", "10000-01-01", "-0001-01-01", "+10000-01-01", "2024-02-30", "20240101"]),
)
datetime_texts = st.one_of(
    st.builds(lambda date, time, offset: f"{date}T{time}{offset}", date_texts, EDGE_TIMES, OFFSETS),
    st.datetimes(timezones=st.integers(-1439, 1439).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))).map(
        dt.datetime.isoformat
    ),
)
time_texts = st.one_of(EDGE_TIMES, st.builds(lambda time, offset: time + offset, EDGE_TIMES, OFFSETS))
INTEGER_EDGES = [
    bound + delta
    for bound in (2**15, -(2**15), 2**31, -(2**31), 2**63, -(2**63), 10**400)
    for delta in (-2, -1, 0, 1)
]
integer_defaults = st.one_of(
    st.sampled_from(INTEGER_EDGES),
    st.integers(),
    st.sampled_from([1.0, 1e308, -0.0, "1", True]),
)
float_defaults = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(
        [1e308, -1.7976931348623157e308, 5e-324, -5e-324, 2.2250738585072014e-308, -0.0, 10**400, 2**1024]
    ),
    st.sampled_from(["1e400", "-1e400", "5e-324", "1e-400", "-0", "nan", "inf", "1_0", "0x10", " 1.5 ", ""]),
)
text_defaults = st.text(max_size=30)


@st.composite
def column_literals(draw) -> dict:
    """A column of a random type with extreme sizes and an extreme default (attributes may be left out)."""
    kind = draw(st.sampled_from(COLUMN_TYPES))
    column: dict = {"type": kind}
    if kind == "decimal":
        column["precision"] = draw(precisions)
        column["scale"] = draw(
            st.one_of(
                st.sampled_from([-1, 0, 1, 999, 1000, 1001]),
                st.integers(0, 2).map(lambda d, p=column["precision"]: p + d - 1),
                st.integers(0, 1000),
            )
        )
        default = draw(decimal_defaults)
    elif kind == "datetime":
        default = draw(st.one_of(datetime_texts, st.just({"function": "now"})))
    elif kind == "date":
        default = draw(date_texts)
    elif kind == "time":
        default = draw(time_texts)
    elif kind in ("integer", "bigint", "smallint"):
        default = draw(integer_defaults)
    elif kind == "float":
        default = draw(float_defaults)
    elif kind == "string":
        column["max_length"] = draw(st.sampled_from([0, 1, 2, 255, 10_485_760, 10_485_761]))
        default = draw(text_defaults)
    elif kind == "json":
        default = draw(
            st.recursive(
                st.one_of(
                    st.none(),
                    st.booleans(),
                    st.sampled_from(INTEGER_EDGES),
                    st.floats(allow_nan=False, allow_infinity=False),
                    text_defaults,
                ),
                lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_defaults, inner, max_size=3),
                max_leaves=6,
            )
        )
    elif kind == "uuid":
        default = draw(st.one_of(st.uuids().map(str), st.just({"function": "uuid"}), text_defaults))
    elif kind == "binary":
        default = draw(st.sampled_from(["", "AA==", "AAECAwQ=", "not base64", "//8="]))
    else:
        default = draw(st.one_of(st.booleans(), text_defaults))
    column["default"] = draw(st.one_of(st.just(default), st.none())) if kind != "decimal" else default
    for key in [key for key in column if key != "type"]:
        if draw(st.integers(0, 9)) == 0:
            del column[key]  # an attribute left out: defaults and required attributes are judged too
    return column


@st.composite
def literal_changes(draw) -> dict:
    column = draw(column_literals())
    shape = draw(st.sampled_from(["create_table", "add_column", "modify_column", "modify_retype"]))
    if shape == "create_table":
        return {"type": "create_table", "table": "lit", "columns": [{"name": "v", **column}]}
    if shape == "add_column":
        nullable = draw(st.booleans())
        return {
            "type": "add_column",
            "table": "base",
            "column": {"name": "v", "nullable": nullable, **column},
        }
    if shape == "modify_column":  # same type: only sizes and default change
        modification = {key: value for key, value in column.items() if key != "type"}
        if not modification:
            modification = {"nullable": True}
        return {
            "type": "modify_column",
            "table": "base",
            "column": {"name": f"c_{column['type']}", **modification},
        }
    source = draw(st.sampled_from(COLUMN_TYPES))
    return {"type": "modify_column", "table": "base", "column": {"name": f"c_{source}", **column}}


# --------------------------------------------------------------------------------------------------
# The property
# --------------------------------------------------------------------------------------------------


def retyped(change: dict) -> bool:
    """A modify_column that changes the column's type (base's columns are named c_<type>)."""
    column = change["column"]
    return change["type"] == "modify_column" and "type" in column and column["name"] != f"c_{column['type']}"


def assert_refused_or_prepared(literals: Literals, change: dict) -> int:
    """POST the change; a 400 naming a field of the change, or a release whose dry-run succeeded."""
    response = literals.prepare(change)
    note(f"{literals.vendor}: {change!r} -> {response.status_code} {response.content[:2000]!r}")
    assert response.status_code < 500, response.content
    body = response.json()
    if response.status_code == 201:
        data = body["data"]
        if data["status"] == "failed" and retyped(change):
            # A conversion the target refuses (PostgreSQL has no cast from integer to uuid): the
            # honest dry-run failure, reported as a failed release. Not a literal's fault.
            assert data["error_code"] == "dry_run_failed", data
            return 201
        assert data["status"] == "prepared", (
            f"the bundle accepted a literal the {literals.vendor} target refused: {data['error_message']}"
        )
        return 201
    assert response.status_code == 400, response.content
    assert body["success"] is False and body["error"]["code"] == "validation_error", body
    details = body["error"]["details"]
    # The bundle's own paths, or the body's (the parser refuses a NUL or lone surrogate anywhere).
    fields = ("database.changes[0]", "bundle_data.database.changes[0]")
    assert details and all(key.startswith(fields) for key in details), details
    return 400


def run_property(literals: Literals, examples: int) -> None:
    statuses: list[int] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    @given(change=literal_changes())
    def check(change: dict) -> None:
        statuses.append(assert_refused_or_prepared(literals, change))

    check()
    assert statuses


def test_prepare__extreme_literals__refused_4xx_or_prepared_never_500(literals):
    run_property(literals, FAST_EXAMPLES)


@pytest.mark.slow
def test_prepare__extreme_literals_many__refused_4xx_or_prepared_never_500(literals):
    run_property(literals, SLOW_EXAMPLES)


# --------------------------------------------------------------------------------------------------
# The inputs of the report, and their neighbours at the edges
# --------------------------------------------------------------------------------------------------

REFUSED = [
    ("decimal 1e400", {"type": "decimal", "precision": 10, "scale": 2, "default": "1e400"}, "default"),
    (
        "decimal 1e1000 at max precision",
        {"type": "decimal", "precision": 1000, "scale": 0, "default": "1e1000"},
        "default",
    ),
    (
        "decimal huge exponent",
        {"type": "decimal", "precision": 10, "default": "1e999999999999999999"},
        "default",
    ),
    (
        "decimal tiny exponent",
        {"type": "decimal", "precision": 10, "scale": 2, "default": "1e-999999999999"},
        "default",
    ),
    (
        "scale above precision, big value",
        {"type": "decimal", "precision": 2, "scale": 1000, "default": "1e400"},
        "scale",
    ),
    (
        "scale above precision at max",
        {"type": "decimal", "precision": 1000, "scale": 1001, "default": "9" * 1000},
        "scale",
    ),
    ("decimal NaN", {"type": "decimal", "precision": 10, "default": "NaN"}, "default"),
    ("precision 1001", {"type": "decimal", "precision": 1001, "default": "1"}, "precision"),
    ("precision 10**20", {"type": "decimal", "precision": 10**20, "default": "9"}, "precision"),
    ("datetime 9999 -12:00", {"type": "datetime", "default": "9999-12-31T23:59:59-12:00"}, "default"),
    ("datetime 0001 +01:00", {"type": "datetime", "default": "0001-01-01T00:00:00+01:00"}, "default"),
    ("datetime 9999 -00:01", {"type": "datetime", "default": "9999-12-31T23:59:00-00:01"}, "default"),
    ("datetime 0001 +23:59", {"type": "datetime", "default": "0001-01-01T23:58:59+23:59"}, "default"),
    ("date year 0", {"type": "date", "default": "0000-12-31"}, "default"),
    ("date year 10000", {"type": "date", "default": "10000-01-01"}, "default"),
    ("time with offset", {"type": "time", "default": "12:00:00+01:00"}, "default"),
    ("time 24:00", {"type": "time", "default": "24:00:00"}, "default"),
    ("bigint 2**63", {"type": "bigint", "default": 2**63}, "default"),
    ("integer 10**400", {"type": "integer", "default": 10**400}, "default"),
    ("float 10**400", {"type": "float", "default": 10**400}, "default"),
    ("float 2**1024", {"type": "float", "default": 2**1024}, "default"),
    ("float 1e400", {"type": "float", "default": "1e400"}, "default"),
    ("float 1e-400", {"type": "float", "default": "1e-400"}, "default"),
]

ACCEPTED = [
    (
        "decimal at max precision",
        {"type": "decimal", "precision": 1000, "scale": 0, "default": "9" * 1000},
        "9" * 1000,
    ),
    (
        "decimal all scale",
        {"type": "decimal", "precision": 1000, "scale": 1000, "default": "0." + "9" * 1000},
        "0." + "9" * 1000,
    ),
    ("decimal exponent", {"type": "decimal", "precision": 10, "scale": 2, "default": "1.5e3"}, "1500.00"),
    (
        "decimal zero, huge exponent",
        {"type": "decimal", "precision": 5, "scale": 1, "default": "0e999999999"},
        "0.0",
    ),
    (
        "datetime 9999 UTC",
        {"type": "datetime", "default": "9999-12-31T23:59:59.999999+00:00"},
        "9999-12-31T23:59:59.999999+00:00",
    ),
    (
        "datetime 9999 east",
        {"type": "datetime", "default": "9999-12-31T23:59:59+14:00"},
        "9999-12-31T09:59:59+00:00",
    ),
    (
        "datetime 0001 UTC",
        {"type": "datetime", "default": "0001-01-01T00:00:00Z"},
        "0001-01-01T00:00:00+00:00",
    ),
    (
        "datetime 0001 west",
        {"type": "datetime", "default": "0001-01-01T00:00:00-12:00"},
        "0001-01-01T12:00:00+00:00",
    ),
    ("date 0001", {"type": "date", "default": "0001-01-01"}, "0001-01-01"),
    ("date 9999", {"type": "date", "default": "9999-12-31"}, "9999-12-31"),
    ("bigint min", {"type": "bigint", "default": -(2**63)}, -(2**63)),
    ("float max", {"type": "float", "default": 1.7976931348623157e308}, "1.7976931348623157e+308"),
    (
        "json big float",
        {"type": "json", "default": [1.809763133428521e16, -0.0, 1e-7]},
        [18097631334285210, 0.0, 1e-7],
    ),
    ("float subnormal", {"type": "float", "default": "5e-324"}, "5e-324"),
    ("float minus zero", {"type": "float", "default": "-0"}, "0.0"),
    ("decimal minus zero", {"type": "decimal", "precision": 3, "scale": 1, "default": "-0"}, "0.0"),
    (
        "float smallest normal",
        {"type": "float", "default": 2.2250738585072014e-308},
        "2.2250738585072014e-308",
    ),
]


@pytest.mark.parametrize(("label", "column", "field"), REFUSED, ids=[case[0] for case in REFUSED])
def test_prepare__out_of_range_literal__400_names_the_field(literals, label, column, field):
    for change in (
        {"type": "create_table", "table": "lit", "columns": [{"name": "v", **column}]},
        {"type": "add_column", "table": "base", "column": {"name": "v", **column}},
        {
            "type": "modify_column",
            "table": "base",
            "column": {"name": f"c_{column['type']}", **{k: v for k, v in column.items() if k != "type"}},
        },
        {  # another column's type changed to this one: the default is judged with the sizes given
            "type": "modify_column",
            "table": "base",
            "column": {"name": "c_string" if column["type"] != "string" else "c_text", **column},
        },
    ):
        response = literals.prepare(change)
        assert response.status_code == 400, (change, response.content)
        error = response.json()["error"]
        assert error["code"] == "validation_error", error
        path = "columns[0]" if change["type"] == "create_table" else "column"
        assert f"database.changes[0].{path}.{field}" in error["details"], error


@pytest.mark.parametrize(("label", "column", "expected"), ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_prepare__literal_at_the_edge__prepared_on_the_target(literals, label, column, expected):
    response = literals.prepare({"type": "add_column", "table": "base", "column": {"name": "v", **column}})
    assert response.status_code == 201, response.content
    data = response.json()["data"]
    assert data["status"] == "prepared", data["error_message"]
    assert data["bundle"]["database"]["changes"][0]["column"]["default"] == expected


def test_normalize_bundle__decimal_text__never_expands_a_huge_exponent():
    """A decimal default with no precision to bound it (modify_column of the default alone) is
    bounded by the largest decimal the bundle allows, not written out digit by digit."""
    with pytest.raises(engine.BundleError) as caught:
        engine.normalize_bundle(
            {
                "database": {
                    "changes": [
                        {
                            "type": "modify_column",
                            "table": "t",
                            "column": {"name": "d", "type": "decimal", "default": "1e999999999999999999"},
                        }
                    ]
                }
            }
        )
    assert "database.changes[0].column.default" in caught.value.details
    decimal.Decimal("1e999999999999999999")  # Python accepts it; the bundle must not format it


@pytest.mark.parametrize(
    ("name", "default"),
    [
        ("c_float", "-0"),
        ("c_float", -0.0),
        ("c_json", [1.809763133428521e16]),
        ("c_decimal", "1.5e1"),
        ("c_datetime", "9999-12-31T23:59:59+05:00"),
    ],
)
def test_prepare__modify_default_without_type__the_target_gets_the_normalized_value(literals, name, default):
    """A modify_column that gives only a default: the SQL renders the value the column's type makes
    of it, the same one the expected schema holds, on both dialects (a dry-run failure before)."""
    response = literals.prepare(
        {"type": "modify_column", "table": "base", "column": {"name": name, "default": default}}
    )
    assert response.status_code == 201, response.content
    data = response.json()["data"]
    assert data["status"] == "prepared", data["error_message"]
