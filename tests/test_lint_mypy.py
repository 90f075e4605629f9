"""mypy in `make lint`: the typed targets are clean, and the config catches what it promises to.

`make lint` is not part of CI (`make test` is), so the zero-errors gate on MYPY_TARGETS lives here too.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MYPY = Path(sys.executable).with_name("mypy")

pytestmark = [
    pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed"),
    pytest.mark.skipif(not MYPY.exists(), reason="mypy is not installed (make install)"),
]


def mypy_line(*variables: str) -> list[str]:
    """The mypy command `make lint` runs, as arguments (`-o` the install stamp: no pip from a test)."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-o", ".venv/.requirements.stamp", "-n", "lint", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(line for line in result.stdout.splitlines() if "bin/mypy " in line)
    return shlex.split(line)


def run_mypy(arguments: list[str], cache: Path) -> subprocess.CompletedProcess:
    # A cache of its own: mypy replays cached errors of modules that were targets in an earlier run.
    return subprocess.run(
        [str(MYPY), "--cache-dir", str(cache), *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_make_lint__mypy_targets__services_selectors_engine_and_tools():
    assert mypy_line()[1:] == ["releases/engine", "releases/selectors.py", "releases/services", "tools"]


def test_mypy__make_lint_targets__no_errors(tmp_path):
    result = run_mypy(mypy_line()[1:], tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found")


def test_mypy__engine_untyped_def_and_type_error__reported_but_not_an_imported_modules(tmp_path):
    # Given an engine module with an untyped function and a wrong return type, and an error in a
    # module the engine imports that is not a target (shadow files: the tree is not touched)
    bad_engine = tmp_path / "diff.py"
    bad_engine.write_text(
        (ROOT / "releases/engine/diff.py").read_text()
        + "\n\ndef untyped(value):\n    return value\n\n\ndef typed(count: int) -> str:\n    return count\n"
    )
    bad_core = tmp_path / "scrub.py"
    bad_core.write_text((ROOT / "releasemgr/core/scrub.py").read_text() + "\n\nWRONG: int = 'text'\n")

    # When mypy checks the engine with the project's config
    result = run_mypy(
        [
            "--shadow-file",
            "releases/engine/diff.py",
            str(bad_engine),
            "--shadow-file",
            "releasemgr/core/scrub.py",
            str(bad_core),
            "releases/engine/diff.py",
            "releases/engine/target.py",  # imports releasemgr.core.scrub
        ],
        tmp_path / "cache",
    )

    # Then both engine errors fail it; the imported module's error is not reported
    assert result.returncode == 1, result.stdout + result.stderr
    assert "releases/engine/diff.py" in result.stdout and "[no-untyped-def]" in result.stdout
    assert "[return-value]" in result.stdout
    assert "scrub.py" not in result.stdout
    assert "Found 2 errors in 1 file" in result.stdout
