"""The Makefile's release targets and test passes, as `make` renders and runs them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAMP = ".venv/.requirements.stamp"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(*arguments: str, dry_run: bool = True) -> subprocess.CompletedProcess:
    # -o STAMP: treat the install as done, so no pip runs from a test.
    command = ["make", "--no-print-directory", "-o", STAMP, *(["-n"] if dry_run else []), *arguments]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_make_release_targets__arguments__passed_to_the_commands():
    prepare = make("release-prepare", "TENANT=primary", "FROM=staging", "TO=prod", "BUNDLE=b.json")
    promote = make("release-promote", "TENANT=primary", "RELEASE=rel_20240115_1200")
    latest = make("release-promote", "TENANT=primary")
    rollback = make("release-rollback", "TENANT=primary", "RELEASE=rel_20240115_1200")

    assert 'release_prepare --tenant "primary" --from "staging"' in prepare.stdout
    assert '--to "prod"' in prepare.stdout and '--bundle "b.json"' in prepare.stdout
    assert 'release_promote --tenant "primary" --release "rel_20240115_1200"' in promote.stdout
    assert 'release_promote --tenant "primary"' in latest.stdout and "--release" not in latest.stdout
    assert 'release_rollback --tenant "primary" --release "rel_20240115_1200"' in rollback.stdout


@pytest.mark.parametrize(
    "arguments",
    [["release-prepare"], ["release-promote"], ["release-rollback", "TENANT=primary"]],
)
def test_make_release_targets__required_variable_missing__usage_and_failure(arguments):
    result = make(*arguments, dry_run=False)

    assert result.returncode != 0
    assert "usage: make " + arguments[0] in result.stdout
    assert "manage.py" not in result.stdout


def test_make_test__two_passes__sqlite_control_then_postgresql_control():
    result = make("test")

    lines = [line for line in result.stdout.splitlines() if "-m pytest" in line]
    assert len(lines) == 2, result.stdout
    assert "env -u DATABASE_URL" in lines[0]
    assert "DATABASE_URL=postgres://postgres@127.0.0.1:5432/releasemgr_ci_control" in lines[1]
    assert '-m "not browser and not slow"' in lines[1]


def test_make_test_pg_control__postgresql_absent__skipped_locally_but_a_failure_under_ci():
    absent = ["test-pg-control", "PG_CONTROL_PORT=1", "PYTEST_ARGS=-x"]

    local = make(*absent, "CI=", dry_run=False)
    ci = make(*absent, "CI=true", dry_run=False)

    assert local.returncode == 0 and "pass skipped" in local.stdout
    assert ci.returncode != 0 and "pass skipped" not in ci.stdout
