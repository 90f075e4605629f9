"""OpenAPI: a valid schema of every route, real responses that match it, and docs served with no CDN."""

from __future__ import annotations

import re
import uuid
from typing import Any

import jsonschema
import pytest
import yaml
from django.contrib.auth import get_user_model
from django.contrib.staticfiles import finders
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from releases import engine
from tenants.services import tenant_setup, token_issue

pytestmark = pytest.mark.django_db

# Every API route of SPEC section 9 (the guide's spelling), with its method.
SPEC_OPERATIONS = [
    ("post", "/api/releases/prepare"),
    ("post", "/api/releases/promote"),
    ("post", "/api/releases/rollback"),
    ("get", "/api/releases/"),
    ("get", "/api/releases/{release_id}"),
    ("post", "/api/releases/{release_id}/approve"),
    ("post", "/api/releases/{release_id}/reject"),
    ("get", "/api/environments/"),
    ("post", "/api/tools/execute"),
    ("get", "/health"),
    ("get", "/metrics"),
]


def fetch_schema() -> dict:
    response = Client().get("/api/schema/", {"format": "json"})
    assert response.status_code == 200, response.content
    return response.json()


def test_spectacular__validate_fail_on_warn__clean(tmp_path):
    target = tmp_path / "schema.yaml"

    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))

    schema = yaml.safe_load(target.read_text())
    assert schema["openapi"].startswith("3.")
    assert {path for _method, path in SPEC_OPERATIONS} <= set(schema["paths"])


def test_schema__public_without_auth__lists_every_spec_route_once():
    schema = fetch_schema()

    for method, path in SPEC_OPERATIONS:
        assert method in schema["paths"].get(path, {}), f"{method.upper()} {path} is not documented"
    operation_ids = [op["operationId"] for item in schema["paths"].values() for op in item.values()]
    assert len(operation_ids) == len(set(operation_ids))
    # Every DRF view of the URLconf, plus /metrics (a plain Django view documented by a hook).
    assert len(operation_ids) == len(api_routes()) + 1, "an API route is missing from the schema"


def api_routes() -> list[tuple[str, str]]:
    """(method, view class) of every DRF view in the URLconf, the schema views themselves aside."""
    from django.urls import URLPattern, URLResolver, get_resolver
    from rest_framework.views import APIView

    found = []

    def walk(patterns):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns)
            elif isinstance(pattern, URLPattern):
                view_class = getattr(pattern.callback, "cls", None)
                if view_class is None or not issubclass(view_class, APIView):
                    continue
                if view_class.__module__.startswith("drf_spectacular"):
                    continue
                for method in ("get", "post", "put", "patch", "delete"):
                    if hasattr(view_class, method):
                        found.append((method, view_class.__qualname__))

    walk(get_resolver().url_patterns)
    return found


def test_schema__authenticated_operations__bearer_tenant_header_and_error_envelopes():
    schema = fetch_schema()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    error = schema["components"]["schemas"]["ErrorEnvelope"]
    assert set(error["properties"]) == {"success", "error"}

    for method, path in SPEC_OPERATIONS:
        operation = schema["paths"][path][method]
        if path == "/health":
            assert "security" not in operation
            continue
        if path == "/metrics":
            assert operation["security"] == [{"metricsToken": []}, {}]
            assert set(operation["responses"]) == {"200", "401"}
            continue
        assert operation["security"] == [{"bearerAuth": []}]
        headers = {
            p["name"]: p.get("required", False)
            for p in operation.get("parameters", [])
            if p["in"] == "header"
        }
        assert headers.get("X-Tenant-Slug") is True
        assert set(headers) <= {"X-Tenant-Slug", "Idempotency-Key"}
        expected_errors = {"400", "401", "403"} | ({"413"} if method == "post" else set())
        assert expected_errors <= set(operation["responses"])
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                [content] = response["content"].values()
                assert content["schema"] == {"$ref": "#/components/schemas/ErrorEnvelope"}, (path, status)
                assert response["description"], (path, status)

    promote = schema["paths"]["/api/releases/promote"]["post"]["responses"]
    assert {"200", "202", "404", "409", "422", "429"} <= set(promote)
    assert "201" in schema["paths"]["/api/releases/prepare"]["post"]["responses"]
    prepare_body = schema["paths"]["/api/releases/prepare"]["post"]["requestBody"]["content"][
        "application/json"
    ]
    assert prepare_body["schema"] == {"$ref": "#/components/schemas/PrepareInputRequest"}


def test_docs__swagger_ui__served_from_local_static_files_only():
    response = Client().get("/api/docs/")

    assert response.status_code == 200
    html = response.content.decode()
    urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html) + re.findall(
        r"""["'](https?://[^"']+|//[^"']+)["']""", html
    )
    assert urls, "the page references no assets"
    for url in urls:
        assert url.startswith("/"), f"{url} is not served by releasemgr"
        assert not url.startswith("//"), f"{url} is protocol-relative (a CDN)"
        if url.startswith("/static/"):
            assert finders.find(url.removeprefix("/static/").split("?")[0]), (
                f"{url} is not a local static file"
            )
    assert "/api/schema/" in html
    assert "http://" not in html and "https://" not in html


