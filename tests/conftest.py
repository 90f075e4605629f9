"""Shared fixtures: target databases on SQLite and PostgreSQL, services availability."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator

import pytest

PG_HOST = os.environ.get("TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("TEST_PG_USER", "postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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


@pytest.fixture
def pg_database_factory() -> Iterator:
    """Create fresh PostgreSQL databases (dropped afterwards); returns their URLs."""
    require_service("PostgreSQL", PG_HOST, PG_PORT)
    created: list[str] = []

    def make() -> str:
        name = f"rm_test_{uuid.uuid4().hex[:12]}"
        # Not `with connection:` (psycopg2 2.9 opens a transaction there even in autocommit).
        admin = pg_admin_connection()
        try:
            with admin.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            admin.close()
        created.append(name)
        return f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"

    yield make
    admin = pg_admin_connection()
    try:
        with admin.cursor() as cursor:
            for name in created:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.close()


@pytest.fixture
def sqlite_database_factory(tmp_path):
    """Create SQLite target files under the test's tmp_path; returns their URLs."""
    counter = iter(range(1_000_000))

    def make() -> str:
        return f"sqlite:///{tmp_path / f'target_{next(counter)}.sqlite3'}"

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
