"""Bundle validation and normalization, canonical JSON and hashes.

Everything here is pure: a raw bundle (whatever JSON the caller sent) goes in, a normalized bundle
with every implicit value filled in comes out, or a BundleError whose `details` maps field paths
(`database.changes[2].columns[0].type`) to messages. Nothing that is not a dict or list where one is
expected ever escapes as a TypeError.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import decimal
import hashlib
import json
import math
import re
import sys
import uuid
from collections.abc import Callable
from typing import Any

from .errors import BundleError

COLUMN_TYPES: tuple[str, ...] = (
    "string",
    "text",
    "integer",
    "bigint",
    "smallint",
    "boolean",
    "date",
    "datetime",
    "time",
    "decimal",
    "float",
    "uuid",
    "json",
    "binary",
)
CHANGE_TYPES: tuple[str, ...] = (
    "create_table",
    "add_column",
    "drop_column",
    "modify_column",
    "drop_table",
    "rename_column",
    "rename_table",
)
PRIMARY_KEY_TYPES = ("integer", "bigint", "smallint", "string", "uuid")
MAX_STRING_LENGTH = 10_485_760
MAX_DECIMAL_PRECISION = 1000
INTEGER_RANGES = {
    "smallint": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "bigint": (-(2**63), 2**63 - 1),
}
COLUMN_KEYS = (
    "name",
    "type",
    "nullable",
    "default",
    "unique",
    "primary_key",
    "max_length",
    "precision",
    "scale",
)
RESERVED_PREFIXES = ("_rm_", "sqlite_")

IDENTIFIER_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
FLAG_NAME_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,99}$")

# PostgreSQL's reserved key words (pg_get_keywords() catcode R and T, PostgreSQL 15).
RESERVED_WORDS = frozenset(
    """all analyse analyze and any array as asc asymmetric authorization binary both case cast check
    collate collation column concurrently constraint create cross current_catalog current_date
    current_role current_schema current_time current_timestamp current_user default deferrable desc
    distinct do else end except false fetch for foreign freeze from full grant group having ilike in
    initially inner intersect into is isnull join lateral leading left like limit localtime
    localtimestamp natural not notnull null offset on only or order outer overlaps placing primary
    references returning right select session_user similar some symmetric system_user table
    tablesample then to trailing true union unique user using variadic verbose when where window
    with""".split()  # noqa: SIM905 - readable as the catalog lists them
)

_CHANGE_KEYS = {
    "create_table": {"type", "table", "columns"},
    "add_column": {"type", "table", "column"},
    "drop_column": {"type", "table", "column"},
    "modify_column": {"type", "table", "column"},
    "drop_table": {"type", "table"},
    "rename_column": {"type", "table", "from", "to"},
    "rename_table": {"type", "table", "from", "to"},
}


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII only, no NaN: the bytes every hash is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def bundle_sha256(bundle: dict) -> str:
    return sha256_hex(bundle)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def identifier_problem(value: Any, *, new: bool) -> str | None:
    """Why `value` is not an acceptable table or column name (None when it is)."""
    if not isinstance(value, str):
        return f"must be a string, got {_describe(value)}"
    if not IDENTIFIER_RE.match(value):
        return "must match ^[a-z_][a-z0-9_]{0,62}$ (lower-case letters, digits, underscores; at most 63)"
    if value.startswith(RESERVED_PREFIXES):
        return f"the prefixes {', '.join(RESERVED_PREFIXES)} are reserved"
    if new and value in RESERVED_WORDS:
        return f"'{value}' is a PostgreSQL reserved word"
    return None


class _Collector:
    def __init__(self) -> None:
        self.errors: dict[str, str] = {}

    def add(self, path: str, message: str) -> None:
        self.errors.setdefault(path, message)


def _check_identifier(value: Any, path: str, errors: _Collector, *, new: bool) -> str | None:
    problem = identifier_problem(value, new=new)
    if problem:
        errors.add(path, problem)
        return None
    return value


def _bool(value: Any, path: str, errors: _Collector, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        errors.add(path, f"must be true or false, got {_describe(value)}")
        return default
    return value


def _int_in(value: Any, path: str, errors: _Collector, low: int, high: int) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        errors.add(path, f"must be an integer, got {_describe(value)}")
        return None
    if not low <= value <= high:
        errors.add(path, f"must be between {low} and {high}")
        return None
    return value


def normalize_default(column: dict, value: Any) -> Any:
    """The canonical JSON form of a default for this column, or ValueError with the reason.

    `column` needs `type` and, where they apply, `max_length`, `precision`, `scale`.
    """
    column_type = column.get("type")
    if value is None:
        return None
    if isinstance(value, dict) and column_type != "json":
        return _function_default(column_type, value)
    normalize = _DEFAULT_NORMALIZERS.get(column_type) if isinstance(column_type, str) else None
    if normalize is None:
        raise ValueError("cannot be checked: the column type is unknown")
    return normalize(column, value)


def _function_default(column_type: Any, value: dict) -> dict:
    if set(value) != {"function"} or value.get("function") not in ("now", "uuid"):
        raise ValueError('a function default must be {"function": "now"} or {"function": "uuid"}')
    function = value["function"]
    if function == "now" and column_type != "datetime":
        raise ValueError('{"function": "now"} is only allowed on datetime columns')
    if function == "uuid" and column_type != "uuid":
        raise ValueError('{"function": "uuid"} is only allowed on uuid columns')
    return {"function": function}


def _text_default(column: dict, value: Any) -> str:
    column_type = column["type"]
    if not isinstance(value, str):
        raise ValueError(f"must be a string for a {column_type} column, got {_describe(value)}")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    max_length = column.get("max_length")
    if column_type == "string" and isinstance(max_length, int) and len(value) > max_length:
        raise ValueError(f"is longer than max_length {max_length}")
    return value


def _integer_default(column: dict, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, got {_describe(value)}")
    low, high = INTEGER_RANGES[column["type"]]
    if not low <= value <= high:
        raise ValueError(f"is out of range for {column['type']}")
    return value


def _boolean_default(column: dict, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_describe(value)}")
    return value


def _date_default(column: dict, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date string (YYYY-MM-DD)")
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError("must be an ISO 8601 date string (YYYY-MM-DD)") from None


def _datetime_default(column: dict, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 datetime string with an offset")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 datetime string with an offset") from None
    if parsed.tzinfo is None:
        raise ValueError("must carry a UTC offset (e.g. 2024-01-15T12:00:00+00:00)")
    return utc_isoformat(parsed)


def _time_default(column: dict, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 time string (HH:MM[:SS[.ffffff]])")
    try:
        parsed_time = dt.time.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 time string (HH:MM[:SS[.ffffff]])") from None
    if parsed_time.tzinfo is not None:
        raise ValueError("must not carry an offset (time columns have no time zone)")
    return parsed_time.isoformat()


def _decimal_default(column: dict, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError('must be a decimal written as a string (e.g. "1.10"), not a float')
    try:
        number = decimal.Decimal(str(value).strip())
    except (decimal.InvalidOperation, ValueError):  # ValueError: an int of over 4300 digits
        raise ValueError("is not a decimal number") from None
    if not number.is_finite():
        raise ValueError("must be a finite decimal")
    return format_decimal(number, column.get("precision"), column.get("scale"))


def _float_default(column: dict, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"must be a number, got {_describe(value)}")
    return repr(float_literal(value))


def _uuid_default(column: dict, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a UUID string")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("is not a valid UUID") from None


def _json_default(column: dict, value: Any) -> Any:
    try:
        canonical_json(value)
    except (TypeError, ValueError, RecursionError):
        raise ValueError(
            "must be a JSON value without NaN or Infinity, nested at most a few hundred levels"
        ) from None
    return json.loads(canonical_json(value), parse_float=jsonb_number)


def _binary_default(column: dict, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("must be base64 text")
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError("is not valid base64") from None
    return base64.b64encode(raw).decode("ascii")


_DEFAULT_NORMALIZERS: dict[str, Callable[[dict, Any], Any]] = {
    "string": _text_default,
    "text": _text_default,
    **{integer_type: _integer_default for integer_type in INTEGER_RANGES},
    "boolean": _boolean_default,
    "date": _date_default,
    "datetime": _datetime_default,
    "time": _time_default,
    "decimal": _decimal_default,
    "float": _float_default,
    "uuid": _uuid_default,
    "json": _json_default,
    "binary": _binary_default,
}


# The range of a datetime default, in UTC: Python's datetime (PostgreSQL's timestamptz reaches further).
DATETIME_MIN = dt.datetime.min.replace(tzinfo=dt.UTC)
DATETIME_MAX = dt.datetime.max.replace(tzinfo=dt.UTC)


def utc_isoformat(parsed: dt.datetime) -> str:
    """An aware datetime in UTC, ISO 8601; ValueError when UTC falls outside years 1..9999."""
    try:
        return parsed.astimezone(dt.UTC).isoformat()
    except OverflowError:
        raise ValueError(
            f"is out of range: in UTC it must fall between {DATETIME_MIN.isoformat()} and "
            f"{DATETIME_MAX.isoformat()}"
        ) from None


def float_literal(value: str | int | float) -> float:
    """A float default as the double both dialects store; ValueError when it is none or out of range.

    Out of range: beyond +-1.7976931348623157e+308 (infinite), or a non-zero literal so small that
    the double is 0. Subnormal doubles (down to 5e-324) are kept: both dialects store them.
    Minus zero is zero (PostgreSQL's default expression drops the sign, SQLite's keeps it).
    """
    try:
        number = float(value)
    except OverflowError:  # an integer beyond the double's range
        raise ValueError(f"is out of range for a float (at most +-{sys.float_info.max!r})") from None
    except (TypeError, ValueError):
        raise ValueError("is not a number") from None
    if not math.isfinite(number):  # NaN, or a literal like "1e400" or "inf"
        raise ValueError(f"must be a finite number within +-{sys.float_info.max!r}")
    if number == 0 and isinstance(value, str) and not _is_zero_text(value):
        raise ValueError(f"is too small for a float: it would be stored as 0 (the least is {5e-324!r})")
    return number if number else 0.0  # -0.0 is 0.0: PostgreSQL stores a default of -0.0 as 0


def jsonb_number(text: str) -> float | int:
    """A JSON number with a fraction or exponent as jsonb keeps it (numeric, never an exponent).

    PostgreSQL writes 1.809763133428521e+16 back as 18097631334285210 and -0.0 as 0.0: a default
    keeps the value a jsonb column shows, on both dialects.
    """
    if "e+" in text.lower():  # an integral float: repr writes 1e16 and above with an exponent
        return int(decimal.Decimal(text))
    number = float(text)
    return number if number else 0.0


def _is_zero_text(text: str) -> bool:
    try:
        return decimal.Decimal(text.strip()).is_zero()
    except decimal.InvalidOperation:
        return True  # float() read it, Decimal did not (no such text is known): judged by float()


def decimal_shape(number: decimal.Decimal) -> tuple[int, int]:
    """(digits before the point, digits after it) of a finite decimal, trailing zeros not counted.

    Read from the digits and the exponent, with no arithmetic: "1e999999999999999999" costs what
    "1e3" costs, where quantize or formatting would raise or try to write out every digit.
    """
    _, digits, exponent = number.as_tuple()
    if not isinstance(exponent, int):  # "n", "N" or "F": NaN, sNaN or Infinity
        raise ValueError("must be a finite decimal")
    significant = len(digits)
    while significant > 0 and digits[significant - 1] == 0:
        significant -= 1
        exponent += 1
    if significant == 0:  # zero, whatever its exponent
        return 0, 0
    return max(significant + exponent, 0), max(-exponent, 0)


def format_decimal(number: decimal.Decimal, precision: Any, scale: Any) -> str:
    """A finite decimal as a string with exactly `scale` places; ValueError when it does not fit.

    Without an int precision and scale (a modify_column that names neither) the bound is the
    largest decimal a bundle can declare: MAX_DECIMAL_PRECISION digits either side of the point.
    """
    integer_digits, places = decimal_shape(number)
    if not (isinstance(scale, int) and isinstance(precision, int)):
        if integer_digits > MAX_DECIMAL_PRECISION or places > MAX_DECIMAL_PRECISION:
            raise ValueError(f"does not fit the largest decimal, decimal({MAX_DECIMAL_PRECISION}, 0..)")
        exponent = number.as_tuple().exponent
        shown = min(max(-exponent, 0), MAX_DECIMAL_PRECISION) if isinstance(exponent, int) else 0
        return _quantized(number, 2 * MAX_DECIMAL_PRECISION, shown)
    if not 0 <= scale <= precision <= MAX_DECIMAL_PRECISION:  # the sizes' own errors name them
        raise ValueError(f"cannot be checked against decimal({precision}, {scale})")
    if places > scale:
        raise ValueError(f"has more than {scale} decimal places")
    if integer_digits > precision - scale:
        raise ValueError(f"does not fit decimal({precision}, {scale})")
    return _quantized(number, precision, scale)


def _quantized(number: decimal.Decimal, digits: int, places: int) -> str:
    """`number` written with exactly `places` decimals (it fits in `digits` significant ones)."""
    with decimal.localcontext() as context:
        context.prec = digits + 5
        context.Emax = decimal.MAX_EMAX
        context.Emin = decimal.MIN_EMIN
        quantized = number.quantize(decimal.Decimal(1).scaleb(-places), rounding=decimal.ROUND_HALF_EVEN)
    if quantized.is_zero():
        quantized = quantized.copy_abs()  # "-0.00" is 0.00 to both dialects
    return f"{quantized:f}"


def check_column_attributes(column: dict, path: str, errors: _Collector) -> None:
    """Cross-field checks on a complete column (type-dependent sizes, pk rules, default)."""
    column_type = column.get("type")
    if column_type == "string":
        if column.get("max_length") is None:
            errors.add(f"{path}.max_length", f"is required for string columns (1..{MAX_STRING_LENGTH})")
    elif column.get("max_length") is not None:
        errors.add(f"{path}.max_length", "only applies to string columns")
    if column_type == "decimal":
        if column.get("precision") is None:
            errors.add(f"{path}.precision", f"is required for decimal columns (1..{MAX_DECIMAL_PRECISION})")
        elif column.get("scale") is not None and column["scale"] > column["precision"]:
            errors.add(f"{path}.scale", "must not exceed precision")
    else:
        for key in ("precision", "scale"):
            if column.get(key) is not None:
                errors.add(f"{path}.{key}", "only applies to decimal columns")
    if column.get("primary_key") and column_type not in PRIMARY_KEY_TYPES:
        errors.add(f"{path}.primary_key", f"a primary key must be one of {', '.join(PRIMARY_KEY_TYPES)}")
    if column.get("default") is not None and column_type in COLUMN_TYPES:
        try:
            column["default"] = normalize_default(column, column["default"])
        except ValueError as exc:
            errors.add(f"{path}.default", str(exc))


def _normalize_column(raw: Any, path: str, errors: _Collector, *, new_name: bool) -> dict | None:
    if not isinstance(raw, dict):
        errors.add(path, f"must be an object, got {_describe(raw)}")
        return None
    for key in raw:
        if key not in COLUMN_KEYS:
            errors.add(f"{path}.{key}" if isinstance(key, str) else path, "unknown attribute")
    column: dict[str, Any] = {key: None for key in COLUMN_KEYS}
    column["name"] = _check_identifier(raw.get("name"), f"{path}.name", errors, new=new_name)
    column_type = raw.get("type")
    if not isinstance(column_type, str) or column_type not in COLUMN_TYPES:
        errors.add(f"{path}.type", f"must be one of {', '.join(COLUMN_TYPES)}")
        column_type = None
    column["type"] = column_type
    column["primary_key"] = _bool(raw.get("primary_key"), f"{path}.primary_key", errors, False)
    column["unique"] = _bool(raw.get("unique"), f"{path}.unique", errors, False)
    column["nullable"] = _bool(raw.get("nullable"), f"{path}.nullable", errors, not column["primary_key"])
    if column["primary_key"]:
        if raw.get("nullable") is True:
            errors.add(f"{path}.nullable", "a primary key cannot be nullable")
        column["nullable"] = False
        column["unique"] = False
    if raw.get("max_length") is not None:
        column["max_length"] = _int_in(raw["max_length"], f"{path}.max_length", errors, 1, MAX_STRING_LENGTH)
    if raw.get("precision") is not None:
        column["precision"] = _int_in(raw["precision"], f"{path}.precision", errors, 1, MAX_DECIMAL_PRECISION)
    if raw.get("scale") is not None:
        column["scale"] = _int_in(raw["scale"], f"{path}.scale", errors, 0, MAX_DECIMAL_PRECISION)
    if column_type == "decimal" and column["scale"] is None and column["precision"] is not None:
        column["scale"] = 0
    column["default"] = raw.get("default")
    if column_type is not None:
        check_column_attributes(column, path, errors)
    return column


# The integer attributes a modify_column may give, with their bounds.
_MODIFIED_LIMITS = {
    "max_length": (1, MAX_STRING_LENGTH),
    "precision": (1, MAX_DECIMAL_PRECISION),
    "scale": (0, MAX_DECIMAL_PRECISION),
}


def _modified_type_of(raw: dict[str, Any]) -> dict[str, Any]:
    """The column type a modify_column that gives `type` sets, to judge its new default against (its
    limits only when they are integers or absent: bad ones are reported on their own keys)."""
    probe = {
        "type": raw["type"],
        "max_length": raw.get("max_length"),
        "precision": raw.get("precision"),
    }
    probe["scale"] = raw.get("scale", 0 if raw["type"] == "decimal" else None)
    if not all(isinstance(probe[k], (int, type(None))) for k in ("max_length", "precision", "scale")):
        probe.update(max_length=None, precision=None, scale=None)
    return probe


def _normalize_modification(raw: Any, path: str, errors: _Collector) -> dict | None:
    """A modify_column's column: `name` plus only the attributes given."""
    if not isinstance(raw, dict):
        errors.add(path, f"must be an object, got {_describe(raw)}")
        return None
    result: dict[str, Any] = {"name": _check_identifier(raw.get("name"), f"{path}.name", errors, new=False)}
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in COLUMN_KEYS:
            errors.add(f"{path}.{key}" if isinstance(key, str) else path, "unknown attribute")
            continue
        if key == "primary_key":
            errors.add(f"{path}.primary_key", "modify_column may not change primary_key")
            continue
        if key == "type":
            if not isinstance(value, str) or value not in COLUMN_TYPES:
                errors.add(f"{path}.type", f"must be one of {', '.join(COLUMN_TYPES)}")
                continue
        elif key in ("nullable", "unique"):
            if not isinstance(value, bool):
                errors.add(f"{path}.{key}", f"must be true or false, got {_describe(value)}")
                continue
        elif key in _MODIFIED_LIMITS and value is not None:
            value = _int_in(value, f"{path}.{key}", errors, *_MODIFIED_LIMITS[key])
        elif key == "default" and value is not None and raw.get("type") in COLUMN_TYPES:
            try:
                value = normalize_default(_modified_type_of(raw), value)
            except ValueError as exc:
                errors.add(f"{path}.default", str(exc))
                continue
        result[key] = value
    if len(result) == 1 and result["name"] is not None:
        errors.add(path, "names no attribute to change")
    _check_scale(result, path, errors)
    return result


