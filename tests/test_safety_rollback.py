"""Rollback rules, flags that travel with a release, purged preservations, and a property test over
random bundles (apply then roll back returns the original schema and rows), on SQLite and PostgreSQL.
"""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from releases import engine, services
from releases.models import AuditEvent, Migration, Preservation, Release
from tenants.models import FeatureFlag

from .test_safety_support import (
    add_column,
    changes,
    create_table,
    fingerprint_of,
    make_world,
    query,
    run_sql,
    table_names,
    target_state,
)

pytestmark = pytest.mark.django_db

ITEMS = "CREATE TABLE items (id bigint PRIMARY KEY, name varchar(50) NOT NULL, qty integer, note text)"
ITEM_ROWS = [
    (i, f"item {i}", i * 3 if i % 4 else None, f"it's #{i}" if i % 3 else None) for i in range(1, 61)
]


def seed_items(url: str) -> None:
    def literal(value):
        if value is None:
            return "NULL"
        if isinstance(value, int):
            return str(value)
        return "'" + value.replace("'", "''") + "'"

    values = ", ".join("(" + ", ".join(literal(v) for v in row) + ")" for row in ITEM_ROWS)
    run_sql(url, ITEMS, f"INSERT INTO items (id, name, qty, note) VALUES {values}")


def item_rows(url: str) -> list[tuple]:
    return query(url, "SELECT id, name, qty, note FROM items ORDER BY id")


def rollback_refused(world, release_id: str, code: str) -> dict:
    """Roll back expecting a 409 `code`: the target as it was, the release still promoted. The error."""
    state = target_state(world.urls["staging"])
    response = world.rollback(release_id)
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == code
    assert target_state(world.urls["staging"]) == state
    assert Release.objects.get(release_id=release_id).status == "promoted"
    return error


@pytest.fixture
def world(database_factory):
    world = make_world(database_factory)
    seed_items(world.urls["staging"])
    return world


@pytest.fixture(autouse=True)
def backup_dir(settings, tmp_path):
    settings.BACKUP_DIR = tmp_path / "backups"


def flags(world, stage: str = "staging") -> dict:
    return {flag.name: flag.value for flag in world.environment(stage).flags.all()}


# --- only the latest live release; rollback --to --------------------------------------------------


def test_rollback__older_release_while_a_newer_is_live__409_naming_it_then_in_order_back_to_start(world):
    original = target_state(world.urls["staging"])
    first = world.promoted(changes(add_column("items", "color", "string", max_length=20)))
    second = world.promoted(changes(create_table("labels")))
    after_both = target_state(world.urls["staging"])

    refused = world.rollback(first)
    assert refused.status_code == 409, refused.content
    assert refused.json()["error"]["details"]["release_id"] == second
    assert target_state(world.urls["staging"]) == after_both
    assert Release.objects.get(release_id=first).status == "promoted"

    assert world.rollback(second).json()["data"]["status"] == "rolled_back"
    assert world.rollback(first).json()["data"]["status"] == "rolled_back"
    assert target_state(world.urls["staging"])[0] == original[0]
    assert item_rows(world.urls["staging"]) == ITEM_ROWS


def test_rollback__rolled_back_or_prepared_release__409_and_nothing_changes(world):
    release_id = world.promoted(changes(create_table("labels")))
    assert world.rollback(release_id).status_code == 200
    state = target_state(world.urls["staging"])
    again = world.rollback(release_id)
    assert again.status_code == 409 and again.json()["error"]["details"]["status"] == "rolled_back"
    prepared = world.prepared(changes(create_table("other")))
    assert world.rollback(prepared).status_code == 409
    assert target_state(world.urls["staging"]) == state


def test_release_rollback_to__three_promoted__newer_ones_first_then_it_schema_back(world):
    original_fingerprint = fingerprint_of(world.urls["staging"])
    ids = [
        world.promoted(changes(add_column("items", "color", "string", max_length=20))),
        world.promoted(changes({"type": "drop_column", "table": "items", "column": "note"})),
        world.promoted(changes(create_table("labels"))),
    ]
    oldest = Release.objects.get(release_id=ids[0])
    done = services.release_rollback_to(tenant=world.tenant, release=oldest, user=world.admin)

    assert [release.release_id for release in done] == list(reversed(ids))
    assert all(release.status == "rolled_back" for release in done)
    events = AuditEvent.objects.filter(event="release.rollback").order_by("id")
    assert [event.release.release_id for event in events] == list(reversed(ids))
    assert fingerprint_of(world.urls["staging"]) == original_fingerprint
    assert item_rows(world.urls["staging"]) == ITEM_ROWS


