"""The management commands: what an operator and a script see (stdout, stderr, exit codes) and what they change."""

from __future__ import annotations

import io
import json

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone
from rest_framework.test import APIClient

from releases import engine
from releases.models import AuditEvent, Migration, Release
from tenants import crypto
from tenants.models import ApiToken, Environment, FeatureFlag, Membership, Tenant

CREATE_NEW_FEATURE = {
    "type": "create_table",
    "table": "new_feature",
    "columns": [
        {"name": "name", "type": "string", "max_length": 100, "nullable": False},
        {"name": "enabled", "type": "boolean", "nullable": False, "default": False},
    ],
}


def run(*args, **options) -> tuple[str, str]:
    """Call a command; returns (stdout, stderr). Refusals raise SystemExit, bad arguments CommandError."""
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def refused(*args, **options) -> tuple[int, str, str]:
    """Call a command that must refuse; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command(*args, stdout=out, stderr=err, **options)
    return exit_info.value.code, out.getvalue(), err.getvalue()


def api(token: str, slug: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client


def write_bundle(tmp_path, changes, flags=None, name="bundle.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps({"database": {"changes": changes}, "feature_flags": flags or {}}))
    return str(path)


def tables_of(url: str) -> set[str]:
    with engine.open_target(url) as target:
        return set(engine.introspect(target)["tables"])


def setup_tenant(factory, slug: str = "acme") -> dict[str, str]:
    urls = {stage: factory() for stage in ("dev", "staging", "prod")}
    run(
        "tenant_setup",
        slug,
        *[f"--env={stage}={url}" for stage, url in urls.items()],
        "--admin=alice",
        "--approver=bob",
    )
    return urls


# --- bootstrap_demo ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_bootstrap_demo__run_twice__one_tenant_three_environments_two_users_working_tokens(tmp_path):
    first_out, _ = run("bootstrap_demo", targets_dir=str(tmp_path))
    second_out, _ = run("bootstrap_demo", targets_dir=str(tmp_path))

    assert Tenant.objects.filter(slug="primary").count() == 1
    tenant = Tenant.objects.get(slug="primary")
    environments = Environment.objects.filter(tenant=tenant)
    assert sorted(environments.values_list("stage", flat=True)) == ["dev", "prod", "staging"]
    for environment in environments:
        assert environment.database_url == f"sqlite:///{tmp_path / f'primary_{environment.stage}.sqlite3'}"
        assert environment.flags.count() == 2  # the guide's two flags, not duplicated by the second run
    assert FeatureFlag.objects.get(environment__stage="dev", name="advanced_analytics").value is True
    assert FeatureFlag.objects.get(environment__stage="prod", name="custom_domains").value is False
    users = get_user_model().objects.filter(username__in=["admin", "approver"])
    assert users.count() == 2 and get_user_model().objects.count() == 2
    admin, approver = users.get(username="admin"), users.get(username="approver")
    assert admin.is_superuser and admin.is_staff and admin.email
    assert approver.is_staff and not approver.is_superuser and approver.email
    assert admin.check_password("admin") and approver.check_password("approver")
    roles = dict(Membership.objects.filter(tenant=tenant).values_list("user__username", "role"))
    assert roles == {"admin": "admin", "approver": "approver"}

    first_token = first_out.strip().splitlines()[-1]
    second_token = second_out.strip().splitlines()[-1]
    assert first_token != second_token and ApiToken.objects.filter(tenant=tenant).count() == 2
    assert "admin/" in first_out and "password admin" in first_out
    for token in (first_token, second_token):
        response = api(token, "primary").get("/api/releases/")
        assert response.status_code == 200, response.content
        assert response.json()["data"]["count"] == 0
    assert api(first_token, "other").get("/api/releases/").status_code == 403


@pytest.mark.django_db
def test_bootstrap_demo__primary_already_points_elsewhere__that_environment_left_alone(
    tmp_path, sqlite_database_factory
):
    demo = {stage: f"sqlite:///{tmp_path / f'primary_{stage}.sqlite3'}" for stage in ("dev", "staging")}
    real_prod = sqlite_database_factory()
    run(
        "tenant_setup",
        "primary",
        f"--env=dev={demo['dev']}",
        f"--env=staging={demo['staging']}",
        f"--env=prod={real_prod}",
    )

    out, _ = run("bootstrap_demo", targets_dir=str(tmp_path))

    urls = {e.stage: e.database_url for e in Environment.objects.filter(tenant__slug="primary")}
    assert urls == {**demo, "prod": real_prod}
    assert "except prod" in out and "except dev" not in out and real_prod not in out


@pytest.mark.django_db
def test_bootstrap_demo__production_without_passwords__refused_nothing_created(
    tmp_path, settings, monkeypatch
):
    settings.RELEASEMGR_ENV = "production"
    monkeypatch.delenv("DEMO_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("DEMO_APPROVER_PASSWORD", raising=False)

    code, _, err = refused("bootstrap_demo", targets_dir=str(tmp_path))

    assert code == 1 and "DEMO_ADMIN_PASSWORD" in err and err.startswith("error: misconfigured:")
    assert not Tenant.objects.exists() and not get_user_model().objects.exists()


@pytest.mark.django_db
def test_bootstrap_demo__production_with_passwords__uses_them_and_never_prints_them(
    tmp_path, settings, monkeypatch
):
    settings.RELEASEMGR_ENV = "production"
    monkeypatch.setenv("DEMO_ADMIN_PASSWORD", "s3cret-admin-pw")
    monkeypatch.setenv("DEMO_APPROVER_PASSWORD", "s3cret-approver-pw")

    out, _ = run("bootstrap_demo", targets_dir=str(tmp_path))

    assert "s3cret" not in out and "DEMO_ADMIN_PASSWORD" in out
    assert get_user_model().objects.get(username="admin").check_password("s3cret-admin-pw")
    assert get_user_model().objects.get(username="approver").check_password("s3cret-approver-pw")


# --- tenant_setup ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_tenant_setup__new_tenant__creates_users_memberships_environments_and_flags(sqlite_database_factory):
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}

    out, _ = run(
        "tenant_setup",
        "acme",
        *[f"--env={stage}={url}" for stage, url in urls.items()],
        "--admin=alice",
        "--approver=bob",
        "--approver=carol",
        "--email=bob=bob@example.com",
        '--flags=prod={"custom_domains": false, "plan": "enterprise"}',
        "--json",
    )

    result = json.loads(out)
    assert result["users_created"] == ["alice", "bob", "carol"]
    assert result["members"] == {"alice": "admin", "bob": "approver", "carol": "approver"}
    assert all("sqlite:///***" in masked for masked in result["environments"].values())
    tenant = Tenant.objects.get(slug="acme")
    for stage, url in urls.items():
        assert Environment.objects.get(tenant=tenant, stage=stage).database_url == url
    prod = Environment.objects.get(tenant=tenant, stage="prod")
    assert {f.name: f.value for f in prod.flags.all()} == {"custom_domains": False, "plan": "enterprise"}
    assert (prod.approvals_required, prod.allow_self_approval) == (1, False)
    assert get_user_model().objects.get(username="bob").email == "bob@example.com"
    assert not get_user_model().objects.get(username="alice").has_usable_password()
    for url in urls.values():
        assert url not in out

    # Run again: nothing duplicated, a new approver added, an environment URL changed.
    new_dev = sqlite_database_factory()
    run("tenant_setup", "acme", f"--env=dev={new_dev}", "--approver=dave")
    assert Tenant.objects.count() == 1 and Environment.objects.count() == 3
    assert Membership.objects.filter(tenant=tenant).count() == 4
    assert Environment.objects.get(tenant=tenant, stage="dev").database_url == new_dev


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ["--env=dev=mysql://u:p@h/db", "--env=staging=sqlite:////tmp/s", "--env=prod=sqlite:////tmp/p"],
            "scheme",
        ),
        (["--env=qa=sqlite:////tmp/q"], "unknown stage 'qa'"),
        (["--env=dev"], "STAGE=URL"),
        (["--env=dev=sqlite:////tmp/d"], "missing: --env staging=URL, --env prod=URL"),
        (["--env=dev=sqlite:////tmp/d", "--env=dev=sqlite:////tmp/e"], "given twice"),
        (
            [
                "--env=dev=sqlite:////tmp/d",
                "--env=staging=sqlite:////tmp/s",
                "--env=prod=sqlite:////tmp/p",
                "--flags=prod={not json",
            ],
            "not valid JSON",
        ),
        (
            [
                "--env=dev=sqlite:////tmp/d",
                "--env=staging=sqlite:////tmp/s",
                "--env=prod=sqlite:////tmp/p",
                '--flags=prod={"x": 1}',
            ],
            "true, false or a plan name",
        ),
        (
            [
                "--env=dev=sqlite:////tmp/d",
                "--env=staging=sqlite:////tmp/s",
                "--env=prod=sqlite:////tmp/p",
                "--admin=bad name;",
            ],
            "Invalid user name",
        ),
    ],
)
def test_tenant_setup__bad_input__clear_error_exit_2_nothing_saved(arguments, message):
    with pytest.raises(CommandError) as error:
        run("tenant_setup", "acme", *arguments)

    assert error.value.returncode == 2 and message in str(error.value)
    assert not Tenant.objects.exists() and not Environment.objects.exists()
    assert not get_user_model().objects.exists()


@pytest.mark.django_db
def test_tenant_setup__bad_slug__refused():
    with pytest.raises(CommandError) as error:
        run("tenant_setup", "no spaces!", "--env=dev=sqlite:////tmp/d")
    assert error.value.returncode == 2 and "slug" in str(error.value)


THREE_ENVS = ["--env=dev=sqlite:////tmp/d", "--env=staging=sqlite:////tmp/s", "--env=prod=sqlite:////tmp/p"]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        # Longer than the columns hold: refused up front, not a database error on PostgreSQL.
        (["--name=" + "n" * 201], "--name: Ensure this value has at most 200 characters"),
        (['--flags=prod={"' + "f" * 101 + '": true}'], "at most 100 characters"),
        (["--flags=qa={}"], "unknown stage 'qa'"),
        (["--email=bob=not-an-address", "--admin=bob"], "'not-an-address' is not an e-mail address"),
        (["--email=bob=bob@example.com"], "neither --admin nor --approver: ['bob']"),
        (["--email=bad name=bob@example.com", "--admin=bob"], "Invalid user name 'bad name'"),
        (["--unknown-option"], "unrecognized arguments: --unknown-option"),
    ],
)
def test_tenant_setup__more_bad_input__clear_error_exit_2_nothing_saved(arguments, message):
    with pytest.raises(CommandError) as error:
        run("tenant_setup", "acme", *THREE_ENVS, *arguments)

    assert error.value.returncode == 2 and message in str(error.value), str(error.value)
    assert not Tenant.objects.exists() and not get_user_model().objects.exists()


@pytest.mark.django_db
def test_tenant_setup__options_as_keywords__parsed_by_the_same_types(sqlite_database_factory):
    with pytest.raises(CommandError) as error:
        run("tenant_setup", "acme", env=["dev=sqlite:////tmp/d", "staging=mysql://u:pw@h/db"])
    assert error.value.returncode == 2 and "--env: staging: unsupported target database scheme" in str(
        error.value
    )
    assert "pw" not in str(error.value)

    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    out, _ = run(
        "tenant_setup",
        "acme",
        env=[f"{stage}={url}" for stage, url in urls.items()],
        admin=["alice"],
        flags=['dev={"beta": true}'],
        json=True,
    )
    assert json.loads(out)["members"] == {"alice": "admin"}
    dev = Environment.objects.get(tenant__slug="acme", stage="dev")
    assert dev.database_url == urls["dev"] and dev.flags.get(name="beta").value is True


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["no spaces!"], "argument slug: Invalid tenant slug 'no spaces!'"),
        (["acme", "--env=dev=sqlite:////tmp/d", "--env=dev=sqlite:////tmp/e"], "--env: dev is given twice."),
    ],
)
def test_tenant_setup__bad_input_on_the_command_line__exit_2_message_no_traceback(
    tmp_path, arguments, message
):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{tmp_path / 'control.sqlite3'}",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
    }
    completed = subprocess.run(
        [sys.executable, "manage.py", "tenant_setup", *arguments],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stderr
    assert message in completed.stderr and "Traceback" not in completed.stderr
    assert completed.stdout == ""


# --- tokens ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_issue_token__member__last_line_authenticates_and_only_its_hash_is_stored(sqlite_database_factory):
    setup_tenant(sqlite_database_factory)

    out, _ = run("issue_token", "--tenant=acme", "--user=bob", "--name=ci", "--expires-days=7")

    raw = out.strip().splitlines()[-1]
    assert raw.startswith("rm_") and " " not in raw
    token = ApiToken.objects.get()
    assert token.token_hash == ApiToken.hash(raw) and token.name == "ci" and token.expires_at is not None
    stored = [str(value) for value in ApiToken.objects.values_list().get()]
    assert raw not in stored
    response = api(raw, "acme").get("/api/releases/")
    assert response.status_code == 200, response.content
    # bob is an approver: release operations stay admin-only.
    assert api(raw, "acme").post("/api/releases/prepare", {}, format="json").status_code == 403

    run("revoke_token", f"--prefix={token.prefix}")
    assert api(raw, "acme").get("/api/releases/").status_code == 401


@pytest.mark.django_db
def test_issue_token__not_a_member_or_unknown__refused_exit_1_no_token(sqlite_database_factory):
    setup_tenant(sqlite_database_factory)
    get_user_model().objects.create(username="mallory")

    code, out, err = refused("issue_token", "--tenant=acme", "--user=mallory")
    assert code == 1 and err.startswith("error: forbidden:") and out == ""
    code, _, err = refused("issue_token", "--tenant=nope", "--user=alice")
    assert code == 1 and err.startswith("error: not_found:")
    code, _, err = refused("revoke_token", "--prefix=rm_doesnotexist")
    assert code == 1 and err.startswith("error: not_found:")
    assert not ApiToken.objects.exists()


# --- encryption keys ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_rotate_encryption_keys__new_key_first__old_key_alone_no_longer_decrypts(
    sqlite_database_factory, settings
):
    from cryptography.fernet import Fernet, InvalidToken

    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    settings.FIELD_ENCRYPTION_KEYS = [old_key]
    crypto._fernet.cache_clear()
    urls = setup_tenant(sqlite_database_factory)
    before = dict(Environment.objects.values_list("stage", "database_url_encrypted"))
    assert all(Fernet(old_key.encode()).decrypt(value.encode()) for value in before.values())

    settings.FIELD_ENCRYPTION_KEYS = [new_key, old_key]
    crypto._fernet.cache_clear()
    out, _ = run("rotate_encryption_keys")

    assert "Re-encrypted 3" in out
    for environment in Environment.objects.all():
        assert environment.database_url_encrypted != before[environment.stage]
        with pytest.raises(InvalidToken):
            Fernet(old_key.encode()).decrypt(environment.database_url_encrypted.encode())
        assert (
            Fernet(new_key.encode()).decrypt(environment.database_url_encrypted.encode()).decode()
            == urls[environment.stage]
        )
    settings.FIELD_ENCRYPTION_KEYS = [new_key]
    crypto._fernet.cache_clear()
    assert {e.stage: e.database_url for e in Environment.objects.all()} == urls
    crypto._fernet.cache_clear()


# --- the release commands end to end -----------------------------------------------------------


def add_column(table: str, name: str) -> dict:
    return {
        "type": "add_column",
        "table": table,
        "column": {"name": name, "type": "integer", "nullable": True},
    }


def flow(factory, tmp_path) -> tuple[dict[str, str], str]:
    """A tenant whose staging has `new_feature` from a promoted release; returns its URLs and the release id."""
    urls = setup_tenant(factory)
    bundle = write_bundle(tmp_path, [CREATE_NEW_FEATURE], {"custom_domains": True})
    out, _ = run("release_prepare", "--tenant=acme", f"--bundle={bundle}")
    manifest = json.loads(out)
    assert manifest["status"] == "prepared", manifest
    out, _ = run("release_promote", "--tenant=acme")
    assert json.loads(out)["status"] == "promoted"
    return urls, manifest["release_id"]


@pytest.mark.django_db
def test_release_commands__prepare_promote_list_rollback__sqlite_targets_follow(
    sqlite_database_factory, tmp_path
):
    urls = setup_tenant(sqlite_database_factory)
    bundle = write_bundle(tmp_path, [CREATE_NEW_FEATURE], {"custom_domains": True})

    out, err = run("release_prepare", "--tenant=acme", f"--bundle={bundle}")

    manifest = json.loads(out)  # stdout is the manifest alone, whatever else the services print
    release_id = manifest["release_id"]
    assert manifest["id"] == release_id and manifest["status"] == "prepared"
    assert (manifest["from_env"], manifest["to_env"]) == ("dev", "staging")
    assert manifest["created_by"] == "alice"  # the tenant's first admin
    assert [m["operation"] for m in manifest["migrations"]] == ["create_table"]
    assert "new_feature" in manifest["migrations"][0]["sql"]
    assert "new_feature" not in tables_of(urls["staging"])

    out, _ = run("release_promote", "--tenant=acme")  # the latest prepared release by default

    promoted = json.loads(out)
    assert (promoted["release_id"], promoted["status"]) == (release_id, "promoted")
    assert promoted["promoted_at"].endswith("Z")
    assert "new_feature" in tables_of(urls["staging"])
    assert "new_feature" not in tables_of(urls["dev"]) | tables_of(urls["prod"])
    assert FeatureFlag.objects.get(environment__stage="staging", name="custom_domains").value is True

    out, _ = run("release_list", "--tenant=acme", "--json")
    assert [(r["release_id"], r["status"]) for r in json.loads(out)] == [(release_id, "promoted")]
    out, _ = run("release_list", "--tenant=acme", "--status=promoted", "--to-env=staging")
    assert release_id in out and "promoted" in out
    out, _ = run("release_list", "--tenant=acme", "--to-env=prod", "--json")
    assert json.loads(out) == []

    out, _ = run("release_rollback", "--tenant=acme", f"--release={release_id}")

    rolled_back = json.loads(out)
    assert rolled_back["status"] == "rolled_back" and rolled_back["rolled_back"] is True
    assert "new_feature" not in tables_of(urls["staging"])
    assert not FeatureFlag.objects.filter(environment__stage="staging", name="custom_domains").exists()
    events = list(
        AuditEvent.objects.filter(release__release_id=release_id).values_list("event", "actor_username")
    )
    assert events == [
        ("release.prepared", "alice"),
        ("release.promoted", "alice"),
        ("release.rollback", "alice"),
    ]


@pytest.mark.django_db
def test_release_commands__postgresql_targets__prepare_promote_rollback(pg_database_factory, tmp_path):
    urls, release_id = flow(pg_database_factory, tmp_path)
    assert "new_feature" in tables_of(urls["staging"])

    out, _ = run("release_rollback", "--tenant=acme", f"--release={release_id}", "--user=alice")

    assert json.loads(out)["rolled_back"] is True
    assert "new_feature" not in tables_of(urls["staging"])
    assert Release.objects.get(release_id=release_id).status == "rolled_back"


@pytest.mark.django_db
def test_release_rollback__to__rolls_back_newer_releases_newest_first(sqlite_database_factory, tmp_path):
    urls, first = flow(sqlite_database_factory, tmp_path)
    ids = [first]
    for column in ("second", "third"):
        bundle = write_bundle(tmp_path, [add_column("new_feature", column)], name=f"{column}.json")
        ids.append(json.loads(run("release_prepare", "--tenant=acme", f"--bundle={bundle}")[0])["release_id"])
        assert (
            json.loads(run("release_promote", "--tenant=acme", f"--release={ids[-1]}")[0])["status"]
            == "promoted"
        )
    with engine.open_target(urls["staging"]) as target:
        assert {"second", "third"} <= set(engine.introspect(target)["tables"]["new_feature"]["columns"])

    # Rolling back the middle one alone is refused: the newest must go first.
    code, _, err = refused("release_rollback", "--tenant=acme", f"--release={ids[1]}")
    assert code == 1 and err.startswith("error: conflict:") and ids[2] in err

    out, _ = run("release_rollback", "--tenant=acme", f"--to={ids[1]}")

    manifests = json.loads(out)
    assert [m["release_id"] for m in manifests] == [ids[2], ids[1]]
    assert all(m["rolled_back"] for m in manifests)
    order = list(
        AuditEvent.objects.filter(event="release.rollback")
        .order_by("created_at", "id")
        .values_list("release__release_id", flat=True)
    )
    assert order == [ids[2], ids[1]]
    statuses = dict(Release.objects.values_list("release_id", "status"))
    assert statuses == {ids[0]: "promoted", ids[1]: "rolled_back", ids[2]: "rolled_back"}
    with engine.open_target(urls["staging"]) as target:
        assert set(engine.introspect(target)["tables"]["new_feature"]["columns"]) == {"id", "name", "enabled"}


@pytest.mark.django_db
def test_release_commands__refusals__exit_1_with_error_code_and_nothing_changed(
    sqlite_database_factory, tmp_path
):
    urls, release_id = flow(sqlite_database_factory, tmp_path)
    counts = (Release.objects.count(), Migration.objects.count(), AuditEvent.objects.count())
    staging_before = tables_of(urls["staging"])

    # A release skipping a stage.
    code, out, err = refused("release_prepare", "--tenant=acme", "--from=dev", "--to=prod")
    assert (code, out) == (1, "") and err.startswith("error: validation_error:")
    # A change that depends on what the target does not have.
    bundle = write_bundle(tmp_path, [add_column("missing_table", "x")], name="bad.json")
    code, _, err = refused("release_prepare", "--tenant=acme", f"--bundle={bundle}")
    assert code == 1 and err.startswith("error: validation_error:") and "missing_table" in err
    # Promote of a release that is not prepared.
    code, _, err = refused("release_promote", "--tenant=acme", f"--release={release_id}")
    assert code == 1 and err.startswith("error: conflict:")
    # Unknown release, tenant, and a user who is not admin.
    code, _, err = refused("release_promote", "--tenant=acme", "--release=rel_20000101_0000")
    assert code == 1 and err.startswith("error: not_found:")
    code, _, err = refused("release_list", "--tenant=nope")
    assert code == 1 and err.startswith("error: not_found:")
    code, _, err = refused("release_prepare", "--tenant=acme", "--user=bob")
    assert code == 1 and err.startswith("error: forbidden:")

    assert (Release.objects.count(), Migration.objects.count(), AuditEvent.objects.count()) == counts
    assert tables_of(urls["staging"]) == staging_before


@pytest.mark.django_db
def test_release_prepare__bad_arguments__exit_2(sqlite_database_factory, tmp_path):
    setup_tenant(sqlite_database_factory)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for arguments, message in [
        ([f"--bundle={broken}"], "not valid JSON"),
        ([f"--bundle={tmp_path / 'absent.json'}"], "cannot read"),
        (["--allow-unsafe", "adding-not-nullable-field"], "--reason"),
        (["--from=prod"], "Nothing comes after prod"),
    ]:
        with pytest.raises(CommandError) as error:
            run("release_prepare", "--tenant=acme", *arguments)
        assert error.value.returncode == 2 and message in str(error.value)
    assert not Release.objects.exists()


@pytest.mark.django_db
def test_release_promote__prod_without_approval__refused_then_approved_promotes(
    sqlite_database_factory, tmp_path
):
    from releases.services import approval_record

    urls, _ = flow(sqlite_database_factory, tmp_path)
    out, _ = run("release_prepare", "--tenant=acme", "--to=prod")  # computed: staging minus prod
    manifest = json.loads(out)
    assert [m["operation"] for m in manifest["migrations"]] == ["create_table"]
    assert manifest["feature_flags"] == {"custom_domains": True}

    code, _, err = refused("release_promote", "--tenant=acme")
    assert code == 1 and err.startswith("error: approvals_missing:")
    assert "new_feature" not in tables_of(urls["prod"])

    release = Release.objects.get(release_id=manifest["release_id"])
    approval_record(release=release, user=get_user_model().objects.get(username="bob"), decision="approved")
    out, _ = run("release_promote", "--tenant=acme")

    assert json.loads(out)["status"] == "promoted"
    assert "new_feature" in tables_of(urls["prod"])


@pytest.mark.django_db
def test_release_reconcile__release_left_promoting_by_a_dead_worker__settled_failed(
    sqlite_database_factory, tmp_path
):
    urls = setup_tenant(sqlite_database_factory)
    bundle = write_bundle(tmp_path, [CREATE_NEW_FEATURE])
    release_id = json.loads(run("release_prepare", "--tenant=acme", f"--bundle={bundle}")[0])["release_id"]
    # A worker took the release and died before committing anything on the target.
    Release.objects.filter(release_id=release_id).update(status="promoting")

    out, _ = run("release_reconcile", "--tenant=acme")

    assert json.loads(out) == [
        {"tenant": "acme", "release_id": release_id, "to_env": "staging", "status": "failed"}
    ]
    release = Release.objects.get(release_id=release_id)
    assert release.error_code == "worker_lost" and release.failed_at is not None
    assert "new_feature" not in tables_of(urls["staging"])
    assert json.loads(run("release_reconcile")[0]) == []


@pytest.mark.django_db
def test_reconcile_all__one_unreadable_target__skipped_and_the_others_still_settled(
    sqlite_database_factory, tmp_path
):
    from releases.services import reconcile_all

    setup_tenant(sqlite_database_factory, "acme")
    setup_tenant(sqlite_database_factory, "beta")
    bundle = write_bundle(tmp_path, [CREATE_NEW_FEATURE])
    acme_id = json.loads(run("release_prepare", "--tenant=acme", f"--bundle={bundle}")[0])["release_id"]
    beta_id = json.loads(run("release_prepare", "--tenant=beta", f"--bundle={bundle}")[0])["release_id"]
    # acme: a release recorded failed mid-apply (a suspect to re-check), on a target now unreachable.
    acme = Release.objects.get(tenant__slug="acme", release_id=acme_id)
    Release.objects.filter(pk=acme.pk).update(
        status="failed", failed_at=timezone.now(), error_code="apply_failed"
    )
    staging = acme.to_environment
    staging.database_url = "postgres://nobody@127.0.0.1:1/none"
    staging.save()
    # beta: a release left promoting by a dead worker.
    Release.objects.filter(tenant__slug="beta", release_id=beta_id).update(status="promoting")

    settled = reconcile_all()

    assert [release.release_id for release in settled] == [beta_id]
    assert Release.objects.get(tenant__slug="beta", release_id=beta_id).status == "failed"
    assert Release.objects.get(pk=acme.pk).status == "failed"


@pytest.mark.django_db
def test_purge_preserved__older_releases__drops_rm_tables_and_blocks_their_rollback(
    sqlite_database_factory, tmp_path
):
    from releases.models import Preservation

    urls, release_id = flow(sqlite_database_factory, tmp_path)
    bundle = write_bundle(
        tmp_path, [{"type": "drop_column", "table": "new_feature", "column": "enabled"}], name="d.json"
    )
    dropped_id = json.loads(run("release_prepare", "--tenant=acme", f"--bundle={bundle}")[0])["release_id"]
    run("release_promote", "--tenant=acme")
    preserved = list(
        Preservation.objects.filter(release__release_id=dropped_id).values_list("preserved_table", flat=True)
    )
    assert preserved

    def rm_tables() -> set[str]:
        with engine.open_target(urls["staging"]) as target:
            return {name for name in target.connection.introspection.table_names() if name.startswith("_rm_")}

    assert set(preserved) <= rm_tables()

    report = json.loads(run("purge_preserved", "--older-than=30")[0])
    assert report["tables"] == 0 and set(preserved) <= rm_tables()
    report = json.loads(run("purge_preserved", "--older-than=0", "--tenant=acme", "--dry-run")[0])
    assert report["dry_run"] and report["tables"] == len(set(preserved)) and set(preserved) <= rm_tables()

    report = json.loads(run("purge_preserved", "--older-than=0", "--tenant=acme")[0])

    assert report["tables"] == len(set(preserved)) and report["purged"][0]["environment"] == "staging"
    assert not set(preserved) & rm_tables()
    assert not Preservation.objects.filter(release__release_id=dropped_id, purged_at__isnull=True).exists()
    code, _, err = refused("release_rollback", "--tenant=acme", f"--release={dropped_id}")
    assert code == 1 and err.startswith("error: rollback_blocked:")
    with pytest.raises(CommandError) as error:
        run("purge_preserved", "--older-than=-1")
    assert error.value.returncode == 2
