"""Helpers shared by the safety tests (no tests here): tenants on real targets, API calls, target state."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from releases import engine
from releases.models import AuditEvent, Backup, Migration, Release
from tenants.models import Environment, Tenant
from tenants.services import tenant_setup, token_issue

STAGES = ("dev", "staging", "prod")


def client_for(token: str, slug: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client


@dataclass
class World:
    """A tenant whose three environments are fresh target databases, with an admin's API client."""

    tenant: Tenant
    urls: dict[str, str]
    admin: object
    approver: object
    client: APIClient

    def environment(self, stage: str) -> Environment:
        return Environment.objects.get(tenant=self.tenant, stage=stage)

    @property
    def dialect(self) -> str:
        return "sqlite" if self.urls["dev"].startswith("sqlite") else "postgresql"

    def client_of(self, user) -> APIClient:
        _, raw = token_issue(tenant=self.tenant, user=user)
        return client_for(raw, self.tenant.slug)

    def prepare(self, bundle=None, from_env="dev", to_env="staging", **extra):
        body = {"from_env": from_env, "to_env": to_env, **extra}
        if bundle is not None:
            body["bundle_data"] = bundle
        return self.client.post("/api/releases/prepare", body, format="json")

    def promote(self, release_id: str, client: APIClient | None = None):
        return (client or self.client).post(
            "/api/releases/promote", {"release_id": release_id}, format="json"
        )

    def rollback(self, release_id: str):
        return self.client.post("/api/releases/rollback", {"release_id": release_id}, format="json")

    def prepared(self, bundle=None, from_env="dev", to_env="staging", **extra) -> str:
        """Prepare and insist on a `prepared` release; its id."""
        response = self.prepare(bundle, from_env=from_env, to_env=to_env, **extra)
        assert response.status_code == 201, response.content
        data = response.json()["data"]
        assert data["status"] == "prepared", data
        return data["release_id"]

    def promoted(self, bundle=None, from_env="dev", to_env="staging", **extra) -> str:
        release_id = self.prepared(bundle, from_env=from_env, to_env=to_env, **extra)
        response = self.promote(release_id)
        assert response.status_code == 200, response.content
        assert response.json()["data"]["status"] == "promoted", response.json()["data"]
        return release_id


def make_world(url_factory, slug: str = "safety") -> World:
    urls = {stage: url_factory() for stage in STAGES}
    tenant = tenant_setup(
        slug=slug, environments=urls, admins=[f"{slug}-admin"], approvers=[f"{slug}-approver"]
    )
    users = get_user_model().objects
    admin = users.get(username=f"{slug}-admin")
    _, raw = token_issue(tenant=tenant, user=admin)
    return World(
        tenant=tenant,
        urls=urls,
        admin=admin,
        approver=users.get(username=f"{slug}-approver"),
        client=client_for(raw, slug),
    )


def target_state(url: str) -> tuple[dict, str]:
    """The target's portable schema and native (catalog-level) fingerprint."""
    with engine.open_target(url) as target:
        return engine.introspect(target), engine.native_fingerprint(target)


def fingerprint_of(url: str) -> str:
    with engine.open_target(url) as target:
        return engine.fingerprint(engine.introspect(target))


def run_sql(url: str, *statements: str) -> None:
    """Change a target directly, as a person with psql would (autocommit, own connection)."""
    if url.startswith("sqlite:"):
        import sqlite3

        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            for statement in statements:
                connection.execute(statement)
            connection.commit()
        finally:
            connection.close()
        return
    import psycopg2

    connection = psycopg2.connect(url)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        connection.close()


def query(url: str, sql: str) -> list[tuple]:
    if url.startswith("sqlite:"):
        import sqlite3

        connection = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return [tuple(row) for row in connection.execute(sql).fetchall()]
        finally:
            connection.close()
    import psycopg2

    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return [tuple(row) for row in cursor.fetchall()]
    finally:
        connection.close()


def table_names(url: str) -> set[str]:
    if url.startswith("sqlite:"):
        rows = query(url, "SELECT name FROM sqlite_master WHERE type = 'table'")
    else:
        rows = query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {row[0] for row in rows}


def control_counts() -> tuple[int, int, int, int]:
    return (
        Release.objects.count(),
        Migration.objects.count(),
        AuditEvent.objects.count(),
        Backup.objects.count(),
    )


def changes(*items: dict, flags: dict | None = None) -> dict:
    bundle: dict = {"database": {"changes": list(items)}}
    if flags is not None:
        bundle["feature_flags"] = flags
    return bundle


def create_table(table: str, *columns: dict) -> dict:
    return {
        "type": "create_table",
        "table": table,
        "columns": list(columns) or [{"name": "name", "type": "string", "max_length": 100}],
    }


def add_column(table: str, name: str, type_: str = "text", **attributes) -> dict:
    return {"type": "add_column", "table": table, "column": {"name": name, "type": type_, **attributes}}
