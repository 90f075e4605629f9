"""db.migrate: plan, lint and dry-run one change through the release engine, on SQLite and PostgreSQL.

Every dry-run test asserts the target is exactly what it was (portable schema, native catalog
fingerprint and rows). Applying is refused everywhere but the release executor.
"""

from __future__ import annotations

import pytest

from tools.kernel import ToolCall, ToolContext, run_tool, tool_kernel
from tools.models import ToolTranscript

from .test_tools_support import make_tenant, run_sql, target_state

pytestmark = pytest.mark.django_db

CREATE_NEW_FEATURE = {
    "op": "create_table",
    "table": "new_feature",
    "columns": [
        {"name": "name", "type": "string", "max_length": 100, "nullable": False},
        {"name": "enabled", "type": "boolean", "nullable": False, "default": False},
    ],
    "dry_run": True,
}


@pytest.fixture
def setup(database_factory):
    """A tenant whose staging target (of the test's dialect) has a `users` table with two rows."""
    made = make_tenant("acme", database_factory)
    run_sql(
        made.urls["staging"],
        "CREATE TABLE users (id bigint PRIMARY KEY, email varchar(200) NOT NULL, nickname varchar(50))",
        "INSERT INTO users (id, email, nickname) VALUES (1, 'a@example.com', 'a'), (2, 'b@example.com', NULL)",
    )
    return made


def rows(url: str) -> list[tuple]:
    from releases import engine

    with engine.open_target(url) as target, target.connection.cursor() as cursor:
        cursor.execute("SELECT id, email, nickname FROM users ORDER BY id")
        return [tuple(row) for row in cursor.fetchall()]


def migrate(setup, args, *, user=None, stage="staging", call_id="mig_1"):
    context = ToolContext(setup.tenant, environment=setup.environment(stage), user=user or setup.admin)
    return tool_kernel.execute(ToolCall(id=call_id, tool="db.migrate", args=args), context)


def test_db_migrate__create_table_dry_run__sql_rollback_lint_and_target_unchanged(setup):
    url = setup.urls["staging"]
    before = target_state(url)
    result = migrate(setup, CREATE_NEW_FEATURE)
    assert result.ok is True, result.error
    data = result.data
    assert data["operation"] == "create_table" and data["table"] == "new_feature"
    assert data["vendor"] == ("sqlite" if url.startswith("sqlite") else "postgresql")
    assert "CREATE TABLE" in data["sql"].upper() and "new_feature" in data["sql"]
    assert "new_feature" in data["rollback_sql"]
    assert data["dry_run_result"]["forward_ok"] is True
    assert data["dry_run_result"]["rollback_verified"] is True
    assert data["dry_run_result"]["migrations"][0]["ok"] is True
    assert data["dry_run_result"]["fingerprint_before"] != data["dry_run_result"]["fingerprint_after"]
    assert isinstance(data["lint"], list)
    assert data["applied"] is False
    assert target_state(url) == before
    assert "new_feature" not in before[0]["tables"]
    transcript = ToolTranscript.objects.get()
    assert (transcript.ok, transcript.dry_run, transcript.environment_id) == (
        True,
        True,
        setup.environment().pk,
    )
    assert transcript.result["sql"] == data["sql"]


def test_db_migrate__not_null_column_on_table_with_rows__dry_run_fails_with_lint_rows_untouched(setup):
    url = setup.urls["staging"]
    before, before_rows = target_state(url), rows(url)
    result = migrate(
        setup,
        {
            "op": "add_column",
            "table": "users",
            "column": {"name": "plan", "type": "string", "max_length": 20, "nullable": False},
        },
    )
    # Dry-run on a table with rows: the NOT NULL column without default cannot be added.
    assert result.ok is False
    assert result.error_code == "dry_run_failed"
    assert result.error.startswith("The dry-run failed: change 0 (add_column users) failed:")
    assert "adding-required-field" in {finding["rule"] for finding in result.data["lint"]}
    assert result.data["dry_run_result"]["forward_ok"] is False
    transcript = ToolTranscript.objects.get()
    assert transcript.result["data"]["dry_run_result"]["forward_ok"] is False  # the failed plan is kept
    assert target_state(url) == before
    assert rows(url) == before_rows


def test_db_migrate__drop_column_dry_run__column_and_values_still_there(setup):
    url = setup.urls["staging"]
    before, before_rows = target_state(url), rows(url)
    result = migrate(setup, {"op": "drop_column", "table": "users", "column": "nickname"})
    assert result.ok is True, result.error
    assert "nickname" in result.data["sql"]
    assert "ban-drop-column" in {finding["rule"] for finding in result.data["lint"]}
    assert target_state(url) == before
    assert rows(url) == before_rows


