"""Verified backups of the tables a release touches, taken before the apply (SPEC 4 and 13).

PostgreSQL: `pg_dump --format=custom` of the requested tables that exist, with `--lock-wait-timeout`
so a busy table fails the backup quickly instead of queueing behind (and in front of) other locks.
Every connection parameter, the password included, reaches pg_dump through the environment
(PGHOST, PGPASSWORD...), never argv, where any local user could read it from the process list.
The archive is verified with `pg_restore --list`: each table must have its TABLE and TABLE DATA
entries. SQLite: the online backup API copies the whole file consistently, then the copy must pass
`PRAGMA integrity_check` and contain every table. Either way the SHA-256 of the file is recorded.

An archive is written under a temporary name and renamed only once verified, so a file under its
final name is always a verified backup. Errors raise `BackupError` with a scrubbed message.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import environ

from releasemgr.core.errors import ApplicationError, ErrorCode
from releasemgr.core.scrub import scrub

PG_DUMP_FORMAT = "pg_dump-custom"
SQLITE_FORMAT = "sqlite"
NOTHING_TO_BACK_UP = "nothing to back up"

# libpq connection options django-environ leaves in OPTIONS, and the variables that carry them.
_LIBPQ_OPTION_VARIABLES = {
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "options": "PGOPTIONS",
}


class BackupError(ApplicationError, RuntimeError):
    """The backup could not be taken or verified; the message is scrubbed of hosts, users, passwords."""

    code = ErrorCode.BACKUP_FAILED


@dataclass(frozen=True)
class BackupInfo:
    """A verified backup (or the record that there was nothing to back up)."""

    path: str
    format: str
    tables: list[str] = field(default_factory=list)
    size_bytes: int = 0
    sha256: str = ""
    verified: bool = False
    note: str = ""


def backup(
    url: str,
    tables: list[str],
    dest_dir: str | os.PathLike[str],
    label: str,
    *,
    lock_wait_timeout_ms: int = 2000,
    timeout_seconds: int = 3600,
) -> BackupInfo:
    """Back up those of `tables` that exist in the database at `url` into `dest_dir`.

    Returns BackupInfo with `verified=True`; with no existing table, no file is written and
    `note="nothing to back up"`. Raises BackupError (scrubbed) on any failure, leaving no file behind.
    """
    config = _parse_url(url)
    secrets = [str(config.get(key) or "") for key in ("PASSWORD", "USER", "HOST")]
    requested = sorted(set(tables))
    engine = str(config.get("ENGINE", ""))
    try:
        if engine.endswith("sqlite3"):
            return _backup_sqlite(config, requested, Path(dest_dir), label, lock_wait_timeout_ms)
        if "postgresql" in engine or "postgis" in engine:
            return _backup_postgresql(
                config, requested, Path(dest_dir), label, lock_wait_timeout_ms, timeout_seconds
            )
    except BackupError as exc:
        raise BackupError(scrub(exc.message, secrets), code=exc.code) from None
    except (OSError, sqlite3.Error) as exc:
        raise BackupError(scrub(f"backup failed: {exc}", secrets)) from None
    raise BackupError("backup is supported for PostgreSQL and SQLite targets only")


def _parse_url(url: str) -> dict[str, Any]:
    try:
        config = environ.Env.db_url_config(url)
    except Exception as exc:  # django-environ raises several types for bad URLs
        raise BackupError(scrub(f"invalid database URL: {exc}", [url])) from None
    if not config.get("NAME"):
        raise BackupError("the database URL names no database")
    return config


def _file_name(label: str, suffix: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._")[:100] or "backup"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{safe}-{stamp}{suffix}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _finish(partial: Path, final: Path, format_: str, tables: list[str]) -> BackupInfo:
    os.replace(partial, final)
    return BackupInfo(
        path=str(final),
        format=format_,
        tables=tables,
        size_bytes=final.stat().st_size,
        sha256=_sha256(final),
        verified=True,
    )


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


# PostgreSQL


def pg_environment(config: dict[str, Any]) -> dict[str, str]:
    """The process environment for pg_dump/pg_restore: connection parameters as PG* variables.

    Inherited PG* variables are dropped so nothing but `config` decides where the tools connect.
    """
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    values = {
        "PGHOST": config.get("HOST"),
        "PGPORT": config.get("PORT"),
        "PGUSER": config.get("USER"),
        "PGPASSWORD": config.get("PASSWORD"),
        "PGDATABASE": config.get("NAME"),
        "PGAPPNAME": "releasemgr-backup",
        "PGCONNECT_TIMEOUT": 10,
    }
    for option, value in (config.get("OPTIONS") or {}).items():
        if option in _LIBPQ_OPTION_VARIABLES:
            values[_LIBPQ_OPTION_VARIABLES[option]] = value
    environment.update({key: str(value) for key, value in values.items() if value not in (None, "")})
    return environment


def pg_dump_command(
    schema: str, tables: list[str], path: str | os.PathLike[str], lock_wait_timeout_ms: int
) -> list[str]:
    """The pg_dump argv: no connection parameter (those travel in the environment)."""
    command = [
        "pg_dump",
        "--format=custom",
        "--no-password",
        f"--lock-wait-timeout={int(lock_wait_timeout_ms)}",
        "--strict-names",
        f"--file={path}",
    ]
    for table in tables:
        command.append(f'--table="{schema}"."{table}"')
    return command


def _connect_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    options = {k: v for k, v in (config.get("OPTIONS") or {}).items() if k in _LIBPQ_OPTION_VARIABLES}
    options.setdefault("connect_timeout", 10)
    kwargs = {
        "host": config.get("HOST") or None,
        "port": config.get("PORT") or None,
        "user": config.get("USER") or None,
        "password": config.get("PASSWORD") or None,
        "dbname": config.get("NAME"),
        "application_name": "releasemgr-backup",
        **options,
    }
    return {key: value for key, value in kwargs.items() if value is not None}


def _existing_pg_tables(config: dict[str, Any], tables: list[str]) -> tuple[str, list[str]]:
    import psycopg2

    try:
        connection = psycopg2.connect(**_connect_kwargs(config))
    except psycopg2.Error as exc:
        raise BackupError(f"cannot connect to the target for the backup: {exc}".strip()) from None
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_schema()")
            schema = cursor.fetchone()[0]
            cursor.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' AND table_name = ANY(%s)",
                [tables],
            )
            existing = sorted(row[0] for row in cursor.fetchall())
    except psycopg2.Error as exc:
        raise BackupError(f"cannot list the target's tables for the backup: {exc}".strip()) from None
    finally:
        connection.close()
    if schema is None:
        raise BackupError("the target has no current schema (check search_path)")
    return schema, existing


def _run(command: list[str], environment: dict[str, str], timeout_seconds: int, what: str) -> str:
    try:
        completed = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=timeout_seconds, check=False
        )
    except FileNotFoundError:
        raise BackupError(f"{command[0]} is not installed (needed for PostgreSQL backups)") from None
    except subprocess.TimeoutExpired:
        raise BackupError(f"{what} did not finish within {timeout_seconds} s") from None
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout or "").strip()[-2000:]
        raise BackupError(f"{what} failed (exit {completed.returncode}): {detail}")
    return completed.stdout


_TOC_LINE = re.compile(r"^\d+;\s+\d+\s+\d+\s+(?P<kind>TABLE DATA|TABLE)\s+(?P<schema>\S+)\s+(?P<name>\S+)\s")


def toc_tables(listing: str) -> dict[str, set[str]]:
    """`pg_restore --list` output -> {table: {"TABLE", "TABLE DATA"} entries found}."""
    found: dict[str, set[str]] = {}
    for line in listing.splitlines():
        match = _TOC_LINE.match(line)
        if match:
            found.setdefault(match["name"], set()).add(match["kind"])
    return found


def verify_pg_archive(path: str | os.PathLike[str], tables: list[str], *, timeout_seconds: int = 600) -> None:
    """Raise BackupError unless the archive's TOC has the definition and the data of every table."""
    listing = _run(
        ["pg_restore", "--list", str(path)], pg_environment({}), timeout_seconds, "pg_restore --list"
    )
    found = toc_tables(listing)
    missing = [table for table in tables if found.get(table, set()) != {"TABLE", "TABLE DATA"}]
    if missing:
        raise BackupError(f"backup verification failed: the archive lacks {', '.join(missing)}")


