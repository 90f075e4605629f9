"""Secrets of a target that cannot be reached: the API refuses in the envelope and names none of them."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from releases.models import AuditEvent, Release, ReleaseStatus
from tenants.models import Environment
from tenants.services import tenant_setup, token_issue

pytestmark = pytest.mark.django_db

PASSWORD = "s3cr3t-PASS"
# Nothing listens on port 1 of the loopback: the connection is refused at once.
UNREACHABLE_URL = f"postgres://deployer:{PASSWORD}@127.0.0.1:1/acme_prod"
SECRETS = (PASSWORD, "deployer", UNREACHABLE_URL)


@pytest.fixture
def api(sqlite_database_factory) -> APIClient:
    urls = {"dev": sqlite_database_factory(), "staging": sqlite_database_factory(), "prod": UNREACHABLE_URL}
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"])
    _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username="acme-admin"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG="acme")
    return client


@pytest.mark.parametrize(
    "body",
    [
        {"from_env": "staging", "to_env": "prod"},  # the bundle computed from both targets
        {"from_env": "staging", "to_env": "prod", "bundle_data": {"feature_flags": {"beta": True}}},
    ],
    ids=["computed-bundle", "given-bundle"],
)
def test_prepare__target_unreachable__503_target_unreachable_scrubbed_nothing_saved(api, body):
    response = api.post("/api/releases/prepare", body, format="json")

    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert error["code"] == "target_unreachable"
    assert error["message"].startswith("cannot connect to the target database")
    for secret in SECRETS:
        assert secret not in response.content.decode()
    assert not Release.objects.exists() and not AuditEvent.objects.exists()


def test_environments__target_unreachable__listed_unreachable_scrubbed(api):
    response = api.get("/api/environments")

    assert response.status_code == 200
    prod = next(entry for entry in response.json()["data"] if entry["name"] == "prod")
    assert prod["reachable"] is False and prod["error"].startswith("cannot connect")
    for secret in SECRETS:
        assert secret not in response.content.decode()


def test_rollback__failed_release_target_unreachable__503_documented_nothing_settled(api):
    # Found by fuzzing with a target down: settling a failed release opened the target unguarded (500).
    prod = Environment.objects.get(tenant__slug="acme", stage="prod")
    release = Release.objects.create(
        tenant=prod.tenant,
        release_id="rel_20260101_0000",
        from_environment=Environment.objects.get(tenant=prod.tenant, stage="staging"),
        to_environment=prod,
        status=ReleaseStatus.FAILED,
        bundle={"database": {"changes": []}, "feature_flags": {"beta": True}},
        bundle_sha256="0" * 64,
        sql_sha256="0" * 64,
        native_fingerprint_before="f" * 64,
    )

    response = api.post("/api/releases/rollback", {"release_id": release.release_id}, format="json")

    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "target_unreachable"
    for secret in SECRETS:
        assert secret not in response.content.decode()
    release.refresh_from_db()
    assert release.status == ReleaseStatus.FAILED
    schema = api.get("/api/schema/", {"format": "json"}).json()
    for path in ("/api/releases/prepare", "/api/releases/rollback"):
        assert "503" in schema["paths"][path]["post"]["responses"], path