def test_db_migrate__rename_column__renaming_lint_and_target_unchanged(setup):
    url = setup.urls["staging"]
    before = target_state(url)
    result = migrate(setup, {"op": "rename_column", "table": "users", "from": "nickname", "to": "handle"})
    assert result.ok is True, result.error
    assert "renaming-column" in {finding["rule"] for finding in result.data["lint"]}
    assert target_state(url) == before


def test_db_migrate__several_changes__planned_together(setup):
    url = setup.urls["staging"]
    before = target_state(url)
    changes = [
        {
            "type": "create_table",
            "table": "orders",
            "columns": [{"name": "total", "type": "decimal", "precision": 10, "scale": 2}],
        },
        {"type": "add_column", "table": "orders", "column": {"name": "note", "type": "text"}},
    ]
    result = migrate(setup, {"changes": changes})
    assert result.ok is True, result.error
    assert [change["operation"] for change in result.data["changes"]] == ["create_table", "add_column"]
    assert target_state(url) == before


def test_db_migrate__add_column_to_missing_table__refused_naming_the_table(setup):
    url = setup.urls["staging"]
    before = target_state(url)
    result = migrate(
        setup, {"op": "add_column", "table": "ghosts", "column": {"name": "x", "type": "integer"}}
    )
    assert result.ok is False
    assert result.error_code == "validation_error"
    assert "ghosts" in result.error
    assert target_state(url) == before
    assert ToolTranscript.objects.get().ok is False


def test_db_migrate__bad_column_type__error_names_the_column_field(setup):
    args = {
        **CREATE_NEW_FEATURE,
        "columns": [{"name": "a", "type": "string", "max_length": 5}, {"name": "b", "type": "varchar2"}],
    }
    result = migrate(setup, args)
    assert result.ok is False
    assert result.error_code == "validation_error"
    assert "columns[1].type" in result.details
    assert "columns[1].type" in result.error


@pytest.mark.parametrize(
    "args, field",
    [
        ({"op": "create_table", "table": "t"}, "columns"),
        ({"op": "drop_column", "table": "users", "column": {"name": "nickname"}}, "column"),
        ({"op": "add_column", "table": "users", "column": "nickname"}, "column"),
        ({"op": "rename_table", "from": "users"}, "to"),
        ({"op": "drop_table", "table": "users", "columns": [{"name": "x", "type": "text"}]}, "columns"),
        ({"op": "create_table", "table": "select", "columns": [{"name": "a", "type": "text"}]}, "table"),
        ({"table": "users"}, "op"),
        ({"op": "drop_table", "table": "users", "changes": [{"type": "drop_table", "table": "users"}]}, "op"),
    ],
)
def test_db_migrate__invalid_arguments__error_names_the_field(setup, args, field):
    url = setup.urls["staging"]
    before = target_state(url)
    result = migrate(setup, args)
    assert result.ok is False
    assert result.error_code == "validation_error"
    assert field in result.details, result.details
    assert target_state(url) == before


def test_db_migrate__without_environment__error_names_environment(setup):
    result = tool_kernel.execute(
        ToolCall(id="m", tool="db.migrate", args=CREATE_NEW_FEATURE),
        ToolContext(setup.tenant, user=setup.admin),
    )
    assert result.ok is False
    assert list(result.details) == ["environment"]


def test_db_migrate__apply_outside_executor__refused_target_unchanged(setup):
    url = setup.urls["staging"]
    before = target_state(url)
    result = migrate(setup, {**CREATE_NEW_FEATURE, "dry_run": False})
    assert result.ok is False
    assert result.error_code == "forbidden"
    assert "release executor" in result.error
    assert target_state(url) == before
    transcript = ToolTranscript.objects.get()
    assert (transcript.ok, transcript.dry_run, transcript.error_code) == (False, False, "forbidden")


def test_db_migrate__apply_via_run_tool_without_executor_flag__refused(setup):
    url = setup.urls["staging"]
    before = target_state(url)
    result = run_tool(
        "db.migrate",
        CREATE_NEW_FEATURE | {"dry_run": False},
        tenant=setup.tenant,
        environment=setup.environment(),
    )
    assert (result.ok, result.error_code) == (False, "forbidden")
    assert target_state(url) == before


def test_db_migrate__viewer__refused_before_touching_the_target(setup):
    result = migrate(setup, CREATE_NEW_FEATURE, user=setup.viewer)
    assert (result.ok, result.error_code) == (False, "forbidden")