def test_rollback__two_in_a_row_after_a_drop_column__second_not_mistaken_for_drift(world):
    """Rolling back a drop_column re-adds the column last (and rebuilds the table on SQLite): the
    catalog differs from the one the older release left, the portable schema does not."""
    original = target_state(world.urls["staging"])[0]
    first = world.promoted(changes(add_column("items", "color", "string", max_length=20)))
    second = world.promoted(changes({"type": "drop_column", "table": "items", "column": "note"}))
    assert world.rollback(second).json()["data"]["status"] == "rolled_back"
    response = world.rollback(first)
    assert response.status_code == 200, response.content
    assert response.json()["data"]["status"] == "rolled_back"
    assert engine.fingerprint(target_state(world.urls["staging"])[0]) == engine.fingerprint(original)
    assert item_rows(world.urls["staging"]) == ITEM_ROWS


def test_rollback__target_changed_by_hand_between_two_releases__older_one_still_refused_as_drift(world):
    first = world.promoted(changes(add_column("items", "color", "string", max_length=20)))
    run_sql(world.urls["staging"], "CREATE TABLE by_hand (id bigint PRIMARY KEY)")
    second = world.promoted(changes(create_table("labels")))
    assert world.rollback(second).json()["data"]["status"] == "rolled_back"
    rollback_refused(world, first, "schema_drift")


def test_release_rollback_command__to__rolls_back_newer_ones_in_order(world):
    ids = [world.promoted(changes(create_table(name))) for name in ("alpha", "beta")]
    out = StringIO()
    call_command("release_rollback", "--tenant", world.tenant.slug, "--to", ids[0], stdout=out)
    assert list(Release.objects.filter(release_id__in=ids).values_list("status", flat=True)) == [
        "rolled_back",
        "rolled_back",
    ]
    assert not {"alpha", "beta"} & set(target_state(world.urls["staging"])[0]["tables"])


# --- rollback of a failed release -----------------------------------------------------------------


def test_rollback__release_failed_its_dry_run__verified_at_pre_state_and_marked_rolled_back(world):
    before = target_state(world.urls["staging"])
    # Unique on a column with duplicate values: the dry-run fails on the real data.
    run_sql(world.urls["staging"], "UPDATE items SET name = 'same'")
    before = target_state(world.urls["staging"])
    bundle = changes({"type": "modify_column", "table": "items", "column": {"name": "name", "unique": True}})
    response = world.prepare(bundle, allow_unsafe=["disallowed-unique-constraint"], reason="test")
    data = response.json()["data"]
    assert data["status"] == "failed", data

    rolled = world.rollback(data["release_id"])
    assert rolled.status_code == 200, rolled.content
    assert rolled.json()["data"]["status"] == "rolled_back" and rolled.json()["data"]["rolled_back"] is True
    assert target_state(world.urls["staging"]) == before
    assert (
        AuditEvent.objects.filter(event="release.rollback", release__release_id=data["release_id"]).count()
        == 1
    )


def test_rollback__failed_release_but_target_changed_since__409_schema_drift_until_put_back(world):
    release_id = world.prepared(changes(add_column("items", "color", "string", max_length=20)))
    run_sql(world.urls["staging"], "CREATE TABLE by_hand (id bigint PRIMARY KEY)")
    failed = world.promote(release_id).json()["data"]
    assert failed["status"] == "failed" and failed["error_code"] == "schema_drift"

    refused = world.rollback(release_id)
    assert refused.status_code == 409, refused.content
    assert refused.json()["error"]["code"] == "schema_drift"
    assert Release.objects.get(release_id=release_id).status == "failed"

    run_sql(world.urls["staging"], "DROP TABLE by_hand")
    settled = world.rollback(release_id)
    assert settled.status_code == 200 and settled.json()["data"]["status"] == "rolled_back", settled.content


# --- flags travel with the release ----------------------------------------------------------------


def test_flags__promote_then_rollback__applied_with_previous_values_and_restored(world):
    FeatureFlag.objects.create(environment=world.environment("staging"), name="beta", value=False)
    FeatureFlag.objects.create(environment=world.environment("staging"), name="untouched", value="basic")
    release_id = world.promoted(changes(create_table("labels"), flags={"beta": True, "tier": "pro"}))

    assert flags(world) == {"beta": True, "tier": "pro", "untouched": "basic"}
    flag_changes = Release.objects.get(release_id=release_id).flag_changes
    assert flag_changes["beta"] == {"before": False, "existed": True, "after": True}
    assert flag_changes["tier"] == {"before": None, "existed": False, "after": "pro"}
    promoted_event = AuditEvent.objects.get(event="release.promoted", release__release_id=release_id)
    assert promoted_event.payload["flags"] == flag_changes

    assert world.rollback(release_id).json()["data"]["status"] == "rolled_back"
    assert flags(world) == {"beta": False, "untouched": "basic"}
    event = AuditEvent.objects.get(event="release.rollback", release__release_id=release_id)
    assert event.payload["flags"] == {"restored": ["beta", "tier"], "not_restored": []}


