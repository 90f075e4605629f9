"""Opening a target database as a private Django DatabaseWrapper.

The wrapper lives under a unique alias that is never `default` and is never added to the global
`django.db.connections` (that handler is iterated by other threads); it is closed on exit.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import environ
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.utils import load_backend

from releasemgr.core.scrub import scrub

from .errors import TargetError, TargetLockedError, is_lock_error

SUPPORTED_ENGINES = {
    "django.db.backends.postgresql": "postgresql",
    "django.db.backends.sqlite3": "sqlite",
}
SUPPORTED_SCHEMES = ("postgres", "postgresql", "pgsql", "sqlite")
DEFAULT_LOCK_TIMEOUT_MS = 2000
# Tables only releasemgr's own control database has (its tenants' tokens, its releases, approval
# links, idempotency records, tool transcripts): a target holding them all is a control database,
# this deployment's or another's, and is never released to. Six names, so that an application of
# its own with apps and models called tenants/Tenant or releases/Release is not mistaken for one.
CONTROL_TABLES = (
    "tenants_tenant",
    "tenants_apitoken",
    "releases_release",
    "releases_approvallink",
    "releases_idempotencyrecord",
    "tools_tooltranscript",
)


@dataclass
class Target:
    """An open target database: `connection` is a private DatabaseWrapper, `vendor` its dialect."""

    connection: BaseDatabaseWrapper
    vendor: str
    alias: str
    database_name: str
    secrets: list[str] = field(default_factory=list, repr=False)

    def scrub(self, message: str) -> str:
        return scrub(str(message), self.secrets)

    @contextlib.contextmanager
    def lock_errors(self, what: str) -> Iterator[None]:
        """Turn "another session holds the lock" driver errors into TargetLockedError (lock_timeout)."""
        try:
            yield
        except TargetError:
            raise
        except Exception as exc:
            if is_lock_error(self.vendor, exc):
                raise TargetLockedError(
                    f"{what}: the target database is locked by another session ({self.scrub(str(exc)).strip()})"
                ) from None
            raise

    @property
    def is_postgresql(self) -> bool:
        return self.vendor == "postgresql"

    @property
    def is_sqlite(self) -> bool:
        return self.vendor == "sqlite"


def parse_url(url: str) -> dict[str, Any]:
    """django-environ's parse of a target URL, restricted to PostgreSQL and SQLite."""
    if not isinstance(url, str) or not url.strip():
        raise TargetError("the target database URL is empty")
    scheme = url.split(":", 1)[0].lower()
    if scheme not in SUPPORTED_SCHEMES:
        raise TargetError(
            f"unsupported target database scheme '{scrub(scheme)[:20]}': use postgres:// or sqlite://"
        )
    try:
        config = environ.Env.db_url_config(url)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad URL
        raise TargetError(f"the target database URL cannot be parsed: {scrub(str(exc), [url])}") from None
    if config.get("ENGINE") not in SUPPORTED_ENGINES:
        raise TargetError("unsupported target database engine: use postgres:// or sqlite://")
    if not config.get("NAME"):
        raise TargetError("the target database URL names no database")
    return config


