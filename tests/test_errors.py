"""One error vocabulary (issue 12.3): ApplicationError + ErrorCode, one code -> HTTP status table at the
API edge, every edge rendering the same code its own way, and the OpenAPI schema listing the codes."""

from __future__ import annotations

import io
import json
import pathlib
import re

import pytest
import yaml
from django.core.management import call_command
from rest_framework.test import APIClient

from releasemgr.api import STATUS_BY_CODE
from releasemgr.core.errors import ApplicationError, ErrorCode
from releases import engine
from releases.models import Release
from tenants.services import token_issue
from tools.errors import ToolFailure
from tools.kernel import ToolCall, ToolContext, tool_kernel

from .test_tools_support import make_tenant

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_code_has_exactly_one_http_status():
    assert set(STATUS_BY_CODE) == set(ErrorCode)
    assert all(100 <= status < 600 for status in STATUS_BY_CODE.values())


def test_error_families_are_one_family():
    for family in (engine.EngineError, engine.PlanError, engine.BundleError, engine.TargetError):
        assert issubclass(family, ApplicationError)
    assert issubclass(ToolFailure, ApplicationError)
    assert issubclass(engine.BackupError, ApplicationError)
    # An unknown code is a programming error, caught where it is raised, not rendered as a 500 later.
    with pytest.raises(ValueError):
        ApplicationError("x", code="no_such_code")  # type: ignore[arg-type]


def test_below_the_edges_nothing_names_an_http_status():
    """Services, the engine and the core raise codes; `status_code=` appears only at the edges."""
    offenders = []
    for folder in ("releases/services", "releases/engine", "releasemgr/core", "tools/handlers"):
        for path in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bstatus_code\s*=|HTTP_\d{3}", line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_no_two_codes_for_one_meaning():
    assert "validation_failed" not in {code.value for code in ErrorCode}
    sources = [
        path
        for folder in ("releases", "tenants", "tools", "releasemgr")
        for path in (ROOT / folder).rglob("*.py")
    ]
    assert not [str(path) for path in sources if '"validation_failed"' in path.read_text()]


def test_openapi_schema_lists_every_code_and_each_status_names_its_codes(tmp_path):
    out = tmp_path / "schema.yaml"
    call_command("spectacular", "--file", str(out))
    schema = yaml.safe_load(out.read_text())
    assert set(schema["components"]["schemas"]["ErrorCodeEnum"]["enum"]) == {code.value for code in ErrorCode}
    detail = schema["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
    assert detail["allOf"][0]["$ref"] == "#/components/schemas/ErrorCodeEnum"
    prepare = schema["paths"]["/api/releases/prepare"]["post"]["responses"]
    assert "`validation_error`" in prepare["400"]["description"]
    assert "`target_unreachable`" in prepare["503"]["description"]
    assert "`lock_timeout`" in prepare["503"]["description"]


UNREACHABLE = "postgres://nobody@127.0.0.1:1/none"
ADD_COLUMN = {
    "type": "add_column",
    "table": "users",
    "column": {"name": "x", "type": "integer", "nullable": True},
}


@pytest.mark.django_db
def test_one_refusal_rendered_by_each_edge(sqlite_database_factory, tmp_path):
    """The same unreachable target: 503 `target_unreachable` in the API's envelope, `error:
    target_unreachable:` and exit 1 from the command, `error_code` target_unreachable from the tool kernel."""
    made = make_tenant("acme", sqlite_database_factory)
    staging = made.environment("staging")
    staging.database_url = UNREACHABLE
    staging.save()
    _, token = token_issue(tenant=made.tenant, user=made.admin)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG="acme")
    bundle = {"database": {"changes": [ADD_COLUMN]}, "feature_flags": {}}

    response = client.post(
        "/api/releases/prepare",
        {"from_env": "dev", "to_env": "staging", "bundle_data": bundle},
        format="json",
    )
    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "target_unreachable"
    assert "nobody" not in response.content.decode()

    bundle_file = tmp_path / "bundle.json"
    bundle_file.write_text(json.dumps(bundle))
    err = io.StringIO()
    with pytest.raises(SystemExit) as exit_info:
        call_command(
            "release_prepare", "--tenant=acme", f"--bundle={bundle_file}", stdout=io.StringIO(), stderr=err
        )
    assert exit_info.value.code == 1
    assert err.getvalue().startswith("error: target_unreachable:")

    context = ToolContext(made.tenant, environment=staging, user=made.admin)
    result = tool_kernel.execute(
        ToolCall(
            id="c1",
            tool="db.migrate",
            args={"op": "add_column", "table": "users", "column": ADD_COLUMN["column"]},
        ),
        context,
    )
    assert result.ok is False and result.error_code == "target_unreachable"
    assert Release.objects.count() == 0