def _backup_postgresql(
    config: dict[str, Any],
    tables: list[str],
    dest_dir: Path,
    label: str,
    lock_wait_timeout_ms: int,
    timeout_seconds: int,
) -> BackupInfo:
    schema, existing = _existing_pg_tables(config, tables)
    if not existing:
        return BackupInfo(path="", format=PG_DUMP_FORMAT, verified=True, note=NOTHING_TO_BACK_UP)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / _file_name(label, ".dump")
    partial = final.with_name(final.name + ".partial")
    try:
        command = pg_dump_command(schema, existing, partial, lock_wait_timeout_ms)
        try:
            _run(command, pg_environment(config), timeout_seconds, "pg_dump")
        except BackupError as exc:
            if "LOCK TABLE" in exc.message:
                raise BackupError(
                    f"pg_dump could not lock a table within {lock_wait_timeout_ms} ms (another session holds "
                    f"a conflicting lock); retry later. {exc.message}",
                    code=ErrorCode.LOCK_TIMEOUT,
                ) from None
            raise
        os.chmod(partial, 0o600)
        verify_pg_archive(partial, existing, timeout_seconds=timeout_seconds)
        return _finish(partial, final, PG_DUMP_FORMAT, existing)
    except BaseException:
        _remove(partial)
        raise


