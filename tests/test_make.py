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


def test_make_run__port__printed_and_mailed_links_use_it():
    result = make("run", "PORT=9123")

    lines = [line for line in result.stdout.splitlines() if "manage.py" in line]
    demo = next(line for line in lines if "bootstrap_demo" in line)
    serve = next(line for line in lines if "runserver" in line)
    assert 'SITE_URL="${SITE_URL:-http://127.0.0.1:9123}"' in demo  # an operator's SITE_URL still wins
    assert "runserver 127.0.0.1:9123" in serve and "http://127.0.0.1:9123" in serve


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


def test_make_test__no_tests_collected__both_passes_run_and_the_target_fails():
    result = make(
        "test",
        "PYTEST_ARGS=-k no_such_test_anywhere -p no:cacheprovider",
        "PYTEST_XDIST=",
        "CI=",
        dry_run=False,
    )

    assert result.returncode != 0
    # pytest's exit code 5 ("no tests collected") fails each pass, and the second still ran.
    assert "test-sqlite] Error 5" in result.stderr, result.stderr[-2000:]
    assert "test-pg-control] Error 5" in result.stderr or "pass skipped" in result.stdout


# --- the guide's GitHub Actions workflow, its scripts run against a live server ----------------------


def workflow_steps() -> dict[str, dict]:
    import yaml

    workflow = yaml.safe_load((ROOT / "docs" / "github-actions-release.yml").read_text())
    return {name: job for name, job in workflow["jobs"].items()}


def run_step(job: dict, env: dict[str, str], workdir) -> subprocess.CompletedProcess:
    """A job's `run:` script as GitHub runs it: bash -eo pipefail, with the step's environment,
    in a work directory of its own (the scripts write response.json there, as in a runner's checkout)."""
    (script,) = [step["run"] for step in job["steps"] if "run" in step]
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=workdir,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_github_workflow__wiring__promote_job_reads_the_prepare_jobs_output():
    jobs = workflow_steps()

    assert jobs["prepare-release"]["outputs"] == {"release_id": "${{ steps.prepare.outputs.release_id }}"}
    assert jobs["promote-release"]["needs"] == "prepare-release"
    (promote,) = [step for step in jobs["promote-release"]["steps"] if "run" in step]
    assert promote["env"]["RELEASE_ID"] == "${{ needs.prepare-release.outputs.release_id }}"


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
def test_github_workflow__scripts_against_a_live_server__prepared_then_promoted(
    live_server, sqlite_database_factory, tmp_path
):
    from django.contrib.auth import get_user_model

    from releases.models import Release
    from tenants.models import FeatureFlag
    from tenants.services import tenant_setup, token_issue

    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(
        slug="acme", environments=urls, admins=["ci-admin"], flags={"dev": {"custom_domains": True}}
    )
    _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username="ci-admin"))
    outputs, summary = tmp_path / "outputs", tmp_path / "summary"
    env = {
        "API_URL": live_server.url,
        "API_TOKEN": token,
        "TENANT_ID": "acme",
        "GITHUB_OUTPUT": str(outputs),
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_RUN_ID": "7",
        "GITHUB_RUN_ATTEMPT": "1",
    }
    jobs = workflow_steps()

    prepared = run_step(jobs["prepare-release"], env, tmp_path)

    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    (line,) = outputs.read_text().splitlines()
    release_id = line.removeprefix("release_id=")
    assert Release.objects.get(release_id=release_id).status == "prepared"

    promoted = run_step(jobs["promote-release"], {**env, "RELEASE_ID": release_id}, tmp_path)

    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert Release.objects.get(release_id=release_id).status == "promoted"
    assert FeatureFlag.objects.get(environment__tenant=tenant, environment__stage="staging").value is True
    assert f"Promoted {release_id}" in summary.read_text()
    # A re-run of the promote job after it succeeded stays green; an unknown release fails the job.
    assert run_step(jobs["promote-release"], {**env, "RELEASE_ID": release_id}, tmp_path).returncode == 0
    missing = run_step(jobs["promote-release"], {**env, "RELEASE_ID": "rel_20000101_0000"}, tmp_path)
    assert missing.returncode != 0 and "::error::" in missing.stdout
