"""Shared fixtures: target databases on SQLite and PostgreSQL, services availability."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip with a reason when a service is absent; under CI=true that is a failure."""
    if _port_open(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: a missing service is a failure)")
    pytest.skip(message)


def pg_admin_connection():
    import psycopg2

    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    connection.autocommit = True
    return connection


# Databases of this test process that a finished test handed back, emptied, for the next test.
# CREATE and DROP DATABASE cost a second or more each (DROP forces a checkpoint); resetting the
# public schema costs milliseconds. Every pooled database is dropped when the session ends.
_PG_POOL: list[str] = []
_PG_CREATED: set[str] = set()


def _pg_reset(name: str) -> None:
    """Empty a test database: end its sessions (and their advisory locks), recreate its schemas."""
    import psycopg2

    admin = pg_admin_connection()
    try:
        with admin.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
    finally:
        admin.close()
    connection = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=name)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'"
            )
            for (schema,) in cursor.fetchall():
                cursor.execute(f'DROP SCHEMA "{schema}" CASCADE')
            cursor.execute("CREATE SCHEMA public")
            cursor.execute("GRANT ALL ON SCHEMA public TO PUBLIC")
    finally:
        connection.close()


def _pg_drop(names) -> None:
    admin = pg_admin_connection()
    try:
        with admin.cursor() as cursor:
            for name in names:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture(scope="session", autouse=True)
def _pg_pool_cleanup() -> Iterator[None]:
    yield
    if _PG_CREATED and _port_open(PG_HOST, PG_PORT):
        _pg_drop(sorted(_PG_CREATED))


@pytest.fixture
def pg_database_factory() -> Iterator:
    """Fresh, empty PostgreSQL databases for one test; returns their URLs."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    taken: list[str] = []

    def make() -> str:
        if _PG_POOL:
            name = _PG_POOL.pop()
        else:
            name = f"rm_test_{uuid.uuid4().hex[:12]}"
            # Not `with connection:` (psycopg2 2.9 opens a transaction there even in autocommit).
            admin = pg_admin_connection()
            try:
                with admin.cursor() as cursor:
                    cursor.execute(f'CREATE DATABASE "{name}"')
            finally:
                admin.close()
            _PG_CREATED.add(name)
        taken.append(name)
        return f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"

    yield make
    for name in taken:
        try:
            _pg_reset(name)
        except Exception:
            _PG_CREATED.discard(name)
            _pg_drop([name])
        else:
            _PG_POOL.append(name)


@pytest.fixture(scope="session", autouse=True)
def _targets_dir(tmp_path_factory) -> Iterator[Path]:
    """SQLite targets are confined to TARGETS_DIR: this session's pytest base directory, so every
    test's tmp_path is inside it (and so are the subprocesses' targets: they inherit the variable)."""
    from django.conf import settings

    root = tmp_path_factory.getbasetemp()
    before_setting, before_env = settings.TARGETS_DIR, os.environ.get("TARGETS_DIR")
    settings.TARGETS_DIR = root
    os.environ["TARGETS_DIR"] = str(root)
    yield root
    settings.TARGETS_DIR = before_setting
    if before_env is None:
        os.environ.pop("TARGETS_DIR", None)
    else:
        os.environ["TARGETS_DIR"] = before_env


@pytest.fixture
def sqlite_database_factory(tmp_path):
    """Create (empty) SQLite target files under the test's tmp_path; returns their URLs. Opening a
    target never creates its file: creating one is this explicit act."""
    counter = iter(range(1_000_000))

    def make() -> str:
        path = tmp_path / f"target_{next(counter)}.sqlite3"
        path.touch()
        return f"sqlite:///{path}"

    return make


@pytest.fixture(params=["sqlite", "postgres"])
def database_factory(request):
    """The same test on both target dialects."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_database_factory")
    return request.getfixturevalue("sqlite_database_factory")


@pytest.fixture
def redis_url() -> str:
    require_service("Redis", "127.0.0.1", 6379)
    return REDIS_URL


@pytest.fixture(autouse=True)
def _fresh_throttle_counts():
    """Throttle counts live in the cache, keyed by tenant and user pks that tests reuse: start each test at zero."""
    from django.core.cache import cache

    cache.clear()
    yield


@pytest.fixture
def chromium(monkeypatch):
    # Playwright's sync API runs an event loop in this thread; the ORM calls the test makes between
    # page actions are synchronous and safe here. Set for this test only (never at import: a
    # subprocess started by another test would inherit it).
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install -y chromium"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()
