"""Fingerprints on GET /api/environments/, computed bundles, and the prod gate, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json

import pytest

from releases.models import Release
from tenants.models import FeatureFlag
from tenants.services import environment_set

from .test_safety_support import (
    changes,
    control_counts,
    create_table,
    fingerprint_of,
    make_world,
    run_sql,
    target_state,
)

pytestmark = pytest.mark.django_db

FEATURE = create_table(
    "feature",
    {"name": "name", "type": "string", "max_length": 100, "nullable": False},
    {"name": "enabled", "type": "boolean", "nullable": False, "default": False},
)


@pytest.fixture
def world(database_factory):
    return make_world(database_factory)


def set_flags(world, stage: str, **flags) -> None:
    for name, value in flags.items():
        FeatureFlag.objects.update_or_create(
            environment=world.environment(stage), name=name, defaults={"value": value}
        )


# --- GET /api/environments/ ---------------------------------------------------------------------


def test_environments__after_a_promote__fingerprint_live_release_and_flags_never_a_url(world):
    set_flags(world, "prod", checkout_v2=False)
    release_id = world.promoted(changes(FEATURE, flags={"custom_domains": True}))

    response = world.client.get("/api/environments/")
    assert response.status_code == 200, response.content
    entries = {entry["name"]: entry for entry in response.json()["data"]}
    assert set(entries) == {"dev", "staging", "prod"}
    for stage, entry in entries.items():
        assert entry["schema_fingerprint"] == fingerprint_of(world.urls[stage])
        assert len(entry["schema_fingerprint"]) == 64 and entry["reachable"] is True
    assert entries["staging"]["live_release"] == release_id
    assert entries["dev"]["live_release"] is None and entries["prod"]["live_release"] is None
    assert entries["staging"]["feature_flags"] == {"custom_domains": True}
    assert entries["prod"]["feature_flags"] == {"checkout_v2": False}
    assert entries["staging"]["schema_fingerprint"] != entries["prod"]["schema_fingerprint"]

    text = response.content.decode()
    for url in world.urls.values():
        assert url not in text
        assert url.rsplit("/", 1)[-1] not in text  # no database name or file name either
    assert "sqlite" not in text and "postgres" not in text and "127.0.0.1" not in text


def test_environments__unreachable_target__reported_without_host_user_or_password(world):
    environment_set(
        tenant=world.tenant,
        stage="prod",
        database_url="postgres://carol:hunter2-secret@127.0.0.1:1/prod_db_name",
    )
    response = world.client.get("/api/environments/")
    assert response.status_code == 200, response.content
    prod = next(entry for entry in response.json()["data"] if entry["name"] == "prod")
    assert prod["reachable"] is False and prod["schema_fingerprint"] is None and prod["error"]
    text = response.content.decode()
    for secret in ("hunter2-secret", "carol", "prod_db_name", "127.0.0.1"):
        assert secret not in text


# --- computed bundles ---------------------------------------------------------------------------

DEV_SCHEMA = (
    "CREATE TABLE zebras (id bigint PRIMARY KEY, name varchar(50) NOT NULL)",
    "CREATE TABLE apples (id bigint PRIMARY KEY, kind varchar(20) DEFAULT 'red', weight integer)",
    "CREATE TABLE shared (id bigint PRIMARY KEY, title text, color varchar(10))",
)
STAGING_SCHEMA = (
    "CREATE TABLE shared (id bigint PRIMARY KEY, title text, legacy text)",
    "CREATE TABLE obsolete (id bigint PRIMARY KEY, body text)",
)


def test_computed_bundle__dev_differs_from_staging__difference_in_order_then_promoted_staging_equals_dev(
    world,
):
    run_sql(world.urls["dev"], *DEV_SCHEMA)
    run_sql(world.urls["staging"], *STAGING_SCHEMA)
    set_flags(world, "dev", beta=True, same=True, tier="pro")
    set_flags(world, "staging", beta=False, same=True, staging_only=True)

    response = world.prepare(None)
    assert response.status_code == 201, response.content
    data = response.json()["data"]
    assert data["bundle_computed"] is True and data["status"] == "prepared", data["error_message"]
    steps = [
        (
            change["type"],
            change["table"],
            change.get("column", {}) if change["type"] != "drop_column" else change["column"],
        )
        for change in data["bundle"]["database"]["changes"]
    ]
    assert [(kind, table) for kind, table, _ in steps] == [
        ("create_table", "apples"),
        ("create_table", "zebras"),
        ("add_column", "shared"),
        ("drop_column", "shared"),
        ("drop_table", "obsolete"),
    ]
    assert steps[2][2]["name"] == "color" and steps[3][2] == "legacy"
    # Flags: those dev has with another value (or that staging lacks); staging-only flags stay alone.
    assert data["bundle"]["feature_flags"] == {"beta": True, "tier": "pro"}
    canonical = json.dumps(data["bundle"], sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    assert data["bundle_sha256"] == hashlib.sha256(canonical).hexdigest()

    again = world.prepare(None).json()["data"]
    assert again["bundle"] == data["bundle"] and again["bundle_sha256"] == data["bundle_sha256"]
    assert again["release_id"] != data["release_id"]

    promoted = world.promote(again["release_id"])
    assert promoted.json()["data"]["status"] == "promoted", promoted.content
    assert fingerprint_of(world.urls["staging"]) == fingerprint_of(world.urls["dev"])
    flags = {f.name: f.value for f in world.environment("staging").flags.all()}
    assert flags == {"beta": True, "same": True, "tier": "pro", "staging_only": True}

    before = control_counts()
    empty = world.prepare(None)
    assert empty.status_code == 400, empty.content
    error = empty.json()["error"]
    assert error["code"] == "validation_error" and "Nothing to release" in error["message"]
    assert control_counts() == before


def test_computed_bundle__same_schemas_and_flags__clear_400_nothing_saved(world):
    run_sql(world.urls["dev"], *STAGING_SCHEMA)
    run_sql(world.urls["staging"], *STAGING_SCHEMA)
    set_flags(world, "dev", beta=True)
    set_flags(world, "staging", beta=True)
    before = control_counts()
    response = world.prepare(None)
    assert response.status_code == 400
    assert "already has dev's schema and flags" in response.json()["error"]["message"]
    assert control_counts() == before


def test_computed_bundle__only_flags_differ__flag_only_release_promoted(world):
    set_flags(world, "dev", checkout_v2=True)
    data = world.prepare(None).json()["data"]
    assert data["bundle"] == {"database": {"changes": []}, "feature_flags": {"checkout_v2": True}}
    assert world.promote(data["release_id"]).json()["data"]["status"] == "promoted"
    assert {f.name: f.value for f in world.environment("staging").flags.all()} == {"checkout_v2": True}


def test_computed_bundle__column_type_outside_the_vocabulary__400_naming_it_nothing_saved(world):
    native = "inet" if world.dialect == "postgresql" else "geometry"
    run_sql(world.urls["dev"], f"CREATE TABLE hosts (id bigint PRIMARY KEY, address {native})")
    before, before_target = control_counts(), target_state(world.urls["staging"])
    response = world.prepare(None)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_error" and "address" in json.dumps(error)
    assert control_counts() == before and target_state(world.urls["staging"]) == before_target


# --- the prod gate ------------------------------------------------------------------------------


def test_prod_gate__prod_would_differ_from_staging__409_gate_then_allowed_once_staging_has_it(world):
    bundle = changes(FEATURE)
    before_counts, before_prod = control_counts(), target_state(world.urls["prod"])
    staging_fingerprint = fingerprint_of(world.urls["staging"])

    refused = world.prepare(bundle, from_env="staging", to_env="prod")
    assert refused.status_code == 409, refused.content
    error = refused.json()["error"]
    assert error["code"] == "gate"
    details = error["details"]
    assert details["staging_fingerprint"] == staging_fingerprint
    assert len(details["prod_fingerprint_after"]) == 64
    assert details["prod_fingerprint_after"] != staging_fingerprint
    assert details["difference"]["only_in_b"] == ["feature"] and details["difference"]["only_in_a"] == []
    assert control_counts() == before_counts, "a gate refusal saves nothing"
    assert target_state(world.urls["prod"]) == before_prod

    world.promoted(bundle)  # dev -> staging
    release_id = world.prepared(bundle, from_env="staging", to_env="prod")
    approved = world.client_of(world.approver).post(f"/api/releases/{release_id}/approve", {}, format="json")
    assert approved.status_code == 200, approved.content
    promoted = world.promote(release_id)
    assert promoted.json()["data"]["status"] == "promoted", promoted.content
    assert fingerprint_of(world.urls["prod"]) == fingerprint_of(world.urls["staging"])


def test_prod_gate__staging_changes_after_prepare__promote_409_gate_prod_untouched(world):
    bundle = changes(FEATURE)
    world.promoted(bundle)
    release_id = world.prepared(None, from_env="staging", to_env="prod")  # computed: staging minus prod
    world.client_of(world.approver).post(f"/api/releases/{release_id}/approve", {}, format="json")
    run_sql(world.urls["staging"], "CREATE TABLE hotfix (id bigint PRIMARY KEY)")
    before_prod = target_state(world.urls["prod"])

    response = world.promote(release_id)
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "gate"
    assert target_state(world.urls["prod"]) == before_prod
    assert Release.objects.get(release_id=release_id).status == "prepared"