def test_flags__changed_by_hand_after_promote__not_restored_on_rollback_but_reported(world):
    FeatureFlag.objects.create(environment=world.environment("staging"), name="beta", value=False)
    release_id = world.promoted(changes(create_table("labels"), flags={"beta": True, "tier": "pro"}))
    FeatureFlag.objects.filter(environment=world.environment("staging"), name="tier").update(
        value="enterprise"
    )

    data = world.rollback(release_id).json()["data"]
    assert data["status"] == "rolled_back"
    assert flags(world) == {"beta": False, "tier": "enterprise"}
    event = AuditEvent.objects.get(event="release.rollback", release__release_id=release_id)
    assert event.payload["flags"] == {"restored": ["beta"], "not_restored": ["tier"]}
    # The rollback's own answer reports it too.
    assert data["flag_changes"]["beta"]["restored"] is True
    assert data["flag_changes"]["tier"]["restored"] is False


def test_flags__failed_promote__flags_untouched(world):
    FeatureFlag.objects.create(environment=world.environment("staging"), name="beta", value=False)
    release_id = world.prepared(
        changes(add_column("items", "color", "string", max_length=20), flags={"beta": True})
    )
    run_sql(world.urls["staging"], "ALTER TABLE items ADD COLUMN by_hand text")
    assert world.promote(release_id).json()["data"]["status"] == "failed"
    assert flags(world) == {"beta": False}
    assert Release.objects.get(release_id=release_id).flag_changes in ({}, None)


# --- preserved data and its purge -----------------------------------------------------------------


def test_rollback__after_purge_preserved__409_rollback_blocked_target_unchanged(world):
    release_id = world.promoted(changes({"type": "drop_column", "table": "items", "column": "note"}))
    [preservation] = Preservation.objects.filter(release__release_id=release_id)
    assert preservation.preserved_table in table_names(world.urls["staging"])

    out = StringIO()
    call_command("purge_preserved", "--older-than", "0", stdout=out)
    assert preservation.preserved_table not in table_names(world.urls["staging"])
    preservation.refresh_from_db()
    assert preservation.purged_at is not None

    error = rollback_refused(world, release_id, "rollback_blocked")
    assert error["details"]["purged"] == [preservation.preserved_table]


def test_rollback__rows_written_after_promote__added_column_values_preserved_not_lost(world):
    release_id = world.promoted(changes(add_column("items", "color", "string", max_length=20)))
    run_sql(world.urls["staging"], "UPDATE items SET color = 'red' WHERE id <= 5")
    assert world.rollback(release_id).json()["data"]["status"] == "rolled_back"
    [kept] = Preservation.objects.filter(release__release_id=release_id, direction="rollback")
    assert kept.source_column == "color" and kept.row_count >= 5
    values = query(world.urls["staging"], f'SELECT * FROM "{kept.preserved_table}"')
    assert sorted(value for row in values for value in row if value == "red") == ["red"] * 5
    assert item_rows(world.urls["staging"]) == ITEM_ROWS


def test_rollback__recorded_rollback_statements_altered__409_schema_drift_target_unchanged(world):
    release_id = world.promoted(changes(add_column("items", "color", "string", max_length=20)))
    migration = Migration.objects.get(release__release_id=release_id)
    Migration.objects.filter(pk=migration.pk).update(
        rollback_statements=[*migration.rollback_statements, {"sql": "DELETE FROM items", "params": None}]
    )
    rollback_refused(world, release_id, "schema_drift")
    assert item_rows(world.urls["staging"]) == ITEM_ROWS


# --- property: apply then roll back is the identity -----------------------------------------------

COLUMN_TYPES = st.sampled_from(
    [
        {"type": "string", "max_length": 30},
        {"type": "text"},
        {"type": "integer"},
        {"type": "bigint"},
        {"type": "boolean"},
        {"type": "date"},
        {"type": "decimal", "precision": 10, "scale": 2},
        {"type": "float"},
        {"type": "uuid"},
        {"type": "json"},
    ]
)
DEFAULTS = {
    "string": "x'y",
    "text": "hello",
    "integer": 7,
    "bigint": 9000000000,
    "boolean": True,
    "date": "2024-01-15",
    "decimal": "12.50",
    "float": "1.5",
    "uuid": "12345678-1234-5678-1234-567812345678",
    "json": {"a": [1, 2]},
}