# --- real responses against the schema ----------------------------------------------------------


def as_json_schema(node: Any, components: dict) -> Any:
    """OpenAPI 3.0 -> JSON Schema: resolve $ref, nullable -> null allowed, objects closed."""
    if isinstance(node, list):
        return [as_json_schema(item, components) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return as_json_schema(components[node["$ref"].rsplit("/", 1)[-1]], components)
    result = {}
    for key, value in node.items():
        if key == "properties":
            result[key] = {name: as_json_schema(item, components) for name, item in value.items()}
        elif key not in ("nullable", "readOnly", "writeOnly", "description", "format", "example"):
            result[key] = as_json_schema(value, components)
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        result["additionalProperties"] = False  # an undocumented field is a failure
    if node.get("nullable"):
        result = {"anyOf": [result, {"type": "null"}]}
    return result


class SchemaChecker:
    def __init__(self) -> None:
        self.schema = fetch_schema()
        self.components = self.schema["components"]["schemas"]
        self.checked: set[tuple[str, str, str]] = set()

    def check(self, method: str, path: str, response) -> dict:
        operation = self.schema["paths"][path][method]
        status = str(response.status_code)
        assert status in operation["responses"], f"{method.upper()} {path} answered an undocumented {status}"
        [(media_type, content)] = operation["responses"][status]["content"].items()
        assert response["Content-Type"].split(";")[0] == media_type
        body = response.json() if media_type == "application/json" else response.content.decode()
        jsonschema.validate(body, as_json_schema(content["schema"], self.components))
        self.checked.add((method, path, status))
        return body


@pytest.fixture
def api(sqlite_database_factory):
    slug = f"oas{uuid.uuid4().hex[:8]}"
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(
        slug=slug, environments=urls, admins=[f"{slug}-admin"], approvers=[f"{slug}-approver"]
    )
    _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username=f"{slug}-admin"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client, urls


@pytest.mark.django_db(transaction=True)
def test_responses__release_flow__every_body_matches_its_documented_schema(api):
    client, urls = api
    with engine.open_target(urls["staging"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY)")
    checker = SchemaChecker()

    unsafe = client.post(
        "/api/releases/prepare",
        {
            "from_env": "dev",
            "to_env": "staging",
            "bundle_data": {
                "database": {
                    "changes": [
                        {
                            "type": "add_column",
                            "table": "accounts",
                            "column": {
                                "name": "email",
                                "type": "string",
                                "max_length": 100,
                                "nullable": False,
                            },
                        }
                    ]
                },
                "feature_flags": {},
            },
        },
        format="json",
    )
    unsafe_data = checker.check("post", "/api/releases/prepare", unsafe)["data"]
    assert unsafe_data["lint"], "the bundle was chosen to produce a lint finding"
    refused = client.post("/api/releases/promote", {"release_id": unsafe_data["release_id"]}, format="json")
    assert checker.check("post", "/api/releases/promote", refused)["error"]["code"] == "unsafe_migration"

    prepared = client.post(
        "/api/releases/prepare",
        {
            "from_env": "dev",
            "to_env": "staging",
            "bundle_data": {
                "database": {
                    "changes": [
                        {
                            "type": "create_table",
                            "table": "widgets",
                            "columns": [{"name": "n", "type": "text"}],
                        }
                    ]
                },
                "feature_flags": {"beta": True},
            },
        },
        format="json",
    )
    release_id = checker.check("post", "/api/releases/prepare", prepared)["data"]["release_id"]
    approved = client.post(f"/api/releases/{release_id}/approve", {"comment": "fine"}, format="json")
    assert checker.check("post", "/api/releases/{release_id}/approve", approved)["data"]["approvals"]
    promoted = client.post("/api/releases/promote", {"release_id": release_id}, format="json")
    assert checker.check("post", "/api/releases/promote", promoted)["data"]["status"] == "promoted"
    detail = client.get(f"/api/releases/{release_id}")
    assert checker.check("get", "/api/releases/{release_id}", detail)["data"]["backups"]
    busy = client.post(f"/api/releases/{release_id}/reject", {}, format="json")
    checker.check("post", "/api/releases/{release_id}/reject", busy)
    listing = client.get("/api/releases/", {"page_size": 1})
    assert checker.check("get", "/api/releases/", listing)["data"]["next"]
    checker.check("get", "/api/environments/", client.get("/api/environments/"))
    rolled_back = client.post("/api/releases/rollback", {"release_id": release_id}, format="json")
    assert checker.check("post", "/api/releases/rollback", rolled_back)["data"]["rolled_back"] is True

    checker.check("get", "/api/releases/{release_id}", client.get("/api/releases/rel_19990101_0000"))
    checker.check("post", "/api/releases/prepare", client.post("/api/releases/prepare", {}, format="json"))
    checker.check("get", "/api/releases/", APIClient().get("/api/releases/"))
    checker.check("get", "/health", Client().get("/health"))
    assert "releases_promoted_total" in checker.check("get", "/metrics", Client().get("/metrics"))

    assert {status for _m, _p, status in checker.checked} >= {"200", "201", "400", "401", "404", "409", "422"}