def _check_scale(modification: dict, path: str, errors: _Collector) -> None:
    """A modify_column that gives both sizes: the scale must fit the precision (as on a new column)."""
    precision, scale = modification.get("precision"), modification.get("scale")
    if isinstance(precision, int) and isinstance(scale, int) and scale > precision:
        errors.add(f"{path}.scale", "must not exceed precision")


# One branch per change type: issue 14 gives each type its own module.
def _normalize_change(raw: Any, path: str, errors: _Collector) -> dict | None:  # noqa: C901
    if not isinstance(raw, dict):
        errors.add(path, f"must be an object, got {_describe(raw)}")
        return None
    change_type = raw.get("type")
    if not isinstance(change_type, str) or change_type not in CHANGE_TYPES:
        errors.add(f"{path}.type", f"must be one of {', '.join(CHANGE_TYPES)}")
        return None
    allowed = _CHANGE_KEYS[change_type]
    for key in raw:
        if key not in allowed:
            errors.add(
                f"{path}.{key}" if isinstance(key, str) else path, f"is not an attribute of {change_type}"
            )
    change: dict[str, Any] = {"type": change_type}
    if change_type == "rename_table":
        source = _check_identifier(raw.get("from"), f"{path}.from", errors, new=False)
        if raw.get("table") is not None and raw.get("table") != raw.get("from"):
            errors.add(f"{path}.table", "must equal from (or be left out)")
        change["from"] = source
        change["table"] = source
        change["to"] = _check_identifier(raw.get("to"), f"{path}.to", errors, new=True)
        if source is not None and source == change["to"]:
            errors.add(f"{path}.to", "must differ from from")
        return change
    change["table"] = _check_identifier(
        raw.get("table"), f"{path}.table", errors, new=change_type == "create_table"
    )
    if change_type == "create_table":
        columns = raw.get("columns")
        if not isinstance(columns, list) or not columns:
            errors.add(f"{path}.columns", "must be a non-empty list of columns")
            return change
        if len(columns) > 1600:
            errors.add(f"{path}.columns", "at most 1600 columns")
            return change
        normalized = [
            _normalize_column(column, f"{path}.columns[{index}]", errors, new_name=True)
            for index, column in enumerate(columns)
        ]
        seen: set[str] = set()
        for index, column in enumerate(normalized):
            if column and column["name"]:
                if column["name"] in seen:
                    errors.add(f"{path}.columns[{index}].name", f"duplicate column '{column['name']}'")
                seen.add(column["name"])
        primary = [column for column in normalized if column and column["primary_key"]]
        if len(primary) > 1:
            errors.add(f"{path}.columns", "at most one column can be the primary key")
        if not primary and all(normalized):
            if "id" in seen:
                errors.add(f"{path}.columns", "a column named id needs primary_key: true (or another name)")
            normalized.insert(0, implicit_id_column())
        change["columns"] = normalized
    elif change_type == "add_column":
        change["column"] = _normalize_column(raw.get("column"), f"{path}.column", errors, new_name=True)
    elif change_type == "drop_column":
        change["column"] = _check_identifier(raw.get("column"), f"{path}.column", errors, new=False)
    elif change_type == "modify_column":
        change["column"] = _normalize_modification(raw.get("column"), f"{path}.column", errors)
    elif change_type == "rename_column":
        change["from"] = _check_identifier(raw.get("from"), f"{path}.from", errors, new=False)
        change["to"] = _check_identifier(raw.get("to"), f"{path}.to", errors, new=True)
        if change["from"] is not None and change["from"] == change["to"]:
            errors.add(f"{path}.to", "must differ from from")
    return change