# SQLite


def _backup_sqlite(
    config: dict[str, Any], tables: list[str], dest_dir: Path, label: str, lock_wait_timeout_ms: int
) -> BackupInfo:
    name = str(config["NAME"])
    if name == ":memory:" or name.startswith("file::memory:"):
        raise BackupError("an in-memory SQLite database cannot be backed up")
    source_path = Path(name)
    if not source_path.is_file():
        raise BackupError(f"the SQLite target file does not exist: {source_path.name}")
    # Read-only URI: a backup must never create or change the target.
    source = sqlite3.connect(
        f"file:{quote(str(source_path.resolve()))}?mode=ro", uri=True, timeout=lock_wait_timeout_ms / 1000
    )
    try:
        existing = _sqlite_tables(source, tables)
        if not existing:
            return BackupInfo(path="", format=SQLITE_FORMAT, verified=True, note=NOTHING_TO_BACK_UP)
        dest_dir.mkdir(parents=True, exist_ok=True)
        final = dest_dir / _file_name(label, ".sqlite3")
        partial = final.with_name(final.name + ".partial")
        try:
            copy = sqlite3.connect(partial)
            try:
                source.backup(copy)
            finally:
                copy.close()
            os.chmod(partial, 0o600)
            _verify_sqlite_copy(partial, existing)
            return _finish(partial, final, SQLITE_FORMAT, existing)
        except BaseException:
            _remove(partial)
            raise
    finally:
        source.close()


def _sqlite_tables(connection: sqlite3.Connection, tables: list[str]) -> list[str]:
    rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    present = {row[0] for row in rows}
    return sorted(table for table in tables if table in present)


def _verify_sqlite_copy(path: Path, tables: list[str]) -> None:
    copy = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
    try:
        result = [row[0] for row in copy.execute("PRAGMA integrity_check").fetchall()]
        if result != ["ok"]:
            raise BackupError(f"backup verification failed: integrity_check says {'; '.join(result)[:500]}")
        missing = sorted(set(tables) - set(_sqlite_tables(copy, tables)))
        if missing:
            raise BackupError(f"backup verification failed: the copy lacks {', '.join(missing)}")
        for table in tables:  # every table of the copy must be readable to the end
            copy.execute(f'SELECT count(*) FROM "{table}"').fetchone()
    finally:
        copy.close()
