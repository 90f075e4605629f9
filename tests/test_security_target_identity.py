"""Targets are identified by what they are, not how their URL is spelled (issue 13, point 2).

The attack: a tenant admin set an environment's URL to another tenant's prod database under another
spelling (`127.1`, `0.0.0.0`, `2130706433`, `?dbname=`, `?hostaddr=`, `localhost`); prepare and
promote then disclosed that tenant's schema and created a table in it. A SQLite target could be any
path the server can write, and a missing file was created. Every test here reads the victim's
database directly (psycopg2 / sqlite3) to show nothing reached it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path

import psycopg2
import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from releases import engine
from releases.models import Release, ReleaseStatus
from tenants.models import Environment
from tenants.services import environment_set, tenant_setup, token_issue

from .conftest import PG_HOST, PG_PORT, PG_USER, pg_admin_connection
from .test_admin_tenants import form_data
from .test_commands import refused

pytestmark = pytest.mark.django_db

NEW_TABLE = {
    "database": {
        "changes": [
            {
                "type": "create_table",
                "table": "pwned",
                "columns": [{"name": "note", "type": "text", "nullable": True}],
            }
        ]
    }
}


def pg_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def pg_tables(name: str) -> list[str]:
    """A's database, read directly: what is in it, whatever releasemgr says."""
    db = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=name)
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")
            return [row[0] for row in cursor.fetchall()]
    finally:
        db.close()


