"""Safety lint through the API: findings in the manifest, errors block promote, allow_unsafe overrides.

One case per rule on SQLite and PostgreSQL targets. Each rule's change runs on `accounts`, an
existing table of the staging target, so the linter judges it as a table with rows.
"""

from __future__ import annotations

import pytest

from releases import engine
from releases.models import AuditEvent, Release

from .test_safety_support import add_column, changes, control_counts, make_world, run_sql, target_state

pytestmark = pytest.mark.django_db

ACCOUNTS = (
    "CREATE TABLE accounts (id bigint PRIMARY KEY, email varchar(100), age integer, "
    "name text NOT NULL, note text)"
)

# rule id -> a change that fires it (and no other error rule)
RULE_CASES = {
    "adding-required-field": add_column("accounts", "plan", "text", nullable=False),
    "adding-not-nullable-field": {
        "type": "modify_column",
        "table": "accounts",
        "column": {"name": "note", "nullable": False},
    },
    "changing-column-type": {
        "type": "modify_column",
        "table": "accounts",
        "column": {"name": "email", "type": "string", "max_length": 50},
    },
    "ban-drop-column": {"type": "drop_column", "table": "accounts", "column": "note"},
    "ban-drop-table": {"type": "drop_table", "table": "accounts"},
    "ban-drop-not-null": {
        "type": "modify_column",
        "table": "accounts",
        "column": {"name": "name", "nullable": True},
    },
    "disallowed-unique-constraint": {
        "type": "modify_column",
        "table": "accounts",
        "column": {"name": "email", "unique": True},
    },
    "renaming-column": {"type": "rename_column", "table": "accounts", "from": "note", "to": "remark"},
    "renaming-table": {"type": "rename_table", "from": "accounts", "to": "customers"},
    "prefer-bigint-over-int": {
        "type": "create_table",
        "table": "tickets",
        "columns": [
            {"name": "id", "type": "integer", "primary_key": True},
            {"name": "title", "type": "text"},
        ],
    },
    "prefer-text-field": add_column("accounts", "nickname", "string", max_length=30),
    "adding-field-with-default": add_column("accounts", "seen_at", "datetime", default={"function": "now"}),
}


def test_rule_cases__cover_every_rule_the_engine_knows():
    assert set(RULE_CASES) == set(engine.LINT_RULES)


@pytest.fixture
def world(database_factory):
    world = make_world(database_factory)
    run_sql(world.urls["staging"], ACCOUNTS)
    return world


@pytest.mark.parametrize("rule", sorted(RULE_CASES))
def test_lint_rule__change_that_fires_it__finding_in_manifest_and_promote_follows_severity(world, rule):
    response = world.prepare(changes(RULE_CASES[rule]))
    assert response.status_code == 201, response.content
    data = response.json()["data"]
    assert data["status"] == "prepared", data["error_message"]
    findings = [finding for finding in data["lint"] if finding["rule"] == rule]
    assert findings, data["lint"]
    finding = findings[0]
    assert set(finding) >= {"rule", "severity", "change", "message", "safe_alternative"}
    assert finding["severity"] == engine.LINT_RULES[rule]
    assert finding["change"] == 0 and finding["message"] and finding["safe_alternative"]
    # The stored manifest says the same as the prepare response.
    assert world.client.get(f"/api/releases/{data['release_id']}").json()["data"]["lint"] == data["lint"]

    before_target, before_counts = target_state(world.urls["staging"]), control_counts()
    promoted = world.promote(data["release_id"])
    if engine.LINT_RULES[rule] == "error":
        assert promoted.status_code == 422, promoted.content
        error = promoted.json()["error"]
        assert error["code"] == "unsafe_migration"
        assert rule in error["message"] and rule in error["details"]["rules"]
        assert target_state(world.urls["staging"]) == before_target
        assert control_counts() == before_counts
        assert Release.objects.get(release_id=data["release_id"]).status == "prepared"
    else:
        assert promoted.status_code == 200, promoted.content
        assert promoted.json()["data"]["status"] == "promoted", promoted.json()["data"]["error_message"]


def test_allow_unsafe__rule_and_reason__promotes_and_reason_is_audited(world):
    bundle = changes(RULE_CASES["adding-required-field"])
    response = world.prepare(
        bundle, allow_unsafe=["adding-required-field"], reason="accounts is empty in prod"
    )
    assert response.status_code == 201, response.content
    data = response.json()["data"]
    assert data["allow_unsafe"] == ["adding-required-field"]
    assert data["unsafe_reason"] == "accounts is empty in prod"
    assert data["unsafe_rules_blocking"] == []
    assert any(f["rule"] == "adding-required-field" for f in data["lint"]), "overridden findings stay listed"
    event = AuditEvent.objects.get(event="release.prepared", release__release_id=data["release_id"])
    assert event.payload["allow_unsafe"] == ["adding-required-field"]
    assert event.payload["reason"] == "accounts is empty in prod"
    assert event.actor_username == world.admin.username

    promoted = world.promote(data["release_id"])
    assert promoted.status_code == 200 and promoted.json()["data"]["status"] == "promoted", promoted.content
    assert "plan" in target_state(world.urls["staging"])[0]["tables"]["accounts"]["columns"]


def test_allow_unsafe__covers_one_of_two_errors__promote_422_names_only_the_other(world):
    bundle = changes(RULE_CASES["adding-required-field"], RULE_CASES["disallowed-unique-constraint"])
    release_id = world.prepared(bundle, allow_unsafe=["adding-required-field"], reason="reviewed")
    response = world.promote(release_id)
    assert response.status_code == 422
    assert response.json()["error"]["details"]["rules"] == ["disallowed-unique-constraint"]


@pytest.mark.parametrize(
    ("allow_unsafe", "reason", "field"),
    [
        (["no-such-rule"], "because", "allow_unsafe"),
        (["adding-required-field", "ban-everything"], "because", "allow_unsafe"),
        (["adding-required-field"], "", "reason"),
        (["adding-required-field"], "   ", "reason"),
        ("adding-required-field", "because", "allow_unsafe"),
    ],
)
def test_prepare__bad_allow_unsafe__400_naming_the_field_and_nothing_saved(
    world, allow_unsafe, reason, field
):
    before_counts, before_target = control_counts(), target_state(world.urls["staging"])
    response = world.prepare(
        changes(RULE_CASES["adding-required-field"]), allow_unsafe=allow_unsafe, reason=reason
    )
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_error" and field in error["details"], error
    assert control_counts() == before_counts
    assert target_state(world.urls["staging"]) == before_target