@st.composite
def bundles(draw):
    """1-4 changes that apply in order to `items` (and tables the bundle creates)."""
    columns = {"items": ["name", "qty", "note"]}
    result = []
    modified = False
    for index in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(
            st.sampled_from(["create_table", "add_column", "drop_column", "modify_column", "drop_table"])
        )
        tables = sorted(columns)
        if kind == "create_table" or not tables:
            name = f"made_{index}"
            column = {"name": "label", **draw(COLUMN_TYPES), "nullable": draw(st.booleans())}
            if draw(st.booleans()):
                column["default"] = DEFAULTS[column["type"]]
            if not column["nullable"] and "default" not in column:
                column["nullable"] = True
            result.append({"type": "create_table", "table": name, "columns": [column]})
            columns[name] = ["label"]
            continue
        table = draw(st.sampled_from(tables))
        if kind == "add_column":
            column = {"name": f"added_{index}", **draw(COLUMN_TYPES)}
            if draw(st.booleans()):
                column["default"] = DEFAULTS[column["type"]]
                column["nullable"] = draw(st.booleans())
            result.append({"type": "add_column", "table": table, "column": column})
            columns[table].append(column["name"])
        elif kind == "drop_column" and len(columns[table]) > 1:
            name = draw(st.sampled_from(columns[table]))
            result.append({"type": "drop_column", "table": table, "column": name})
            columns[table].remove(name)
        elif kind == "modify_column" and table == "items" and "qty" in columns["items"] and not modified:
            modified = True
            result.append(
                {"type": "modify_column", "table": "items", "column": {"name": "qty", "type": "bigint"}}
            )
        elif kind == "drop_table":
            result.append({"type": "drop_table", "table": table})
            del columns[table]
    return {"database": {"changes": result}}


@pytest.mark.slow
def test_property__random_bundle_promoted_then_rolled_back__original_schema_and_rows(world):
    original = target_state(world.urls["staging"])
    original_fingerprint = engine.fingerprint(original[0])
    original_columns = {name: table["columns"] for name, table in original[0]["tables"].items()}
    kinds_seen: set[str] = set()
    examples: list[dict] = []

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=True,
    )
    @given(bundle=bundles())
    def check(bundle):
        kinds_seen.update(change["type"] for change in bundle["database"]["changes"])
        examples.append(bundle)
        response = world.prepare(bundle, allow_unsafe=sorted(engine.LINT_RULES), reason="property test")
        assert response.status_code == 201, response.content
        data = response.json()["data"]
        assert data["status"] == "prepared", (bundle, data["error_message"])
        promoted = world.promote(data["release_id"]).json()["data"]
        assert promoted["status"] == "promoted", (bundle, promoted["error_message"])
        assert fingerprint_of(world.urls["staging"]) == data["dry_run"]["fingerprint_after"]
        rolled = world.rollback(data["release_id"]).json()["data"]
        assert rolled["status"] == "rolled_back", (bundle, rolled["error_message"])
        assert fingerprint_of(world.urls["staging"]) == original_fingerprint, bundle
        # Column order is not part of the schema (a re-added column goes last); everything else is.
        now = target_state(world.urls["staging"])[0]["tables"]
        assert {name: table["columns"] for name, table in now.items()} == original_columns, bundle
        assert item_rows(world.urls["staging"]) == ITEM_ROWS, bundle

    check()
    assert len(examples) >= 25
    assert kinds_seen == {"create_table", "add_column", "drop_column", "modify_column", "drop_table"}, (
        kinds_seen
    )


def test_rollback__not_null_column_dropped_then_rows_added__409_rollback_blocked_nothing_run(world):
    release_id = world.promoted(changes({"type": "drop_column", "table": "items", "column": "name"}))
    run_sql(world.urls["staging"], "INSERT INTO items (id, qty) VALUES (1000, 1)")
    rollback_refused(world, release_id, "rollback_blocked")
    # Once the new row is dealt with, the rollback goes through and every value comes back.
    run_sql(world.urls["staging"], "DELETE FROM items WHERE id = 1000")
    assert world.rollback(release_id).json()["data"]["status"] == "rolled_back"
    assert item_rows(world.urls["staging"]) == ITEM_ROWS


def test_rollback__target_changed_by_hand_after_promote__409_schema_drift_nothing_run(world):
    release_id = world.promoted(changes(add_column("items", "color", "string", max_length=20)))
    run_sql(world.urls["staging"], "CREATE INDEX items_color_by_hand ON items (color)")
    rollback_refused(world, release_id, "schema_drift")
    assert Release.objects.get(release_id=release_id).error_code == "schema_drift"
    environments = {e["name"]: e for e in world.client.get("/api/environments/").json()["data"]}
    assert environments["staging"]["live_release"] == release_id


def test_rollback__live_release_moves_back_on_the_environments_endpoint(world):
    first = world.promoted(changes(create_table("alpha")))
    second = world.promoted(changes(create_table("beta")))

    def live() -> str | None:
        entries = world.client.get("/api/environments/").json()["data"]
        return next(e for e in entries if e["name"] == "staging")["live_release"]

    assert live() == second
    world.rollback(second)
    assert live() == first
    world.rollback(first)
    assert live() is None
