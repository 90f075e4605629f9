"""Opening a target database as a private Django DatabaseWrapper.

The wrapper lives under a unique alias that is never `default` and is never added to the global
`django.db.connections` (that handler is iterated by other threads); it is closed on exit.

Targets are identified by what they are, not how their URL is spelled: on connect, `open_target`
reads the database's identity from the server (PostgreSQL: `system_identifier` of
`pg_control_system()` and the database's oid; SQLite: the file's real path, plus its device and
inode) and refuses (`TargetRefused`, code `target_refused`) releasemgr's own control database,
compared by that identity, and SQLite files outside `settings.TARGETS_DIR`. A missing SQLite file is
never created by an open (`mode=rw`); `create_sqlite_target` is the explicit act. Which tenant may
use which identity is not the engine's business: `tenants.targets.open_environment` checks that.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import environ
from django.conf import settings
from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.utils import CursorWrapper
from django.db.utils import load_backend

from releasemgr.core.scrub import scrub

from .errors import TargetError, TargetLockedError, TargetRefused, is_lock_error

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


@dataclass(frozen=True)
class TargetIdentity:
    """What a target database is, read from the server, whatever its URL's spelling.

    `key`: `postgresql:<system_identifier>:<database oid>` or `sqlite:<real path>`. `file_id`:
    `<device>:<inode>` of a SQLite file (a hard link has another path but the same inode), else "".
    """

    key: str
    file_id: str = ""

    def same_database(self, key: str, file_id: str = "") -> bool:
        """Is the database identified by (key, file_id) this one? Empty values never match."""
        return bool(key) and key == self.key or bool(file_id) and file_id == self.file_id


@dataclass
class Target:
    """An open target database: `connection` is a private DatabaseWrapper, `vendor` its dialect,
    `identity` what the server says it is (read on connect)."""

    connection: BaseDatabaseWrapper
    vendor: str
    alias: str
    database_name: str
    secrets: list[str] = field(default_factory=list, repr=False)
    identity: TargetIdentity | None = None

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


def targets_dir() -> Path:
    """The directory SQLite targets are confined to (`settings.TARGETS_DIR`), symlinks resolved."""
    return Path(os.path.realpath(str(settings.TARGETS_DIR)))


def sqlite_target_path(name: str) -> Path:
    """The real path of a SQLite target, refused (`TargetRefused`) when it is not inside TARGETS_DIR.

    Symlinks and `..` are resolved first, so no spelling of a path reaches a file outside it.
    """
    if not name or name == ":memory:" or name.startswith("file:"):
        raise TargetRefused("a SQLite target is a file path under TARGETS_DIR (no :memory:, no file: URI)")
    path = Path(os.path.realpath(name))
    root = targets_dir()
    if path == root or root not in path.parents:
        raise TargetRefused(
            "the SQLite target file is outside the targets directory (TARGETS_DIR); "
            "SQLite targets live only under that directory"
        )
    return path


def create_sqlite_target(url: str) -> Path:
    """Create an empty SQLite target file (inside TARGETS_DIR) if it is missing: the explicit act that
    opening never does. Returns its real path."""
    config = parse_url(url)
    if not config["ENGINE"].endswith("sqlite3"):
        raise TargetError(
            "only a SQLite target is created by releasemgr; create PostgreSQL databases yourself"
        )
    path = sqlite_target_path(str(config["NAME"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(sqlite3.connect(str(path))) as database:
        database.execute("PRAGMA user_version")  # creates the (empty, valid) file
    return path


def _sqlite_identity(path: Path | str) -> TargetIdentity:
    real = os.path.realpath(str(path))
    info = os.stat(real)
    return TargetIdentity(key=f"sqlite:{real}", file_id=f"{info.st_dev}:{info.st_ino}")


_POSTGRES_IDENTITY_SQL = (
    "SELECT (SELECT system_identifier FROM pg_control_system()), oid "
    "FROM pg_catalog.pg_database WHERE datname = current_database()"
)


def _postgres_identity(cursor: Any) -> TargetIdentity:
    cursor.execute(_POSTGRES_IDENTITY_SQL)
    system_identifier, oid = cursor.fetchone()
    return TargetIdentity(key=f"postgresql:{system_identifier}:{oid}")


_control_cache: dict[tuple, TargetIdentity | None] = {}
_control_lock = threading.Lock()


def control_identity() -> TargetIdentity | None:
    """The identity of releasemgr's own control database (`default`), or None when it has none that a
    target could share (an in-memory SQLite test database) or it cannot be read right now (then the
    CONTROL_TABLES check still applies). Read once per process and database settings, on a short
    connection of its own, so the default connection's transaction state never matters."""
    settings_dict = connections["default"].settings_dict
    cache_key = tuple(str(settings_dict.get(key)) for key in ("ENGINE", "HOST", "PORT", "NAME"))
    with _control_lock:
        if cache_key in _control_cache:
            return _control_cache[cache_key]
    if settings_dict["ENGINE"].endswith("sqlite3"):
        name = str(settings_dict["NAME"] or "")
        if not name or name == ":memory:" or "mode=memory" in name:
            identity = None
        else:
            try:
                identity = _sqlite_identity(name.removeprefix("file:").split("?", 1)[0])
            except OSError:
                return None
    else:
        wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(
            {**settings_dict, "OPTIONS": dict(settings_dict.get("OPTIONS") or {})}, "rm_control_identity"
        )
        try:
            raw = wrapper.get_new_connection(wrapper.get_connection_params())
        except Exception:  # noqa: BLE001 - not readable now: not cached, asked again next time
            return None
        try:
            with contextlib.closing(raw.cursor()) as cursor:
                identity = _postgres_identity(cursor)
        finally:
            with contextlib.suppress(Exception):
                raw.close()
    with _control_lock:
        _control_cache[cache_key] = identity
    return identity


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
    """Open the target database at `url`; TargetError (scrubbed) when it cannot be reached,
    TargetRefused when it is not a database releasemgr may touch (see the module docstring).

    `lock_timeout_ms` bounds how long a SQLite read waits for another session's lock.
    """
    config = parse_url(url)
    vendor = SUPPORTED_ENGINES[config["ENGINE"]]
    alias = f"rm_target_{uuid.uuid4().hex[:12]}"
    secrets = [str(config.get(key) or "") for key in ("PASSWORD", "USER", "HOST")]
    secrets = [value for value in secrets if value and len(value) > 1] + [url]
    database_name = str(config.get("NAME"))
    if vendor == "sqlite":
        path = sqlite_target_path(database_name)
        if not path.is_file():
            raise TargetError(
                "the SQLite target file does not exist; opening a target never creates one "
                "(create the file under TARGETS_DIR first)"
            )
        database_name = str(path)
        # mode=rw: an open never creates the file (Django opens SQLite with uri=True).
        config = {**config, "NAME": f"file:{quote(database_name)}?mode=rw"}
    wrapper = build_wrapper(config, alias, lock_timeout_ms)
    target = Target(
        connection=wrapper,
        vendor=vendor,
        alias=alias,
        database_name=database_name,
        secrets=secrets,
    )
    control = False  # a SQLite control database is in WAL mode: its readers are never locked out
    try:
        try:
            wrapper.ensure_connection()
            if vendor == "sqlite":
                target.identity = _sqlite_identity(database_name)
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
                    target.identity = _postgres_identity(cursor)
                    control = _has_control_tables(cursor, vendor)
        except Exception as exc:  # noqa: BLE001 - every connect failure becomes a TargetError
            raise TargetError(
                f"cannot connect to the target database: {target.scrub(str(exc)).strip()}"
            ) from None
        if vendor == "sqlite" and target.identity.key != f"sqlite:{database_name}":
            raise TargetRefused("the SQLite target's path changed while it was opened")
        own = control_identity()
        if control or (own is not None and own.same_database(target.identity.key, target.identity.file_id)):
            raise TargetRefused(
                "the target database is releasemgr's own control database: release SQL never runs "
                "there; set the environment's URL to the application's database"
            )
        yield target
    finally:
        with contextlib.suppress(Exception):
            wrapper.close()