def sqlite_tables(path: str | Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [
            row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1")
        ]


def spellings(url: str) -> dict[str, str]:
    """Other URLs of the database `postgres://user@127.0.0.1:port/name`."""
    name = pg_name(url)
    return {
        "127.1": f"postgres://{PG_USER}@127.1:{PG_PORT}/{name}",
        "0.0.0.0": f"postgres://{PG_USER}@0.0.0.0:{PG_PORT}/{name}",  # noqa: S104 - the attack spelling
        "2130706433": f"postgres://{PG_USER}@2130706433:{PG_PORT}/{name}",
        "localhost": f"postgres://{PG_USER}@localhost:{PG_PORT}/{name}",
        "?dbname=": f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/rm_decoy?dbname={name}",
        "?hostaddr=": f"postgres://{PG_USER}@db.decoy.invalid:{PG_PORT}/{name}?hostaddr=127.0.0.1",
    }


SPELLINGS = list(spellings("postgres://any/name"))


def tenant_with_api(slug: str, urls: dict[str, str]):
    tenant = tenant_setup(slug=slug, environments=urls, admins=[f"{slug}-admin"])
    admin = get_user_model().objects.get(username=f"{slug}-admin")
    admin.is_staff = True
    admin.save(update_fields=["is_staff"])
    _, token = token_issue(tenant=tenant, user=admin)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return {"tenant": tenant, "admin": admin, "api": api, "urls": urls}


@pytest.fixture
def two_pg_tenants(pg_database_factory):
    a = tenant_with_api("alpha", {stage: pg_database_factory() for stage in ("dev", "staging", "prod")})
    b = tenant_with_api("beta", {stage: pg_database_factory() for stage in ("dev", "staging", "prod")})
    return a, b


def reachable_as(url: str, victim_url: str) -> bool:
    """Does `url` really reach the victim's database? (Else the test would prove nothing.)"""
    try:
        with engine.open_target(url) as target, engine.open_target(victim_url) as victim:
            return target.identity == victim.identity
    except engine.TargetError:
        return False


def store_url(environment: Environment, url: str) -> None:
    """A URL stored before the form and command checked it (or through any other writer)."""
    environment.database_url = url
    environment.save()


def prepare(api, to_env="staging", from_env="dev", bundle=NEW_TABLE):
    return api.post(
        "/api/releases/prepare",
        {"from_env": from_env, "to_env": to_env, "bundle_data": bundle},
        format="json",
    )


def assert_refused(response) -> None:
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "target_refused", error
    assert "alpha" not in error["message"] and "127" not in error["message"]


# --- PostgreSQL: another spelling of another tenant's database --------------------------------------


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_prepare__beta_staging_at_another_spelling_of_alphas_prod__409_and_nothing_in_alpha(
    two_pg_tenants, spelling
):
    a, b = two_pg_tenants
    url = spellings(a["urls"]["prod"])[spelling]
    if not reachable_as(url, a["urls"]["prod"]):
        pytest.skip(f"{spelling} does not reach the database on this machine")
    store_url(Environment.objects.get(tenant=b["tenant"], stage="staging"), url)

    response = prepare(b["api"])

    assert_refused(response)
    assert not Release.objects.filter(tenant=b["tenant"]).exists()
    assert pg_tables(pg_name(a["urls"]["prod"])) == []


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_promote__beta_staging_repointed_after_prepare_to_alphas_prod__409_and_nothing_in_alpha(
    two_pg_tenants, spelling
):
    a, b = two_pg_tenants
    url = spellings(a["urls"]["prod"])[spelling]
    if not reachable_as(url, a["urls"]["prod"]):
        pytest.skip(f"{spelling} does not reach the database on this machine")
    response = prepare(b["api"])
    assert response.status_code == 201, response.content
    release_id = response.json()["data"]["release_id"]
    store_url(Environment.objects.get(tenant=b["tenant"], stage="staging"), url)

    response = b["api"].post("/api/releases/promote", {"release_id": release_id}, format="json")

    assert_refused(response)
    assert Release.objects.get(release_id=release_id).status == ReleaseStatus.PREPARED
    assert pg_tables(pg_name(a["urls"]["prod"])) == []
    assert pg_tables(pg_name(b["urls"]["staging"])) == []


def test_promote__url_repointed_while_promoting__the_task_refuses_too(two_pg_tenants, monkeypatch):
    """The request's check is not the only one: the task's own open refuses (every open verifies)."""
    a, b = two_pg_tenants
    response = prepare(b["api"])
    release_id = response.json()["data"]["release_id"]
    url = spellings(a["urls"]["prod"])["127.1"]
    from releases.services import targets

    # The URL changes between the request's check and the task's open.
    real_verify = targets.target_verify

    def verify_then_repoint(environment):
        real_verify(environment)
        store_url(Environment.objects.get(pk=environment.pk), url)

    monkeypatch.setattr("releases.services.promote.target_verify", verify_then_repoint)
    response = b["api"].post("/api/releases/promote", {"release_id": release_id}, format="json")

    release = Release.objects.get(release_id=release_id)
    assert release.status == ReleaseStatus.FAILED and release.error_code == "target_refused", response.content
    assert pg_tables(pg_name(a["urls"]["prod"])) == []


def test_rollback__beta_staging_repointed_after_promote_to_alphas_staging__409_and_alpha_untouched(
    two_pg_tenants,
):
    a, b = two_pg_tenants
    response = prepare(b["api"])
    release_id = response.json()["data"]["release_id"]
    response = b["api"].post("/api/releases/promote", {"release_id": release_id}, format="json")
    assert response.json()["data"]["status"] == "promoted", response.content
    # alpha's staging now has a table of that name too: a rollback reaching it would drop it
    with engine.open_target(a["urls"]["staging"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE pwned (id integer PRIMARY KEY, note text)")
    store_url(
        Environment.objects.get(tenant=b["tenant"], stage="staging"),
        spellings(a["urls"]["staging"])["2130706433"],
    )

    response = b["api"].post("/api/releases/rollback", {"release_id": release_id}, format="json")

    assert_refused(response)
    assert Release.objects.get(release_id=release_id).status == ReleaseStatus.PROMOTED
    assert pg_tables(pg_name(a["urls"]["staging"])) == ["pwned"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_admin__beta_admin_sets_another_spelling_of_alphas_prod__form_error_url_unchanged(
    two_pg_tenants, spelling
):
    a, b = two_pg_tenants
    url = spellings(a["urls"]["prod"])[spelling]
    if not reachable_as(url, a["urls"]["prod"]):
        pytest.skip(f"{spelling} does not reach the database on this machine")
    staging = Environment.objects.get(tenant=b["tenant"], stage="staging")
    client = Client()
    client.force_login(b["admin"])
    change = reverse("admin:tenants_environment_change", args=[staging.pk])
    data = form_data(client.get(change))
    data["database_url"] = url

    response = client.post(change, data)

    assert response.status_code == 200
    page = response.content.decode()
    assert "already the target database of another tenant" in page and "alpha" not in page
    staging.refresh_from_db()
    assert staging.database_url == b["urls"]["staging"]
    assert pg_tables(pg_name(a["urls"]["prod"])) == []


@pytest.mark.parametrize("spelling", ["127.1", "2130706433", "?dbname=", "?hostaddr="])
def test_tenant_setup_command__another_spelling_of_alphas_prod__refused_nothing_saved(
    two_pg_tenants, spelling
):
    a, b = two_pg_tenants
    url = spellings(a["urls"]["prod"])[spelling]
    if not reachable_as(url, a["urls"]["prod"]):
        pytest.skip(f"{spelling} does not reach the database on this machine")

    code, _, err = refused("tenant_setup", "beta", f"--env=staging={url}")

    assert code == 1 and "target_refused" in err, err
    assert "already the target database of another tenant" in err
    staging = Environment.objects.get(tenant=b["tenant"], stage="staging")
    assert staging.database_url == b["urls"]["staging"]


def test_own_database_under_another_spelling__opens_and_is_claimed(two_pg_tenants):
    """Legit: one tenant's own database, spelled differently, is still theirs."""
    a, _ = two_pg_tenants
    staging = Environment.objects.get(tenant=a["tenant"], stage="staging")
    claimed = staging.target_identity
    assert claimed.startswith("postgresql:")
    store_url(staging, spellings(a["urls"]["staging"])["2130706433"])
    assert Environment.objects.get(pk=staging.pk).target_identity == ""  # setting the URL clears the claim

    response = prepare(a["api"])

    assert response.status_code == 201, response.content
    assert Environment.objects.get(pk=staging.pk).target_identity == claimed


def test_identity_changed__database_recreated_under_the_same_url__refused_until_set_again(two_pg_tenants):
    a, _ = two_pg_tenants
    name = pg_name(a["urls"]["staging"])
    admin = pg_admin_connection()
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()

    response = prepare(a["api"])

    assert response.status_code == 409 and response.json()["error"]["code"] == "target_refused"
    assert "identity changed" in response.json()["error"]["message"]
    assert pg_tables(name) == []

    environment_set(tenant=a["tenant"], stage="staging", database_url=a["urls"]["staging"])
    assert prepare(a["api"]).status_code == 201


def test_control_database__any_spelling__refused():
    if connection.vendor != "postgresql":
        pytest.skip("the control database is not PostgreSQL in this run")
    name = connection.settings_dict["NAME"]
    for url in (
        f"postgres://{PG_USER}@127.1:{PG_PORT}/{name}",
        f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/rm_decoy?dbname={name}",
    ):
        with pytest.raises(engine.TargetRefused) as info, engine.open_target(url):
            pass
        assert "releasemgr's own control database" in info.value.message


def test_prepare__staging_at_the_control_database__409_and_control_untouched(two_pg_tenants):
    if connection.vendor != "postgresql":
        pytest.skip("the control database is not PostgreSQL in this run")
    _, b = two_pg_tenants
    name = connection.settings_dict["NAME"]
    store_url(
        Environment.objects.get(tenant=b["tenant"], stage="staging"),
        f"postgres://{PG_USER}@2130706433:{PG_PORT}/{name}",
    )
    response = prepare(b["api"])

    assert_refused(response)
    assert "pwned" not in connection.introspection.table_names()


# --- SQLite: confined to TARGETS_DIR, never created by a read -------------------------------------------


@pytest.fixture
def sqlite_tenants(sqlite_database_factory):
    a = tenant_with_api("alpha", {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")})
    b = tenant_with_api("beta", {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")})
    return a, b


@pytest.fixture
def outside_dir():
    """A directory outside TARGETS_DIR (the session's pytest base directory)."""
    with tempfile.TemporaryDirectory(prefix="rm-outside-") as path:
        yield Path(path)


def test_open_target__sqlite_outside_targets_dir__refused_and_not_created(outside_dir, tmp_path):
    missing = outside_dir / "new.sqlite3"
    existing = outside_dir / "old.sqlite3"
    sqlite3.connect(existing).close()
    link = tmp_path / "link.sqlite3"
    link.symlink_to(existing)
    dotdot = f"{tmp_path}/{os.path.relpath(existing, tmp_path)}"
    assert ".." in dotdot

    for path in (missing, existing, link, dotdot):
        with pytest.raises(engine.TargetRefused) as info, engine.open_target(f"sqlite:///{path}"):
            pass
        assert "outside the targets directory" in info.value.message
    assert not missing.exists()


def test_open_target__missing_sqlite_file_inside_targets_dir__error_and_not_created(tmp_path):
    missing = tmp_path / "missing.sqlite3"

    with pytest.raises(engine.TargetError) as info, engine.open_target(f"sqlite:///{missing}"):
        pass

    assert "does not exist" in info.value.message
    assert not missing.exists()


def test_prepare__staging_outside_targets_dir__409_and_file_not_created(sqlite_tenants, outside_dir):
    _, b = sqlite_tenants
    target = outside_dir / "anywhere.sqlite3"
    store_url(Environment.objects.get(tenant=b["tenant"], stage="staging"), f"sqlite:///{target}")

    response = prepare(b["api"])

    assert_refused(response)
    assert not target.exists()


def test_prepare__staging_at_a_missing_file__503_and_file_not_created(sqlite_tenants, tmp_path):
    _, b = sqlite_tenants
    target = tmp_path / "new.sqlite3"
    store_url(Environment.objects.get(tenant=b["tenant"], stage="staging"), f"sqlite:///{target}")

    response = prepare(b["api"])

    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "target_unreachable"
    assert not target.exists()


def test_admin__sqlite_url_outside_targets_dir__form_error(sqlite_tenants, outside_dir):
    _, b = sqlite_tenants
    staging = Environment.objects.get(tenant=b["tenant"], stage="staging")
    client = Client()
    client.force_login(b["admin"])
    change = reverse("admin:tenants_environment_change", args=[staging.pk])
    data = form_data(client.get(change))
    data["database_url"] = f"sqlite:///{outside_dir / 'x.sqlite3'}"

    response = client.post(change, data)

    assert response.status_code == 200
    assert "outside the targets directory" in response.content.decode()
    assert not (outside_dir / "x.sqlite3").exists()


@pytest.mark.parametrize("alias", ["hard link", "symlink"])
def test_prepare__beta_staging_at_a_link_to_alphas_prod_file__409_and_nothing_in_alpha(
    sqlite_tenants, tmp_path, alias
):
    a, b = sqlite_tenants
    prod = a["urls"]["prod"].removeprefix("sqlite:///")
    link = tmp_path / "innocent.sqlite3"
    if alias == "hard link":
        os.link(prod, link)
    else:
        link.symlink_to(prod)
    store_url(Environment.objects.get(tenant=b["tenant"], stage="staging"), f"sqlite:///{link}")

    response = prepare(b["api"])

    assert_refused(response)
    assert sqlite_tables(prod) == []


def test_identity_changed__symlink_repointed__refused_until_set_again(sqlite_tenants, tmp_path):
    a, _ = sqlite_tenants
    first, second = tmp_path / "first.sqlite3", tmp_path / "second.sqlite3"
    first.touch()
    second.touch()
    link = tmp_path / "staging.sqlite3"
    link.symlink_to(first)
    environment_set(tenant=a["tenant"], stage="staging", database_url=f"sqlite:///{link}")
    assert prepare(a["api"]).status_code == 201

    link.unlink()
    link.symlink_to(second)
    response = prepare(a["api"])

    assert response.status_code == 409 and response.json()["error"]["code"] == "target_refused"
    assert "identity changed" in response.json()["error"]["message"]

    environment_set(tenant=a["tenant"], stage="staging", database_url=f"sqlite:///{link}")
    assert prepare(a["api"]).status_code == 201


def test_legit__both_tenants_prepare_and_promote_on_their_own_databases(sqlite_tenants):
    for tenant in sqlite_tenants:
        response = prepare(tenant["api"])
        assert response.status_code == 201, response.content
        release_id = response.json()["data"]["release_id"]
        response = tenant["api"].post("/api/releases/promote", {"release_id": release_id}, format="json")
        assert response.status_code == 200 and response.json()["data"]["status"] == "promoted"
        assert "pwned" in sqlite_tables(tenant["urls"]["staging"].removeprefix("sqlite:///"))
    identities = {e.target_identity for e in Environment.objects.all()}
    assert len(identities) == 6 and all(i.startswith("sqlite:") for i in identities)


def test_claims_race__two_tenants_claim_one_database__never_both():
    """Two environments of different tenants that reach the same unclaimed database at once: the
    claim re-checks after writing, so at most one of them keeps it."""
    from tenants.targets import claim_identity

    identity = engine.TargetIdentity(key="postgresql:1:1")
    tenants = [tenant_setup(slug=f"racer{i}", environments={}) for i in range(2)]
    environments = [
        Environment.objects.create(tenant=tenant, stage="dev", database_url_encrypted="x")
        for tenant in tenants
    ]
    # Sequential stand-in for the race's worst interleaving: both wrote their claim before either checked.
    Environment.objects.filter(pk=environments[0].pk).update(target_identity=identity.key)
    with pytest.raises(engine.TargetRefused):
        claim_identity(environments[1], identity)
    environments[1].refresh_from_db()
    assert environments[1].target_identity == ""


def test_source__every_open_of_an_environments_target_goes_through_open_environment():
    """`engine.open_target(<environment>.database_url)` would skip the identity check."""
    import re

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for package in ("releases", "tenants", "tools", "releasemgr"):
        for path in (root / package).rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"open_target\(([^)]*)\)", text):
                if "database_url" in match.group(1):
                    offenders.append(f"{path.relative_to(root)}: {match.group(0)}")
    assert offenders == [
        "tenants/targets.py: open_target(environment.database_url, lock_timeout_ms=lock_timeout_ms)"
    ]