def test_db_migrate__api_dry_run__200_with_sql(setup):
    url = setup.urls["staging"]
    before = target_state(url)
    body = {"id": "mig_1", "tool": "db.migrate", "environment": "staging", "args": CREATE_NEW_FEATURE}
    response = setup.client().post("/api/tools/execute", body, format="json")
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["ok"] is True
    assert "new_feature" in data["data"]["sql"]
    assert target_state(url) == before


def test_db_migrate__api_dependency_error__400_with_transcript(setup):
    body = {"tool": "db.migrate", "environment": "staging", "args": {"op": "drop_table", "table": "ghosts"}}
    response = setup.client().post("/api/tools/execute", body, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["details"]["transcript_id"] == ToolTranscript.objects.get().transcript_id


def test_db_migrate__unreachable_target__error_scrubbed_of_host_and_password(sqlite_database_factory):
    made = make_tenant("acme", sqlite_database_factory)
    environment = made.environment()
    environment.database_url = "postgres://deployer:Tr0ub4dor3@no-such-host.invalid:1/app"
    environment.save()
    result = migrate(made, CREATE_NEW_FEATURE)
    assert result.ok is False
    assert result.error_code == "target_unreachable"
    stored = ToolTranscript.objects.values().get()
    for secret in ("Tr0ub4dor3", "no-such-host", "deployer"):
        assert secret not in result.error
        assert secret not in str(stored)


# --- inside the release executor ------------------------------------------------------------------


def _prepared_release(setup, changes):
    from releases import services

    return services.release_prepare(
        tenant=setup.tenant,
        user=setup.admin,
        from_env="dev",
        to_env="staging",
        bundle_data={"database": {"changes": changes}},
    )


NEW_FEATURE_CHANGE = {
    "type": "create_table",
    "table": "new_feature",
    "columns": [{"name": "name", "type": "text", "nullable": False}],
}


def test_db_migrate__executor_with_release__applies_the_release_changes(
    setup, django_capture_on_commit_callbacks
):
    from releases import engine

    url = setup.urls["staging"]
    with django_capture_on_commit_callbacks(execute=True):
        release = _prepared_release(setup, [NEW_FEATURE_CHANGE])
    before = target_state(url)
    assert "new_feature" not in before[0]["tables"]
    result = run_tool("db.migrate", {}, tenant=setup.tenant, release=release, dry_run=False, executor=True)
    assert result.ok is True, result.error
    assert result.data["applied"] is True
    schema, native = target_state(url)
    assert "new_feature" in schema["tables"]
    assert native == result.data["native_fingerprint_after"]
    assert engine.fingerprint(schema) == release.fingerprint_after
    with engine.open_target(url) as target:
        assert [row["release_pk"] for row in engine.history(target)] == [release.pk]
    transcript = ToolTranscript.objects.get(transcript_id=result.transcript_id)
    assert (transcript.release_id, transcript.dry_run) == (release.pk, False)


def test_db_migrate__executor_with_other_changes_than_the_release__refused(
    setup, django_capture_on_commit_callbacks
):
    url = setup.urls["staging"]
    with django_capture_on_commit_callbacks(execute=True):
        release = _prepared_release(setup, [NEW_FEATURE_CHANGE])
    before = target_state(url)
    result = run_tool(
        "db.migrate",
        {"op": "drop_table", "table": "users"},
        tenant=setup.tenant,
        release=release,
        dry_run=False,
        executor=True,
    )
    assert (result.ok, result.error_code) == (False, "forbidden")
    assert target_state(url) == before


def test_db_migrate__executor_after_drift__schema_drift_and_nothing_applied(
    setup, django_capture_on_commit_callbacks
):
    url = setup.urls["staging"]
    with django_capture_on_commit_callbacks(execute=True):
        release = _prepared_release(setup, [NEW_FEATURE_CHANGE])
    run_sql(url, "CREATE TABLE intruder (id integer PRIMARY KEY)")
    before = target_state(url)
    result = run_tool("db.migrate", {}, tenant=setup.tenant, release=release, dry_run=False, executor=True)
    assert (result.ok, result.error_code) == (False, "schema_drift")
    assert target_state(url) == before


def test_db_migrate__dry_run_for_a_release_without_op__plans_the_release_changes(
    setup, django_capture_on_commit_callbacks
):
    url = setup.urls["staging"]
    with django_capture_on_commit_callbacks(execute=True):
        release = _prepared_release(setup, [NEW_FEATURE_CHANGE])
    before = target_state(url)
    result = run_tool("db.migrate", {}, tenant=setup.tenant, release=release, dry_run=True)
    assert result.ok is True, result.error
    assert result.data["operation"] == "create_table"
    assert result.data["dry_run_result"]["fingerprint_after"] == release.fingerprint_after
    assert target_state(url) == before
