"""A target database is never releasemgr's own control database.

A tenant admin sets their environments' URLs in the admin. Pointed at the control database, a
release would run its DDL there, on every tenant's tables (seen live: a tenant admin added a column
to tenants_tenant of the control database through prepare and promote).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from releases import engine
from releases.engine.target import CONTROL_TABLES
from releases.models import Release
from tenants.models import Environment
from tenants.services import tenant_setup, token_issue

from .test_admin_tenants import form_data

pytestmark = pytest.mark.django_db

ADD_COLUMN = {
    "database": {
        "changes": [
            {"type": "add_column", "table": "tenants_tenant", "column": {"name": "x", "type": "text"}}
        ]
    }
}


def make_control_lookalike(url: str, tables=CONTROL_TABLES) -> None:
    with engine.open_target(url) as target, target.connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY)")


def sqlite_columns(url: str, table: str) -> list[str]:
    """Read directly: open_target refuses such a database."""
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
        return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def test_open_target__releasemgr_control_tables__refused(database_factory):
    url = database_factory()
    make_control_lookalike(url)

    with pytest.raises(engine.TargetError) as info, engine.open_target(url):
        pass
    assert "releasemgr's own control database" in str(info.value)


@pytest.mark.parametrize(
    "tables",
    [("tenants_tenant",), ("tenants_tenant", "tenants_apitoken", "releases_release")],
    ids=["one", "an app's own tenants and releases"],
)
def test_open_target__application_with_some_such_table_names__opens(database_factory, tables):
    url = database_factory()
    make_control_lookalike(url, tables=tables)

    with engine.open_target(url) as target:
        assert set(tables) <= set(engine.introspect(target)["tables"])


@pytest.fixture
def acme(sqlite_database_factory):
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"])
    admin = get_user_model().objects.get(username="acme-admin")
    admin.is_staff = True
    admin.save(update_fields=["is_staff"])
    _, token = token_issue(tenant=tenant, user=admin)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG="acme")
    return {"tenant": tenant, "admin": admin, "api": api}


def set_url_in_admin(user, environment: Environment, url: str) -> None:
    """What the tenant admin does: the environment's change form with a new database URL."""
    client = Client()
    client.force_login(user)
    change = reverse("admin:tenants_environment_change", args=[environment.pk])
    data = form_data(client.get(change))
    data["database_url"] = url
    response = client.post(change, data)
    assert response.status_code == 302, re.findall(
        r'<ul class="errorlist.*?</ul>', response.content.decode(), re.S
    )


def test_admin__tenant_admin_points_staging_at_a_control_database__form_error_url_unchanged(
    acme, sqlite_database_factory
):
    control = sqlite_database_factory()
    make_control_lookalike(control)
    staging = Environment.objects.get(tenant=acme["tenant"], stage="staging")
    before = staging.database_url
    client = Client()
    client.force_login(acme["admin"])
    change = reverse("admin:tenants_environment_change", args=[staging.pk])
    data = form_data(client.get(change))
    data["database_url"] = control

    response = client.post(change, data)

    assert response.status_code == 200
    assert "releasemgr&#x27;s own control database" in response.content.decode()
    staging.refresh_from_db()
    assert staging.database_url == before


def test_prepare__staging_url_already_at_a_control_database__409_target_refused_and_its_tables_untouched(
    acme, sqlite_database_factory
):
    """Changed from 503: a control database is refused (409 target_refused), not unreachable. The URL
    is stored as one saved before the admin form checked it."""
    control = sqlite_database_factory()
    make_control_lookalike(control)
    staging = Environment.objects.get(tenant=acme["tenant"], stage="staging")
    staging.database_url = control
    staging.save()

    response = acme["api"].post(
        "/api/releases/prepare",
        {"from_env": "dev", "to_env": "staging", "bundle_data": ADD_COLUMN},
        format="json",
    )

    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "target_refused"
    assert "control database" in response.json()["error"]["message"]
    assert not Release.objects.exists()
    assert sqlite_columns(control, "tenants_tenant") == ["id"]


def test_open_target__the_running_control_database_itself__refused():
    if connection.vendor != "postgresql":
        pytest.skip("the control database is not PostgreSQL in this run")
    settings = connection.settings_dict
    url = f"postgres://{settings['USER']}@{settings['HOST']}:{settings['PORT'] or 5432}/{settings['NAME']}"
    with pytest.raises(engine.TargetError), engine.open_target(url):
        pass


# --- one tenant's target is never another tenant's -------------------------------------------------


def test_admin__tenant_admin_sets_another_tenants_database__form_error_url_unchanged(
    acme, sqlite_database_factory
):
    """Seen live: alpha's admin pointed alpha/staging at beta's SQLite file and promoted a table into it."""
    other_urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant_setup(slug="globex", environments=other_urls)
    staging = Environment.objects.get(tenant=acme["tenant"], stage="staging")
    before = staging.database_url
    path = other_urls["prod"].removeprefix("sqlite:///")
    client = Client()
    client.force_login(acme["admin"])
    change = reverse("admin:tenants_environment_change", args=[staging.pk])

    for url in (other_urls["prod"], "sqlite:///" + path.replace("/target_", "/./target_")):
        data = form_data(client.get(change))
        data["database_url"] = url
        response = client.post(change, data)
        assert response.status_code == 200
        assert "already the target database of another tenant" in response.content.decode()
        assert "globex" not in response.content.decode()
        staging.refresh_from_db()
        assert staging.database_url == before

    set_url_in_admin(acme["admin"], staging, sqlite_database_factory())  # a database of its own: saved


@pytest.mark.parametrize(
    ("left", "right", "same"),
    [
        ("postgres://u:a@localhost/app", "postgres://v:b@127.0.0.1:5432/app", True),
        ("postgres://u:a@db.example/app", "postgresql://u:a@DB.example:5432/app?sslmode=require", True),
        ("postgres://u:a@db.example/app", "postgres://u:a@db.example/app2", False),
        ("postgres://u:a@db.example:5433/app", "postgres://u:a@db.example/app", False),
        ("sqlite:////srv/t/a.sqlite3", "sqlite:////srv/t/../t/a.sqlite3", True),
        ("sqlite:////srv/t/a.sqlite3", "sqlite:////srv/t/b.sqlite3", False),
    ],
)
def test_database_identity__aliases_of_one_database__equal(left, right, same):
    from tenants.selectors import database_identity

    assert (database_identity(left) == database_identity(right)) is same