def build_wrapper(
    config: dict[str, Any], alias: str, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
) -> BaseDatabaseWrapper:
    settings_dict: dict[str, Any] = {
        "ENGINE": config["ENGINE"],
        "NAME": config.get("NAME", ""),
        "USER": config.get("USER", "") or "",
        "PASSWORD": config.get("PASSWORD", "") or "",
        "HOST": config.get("HOST", "") or "",
        "PORT": str(config.get("PORT", "") or ""),
        "OPTIONS": dict(config.get("OPTIONS") or {}),
        "ATOMIC_REQUESTS": False,
        "AUTOCOMMIT": True,
        "CONN_MAX_AGE": 0,
        "CONN_HEALTH_CHECKS": False,
        "TIME_ZONE": None,
        "TEST": {"CHARSET": None, "COLLATION": None, "MIGRATE": False, "MIRROR": None, "NAME": None},
    }
    if config["ENGINE"].endswith("postgresql"):
        settings_dict["OPTIONS"].setdefault("connect_timeout", 5)
    else:
        # sqlite3's busy timeout for every statement outside the engine's own transactions (which set
        # PRAGMA busy_timeout to the environment's lock timeout themselves).
        settings_dict["OPTIONS"].setdefault("timeout", max(lock_timeout_ms, 1) / 1000)
    backend = load_backend(config["ENGINE"])
    wrapper = backend.DatabaseWrapper(settings_dict, alias)
    if config["ENGINE"].endswith("sqlite3"):
        # features.supports_json_field looks the alias up in the global handler; JSON1 is built
        # into every SQLite this project supports (3.38+ has it unconditionally; 3.31+ by default).
        wrapper.features.supports_json_field = True
        # Keep decimal precision and scale in SQLite's DDL so that introspection can read them back.
        wrapper.data_types = {
            **wrapper.data_types,
            "DecimalField": "decimal(%(max_digits)s, %(decimal_places)s)",
        }
    return wrapper


def _has_control_tables(cursor: CursorWrapper, vendor: str) -> bool:
    """Does the database hold every one of CONTROL_TABLES? (On SQLite this also touches the schema.)"""
    marks = ", ".join(["%s"] * len(CONTROL_TABLES))
    if vendor == "sqlite":
        sql = f"SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ({marks})"
    else:
        sql = f"SELECT count(DISTINCT tablename) FROM pg_catalog.pg_tables WHERE tablename IN ({marks})"
    cursor.execute(sql, list(CONTROL_TABLES))
    return cursor.fetchone()[0] == len(CONTROL_TABLES)


@contextlib.contextmanager
def open_target(url: str, *, lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> Iterator[Target]:
    """Open the target database at `url`; TargetError (scrubbed) when it cannot be reached.

    `lock_timeout_ms` bounds how long a SQLite read waits for another session's lock.
    """
    config = parse_url(url)
    vendor = SUPPORTED_ENGINES[config["ENGINE"]]
    alias = f"rm_target_{uuid.uuid4().hex[:12]}"
    secrets = [str(config.get(key) or "") for key in ("PASSWORD", "USER", "HOST")]
    secrets = [value for value in secrets if value and len(value) > 1] + [url]
    wrapper = build_wrapper(config, alias, lock_timeout_ms)
    target = Target(
        connection=wrapper,
        vendor=vendor,
        alias=alias,
        database_name=str(config.get("NAME")),
        secrets=secrets,
    )
    control = False  # a SQLite control database is in WAL mode: its readers are never locked out
    try:
        try:
            wrapper.ensure_connection()
            if vendor == "sqlite":
                with wrapper.cursor() as cursor:
                    # Touch the schema so a file that is not a database fails here, not later; without
                    # waiting: a database locked by another session is reachable, and what runs next
                    # waits for its own lock budget and reports lock_timeout.
                    cursor.execute("PRAGMA busy_timeout = 0")
                    try:
                        control = _has_control_tables(cursor, vendor)
                    except Exception as exc:  # noqa: BLE001
                        if not is_lock_error(vendor, exc):
                            raise
                    finally:
                        cursor.execute(f"PRAGMA busy_timeout = {max(int(lock_timeout_ms), 1)}")
            else:
                with wrapper.cursor() as cursor:
                    control = _has_control_tables(cursor, vendor)
        except Exception as exc:  # noqa: BLE001 - every connect failure becomes a TargetError
            raise TargetError(
                f"cannot connect to the target database: {target.scrub(str(exc)).strip()}"
            ) from None
        if control:
            raise TargetError(
                "the target database is releasemgr's own control database (it holds "
                f"{', '.join(CONTROL_TABLES)}): release SQL never runs there; set the environment's URL "
                "to the application's database"
            )
        yield target
    finally:
        with contextlib.suppress(Exception):
            wrapper.close()
