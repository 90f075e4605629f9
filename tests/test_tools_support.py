"""Helpers shared by the tool-kernel tests (no tests here): tenants with members of every role."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from releases import engine
from tenants.models import Environment, Role, Tenant
from tenants.services import membership_set, tenant_setup, token_issue, user_ensure


@dataclass
class TenantSetup:
    tenant: Tenant
    urls: dict[str, str]
    admin: object
    approver: object
    viewer: object

    def environment(self, stage: str = "staging") -> Environment:
        return Environment.objects.get(tenant=self.tenant, stage=stage)

    def client(self, user=None) -> APIClient:
        user = user or self.admin
        _, raw = token_issue(tenant=self.tenant, user=user)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}", HTTP_X_TENANT_SLUG=self.tenant.slug)
        return client


def make_tenant(slug: str, url_factory) -> TenantSetup:
    """A tenant with three target databases from `url_factory` and an admin, approver and viewer."""
    urls = {stage: url_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(
        slug=slug, environments=urls, admins=[f"{slug}-admin"], approvers=[f"{slug}-approver"]
    )
    users = get_user_model().objects
    admin = users.get(username=f"{slug}-admin")
    admin.email = f"{slug}-admin@example.com"
    admin.save(update_fields=["email"])
    viewer = user_ensure(username=f"{slug}-viewer")
    membership_set(tenant=tenant, user=viewer, role=Role.VIEWER)
    return TenantSetup(
        tenant=tenant,
        urls=urls,
        admin=admin,
        approver=users.get(username=f"{slug}-approver"),
        viewer=viewer,
    )


def target_state(url: str) -> tuple[dict, str]:
    """The target's portable schema and native (catalog-level) fingerprint."""
    with engine.open_target(url) as target:
        return engine.introspect(target), engine.native_fingerprint(target)


def run_sql(url: str, *statements: str) -> None:
    """Set up a target's schema directly (autocommit statements on a fresh connection)."""
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