def implicit_id_column() -> dict:
    return {
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


# Promote and rollback set each flag in the target's environment, under the target's lock: 60,000
# flags (a 1 MiB body holds them) held it for over a minute.
MAX_FLAGS = 500


def normalize_flags(raw: Any, errors: _Collector, path: str = "feature_flags") -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        errors.add(path, f"must be an object of flag name -> true|false|plan name, got {_describe(raw)}")
        return {}
    if len(raw) > MAX_FLAGS:
        errors.add(path, f"at most {MAX_FLAGS} feature flags per release, got {len(raw)}")
        return {}
    flags: dict[str, Any] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not FLAG_NAME_RE.match(name):
            errors.add(f"{path}.{name}", "flag names must match ^[a-z][a-z0-9_.-]{0,99}$")
            continue
        if isinstance(value, bool):
            flags[name] = value
        elif isinstance(value, str) and value in ("true", "false"):
            flags[name] = value == "true"
        elif isinstance(value, str) and FLAG_NAME_RE.match(value):
            flags[name] = value
        else:
            errors.add(
                f"{path}.{name}", "must be true, false or a plan name matching ^[a-z][a-z0-9_.-]{0,99}$"
            )
    return flags


def normalize_bundle(raw: Any, *, max_changes: int = 500) -> dict:
    """Validate a raw bundle and return it normalized; BundleError with field paths otherwise."""
    errors = _Collector()
    if not isinstance(raw, dict):
        raise BundleError(
            "the bundle must be a JSON object", {"bundle": f"must be an object, got {_describe(raw)}"}
        )
    for key in raw:
        if key not in ("database", "feature_flags"):
            errors.add(str(key), "unknown bundle section (expected database, feature_flags)")
    database = raw.get("database")
    changes: list[dict] = []
    if database is None:
        database = {"changes": []}
    if not isinstance(database, dict):
        errors.add("database", f"must be an object with a changes list, got {_describe(database)}")
    else:
        for key in database:
            if key != "changes":
                errors.add(f"database.{key}", "unknown attribute (expected changes)")
        raw_changes = database.get("changes", [])
        if not isinstance(raw_changes, list):
            errors.add("database.changes", f"must be a list, got {_describe(raw_changes)}")
        elif len(raw_changes) > max_changes:
            errors.add(
                "database.changes", f"at most {max_changes} changes per release, got {len(raw_changes)}"
            )
        else:
            for index, raw_change in enumerate(raw_changes):
                change = _normalize_change(raw_change, f"database.changes[{index}]", errors)
                if change is not None:
                    changes.append(change)
    flags = normalize_flags(raw.get("feature_flags"), errors)
    if errors.errors:
        count = len(errors.errors)
        raise BundleError(
            f"the bundle is not valid ({count} problem{'s' if count != 1 else ''})", errors.errors
        )
    bundle = {"database": {"changes": changes}, "feature_flags": flags}
    try:
        canonical_json(bundle)  # proves it hashes (no NaN, no foreign types)
    except (TypeError, ValueError, RecursionError):
        raise BundleError(
            "the bundle cannot be hashed", {"bundle": "holds values that are not plain JSON"}
        ) from None
    return bundle


def merge_column(current: dict, modification: dict) -> dict:
    """The full column a modify_column leaves behind: given attributes win, the rest stay."""
    merged = dict(current)
    for key, value in modification.items():
        if key != "name":
            merged[key] = value
    if "type" in modification and modification["type"] != current.get("type"):
        if merged["type"] != "string" and "max_length" not in modification:
            merged["max_length"] = None
        if merged["type"] != "decimal":
            if "precision" not in modification:
                merged["precision"] = None
            if "scale" not in modification:
                merged["scale"] = None
    if (
        merged.get("type") == "decimal"
        and merged.get("scale") is None
        and merged.get("precision") is not None
    ):
        merged["scale"] = 0
    if merged.get("primary_key"):
        merged["nullable"] = False
        merged["unique"] = False
    if modification.get("default") is not None and merged.get("type") in COLUMN_TYPES:
        # A default given without its type is kept as sent in the bundle: the SQL gets the value
        # the merged column's type makes of it. One that is not valid stays for validate_merged_column.
        with contextlib.suppress(ValueError):
            merged["default"] = normalize_default(merged, merged["default"])
    return merged


def validate_merged_column(column: dict, path: str) -> dict[str, str]:
    """Field errors for a complete column produced by merge_column (empty when valid)."""
    errors = _Collector()
    check_column_attributes(column, path, errors)
    return errors.errors
