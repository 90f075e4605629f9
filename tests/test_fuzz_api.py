"""Schemathesis against the project's own OpenAPI schema (/api/schema/) on a live test server.

Every operation is fuzzed with schema-valid requests carrying a valid admin token and X-Tenant-Slug;
each response must not be a server error and must conform to the schema (status code, content type,
body). Random release ids only ever find 404s, so part of the cases are pointed at real releases of
the right status (SPEC 13: schemathesis must see 2xx answers on every operation, not only refusals),
and each operation's test asserts that it did.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import schemathesis
from django.contrib.auth import get_user_model
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from releases import engine, services
from releases.models import Release, ReleaseStatus
from tenants.services import tenant_setup, token_issue

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

SLUG = "fuzz"
MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Every operation of the schema; test_schema__operations__all_fuzzed fails when one is added or removed.
OPERATIONS = [
    "GET /api/environments/",
    "GET /api/releases/",
    "GET /api/releases/{release_id}",
    "POST /api/releases/{release_id}/approve",
    "POST /api/releases/{release_id}/reject",
    "POST /api/releases/prepare",
    "POST /api/releases/promote",
    "POST /api/releases/rollback",
    "POST /api/tools/execute",
    "GET /health",
    "GET /metrics",
]


class Fuzz:
    """The live tenant, its token and schema, and how to point a case at a real release."""

    def __init__(self, live_server, tenant, user, token: str) -> None:
        self.base_url = live_server.url
        self.tenant = tenant
        self.user = user
        self.headers = {"Authorization": f"Bearer {token}", "X-Tenant-Slug": SLUG}
        self.flags = itertools.count()
        self.schema = schemathesis.openapi.from_url(f"{live_server.url}/api/schema/?format=json")

    def operation(self, label: str):
        for result in self.schema.get_all_operations():
            operation = result.ok()
            if operation.label == label:
                return operation
        raise AssertionError(f"{label} is not in the schema")

    def prepared(self) -> Release:
        """A release dev -> staging that can be promoted, approved or rejected (prepared when needed)."""
        release = (
            Release.objects.filter(tenant=self.tenant, status=ReleaseStatus.PREPARED, approvals__isnull=True)
            .order_by("-created_at", "-id")
            .first()
        )
        if release is None:
            # A flag of its own: always something to release, whatever was promoted before.
            release = services.release_prepare(
                tenant=self.tenant,
                user=self.user,
                from_env="dev",
                to_env="staging",
                bundle_data={"feature_flags": {f"fuzz_flag_{next(self.flags)}": True}},
            )
        return release

    def rollback_target(self) -> Release:
        """The live release of staging, promoted first when there is none."""
        live = (
            Release.objects.filter(tenant=self.tenant, status=ReleaseStatus.PROMOTED)
            .order_by("-promoted_at", "-id")
            .first()
        )
        if live is None:
            live = services.release_promote(release=self.prepared(), user=self.user, wait_seconds=None)
        return live

    def aim(self, label: str, case, turn: int) -> None:
        """On every other case, replace a random release id (or prepare body) with a real one."""
        if turn % 2:
            return
        if label == "POST /api/releases/prepare":
            case.body = {"from_env": "dev", "to_env": "staging"}
        elif label == "POST /api/releases/promote":
            case.body = {**case.body, "release_id": self.prepared().release_id}
        elif label == "POST /api/releases/rollback":
            case.body = {**case.body, "release_id": self.rollback_target().release_id}
        elif "{release_id}" in label:
            case.path_parameters = {**case.path_parameters, "release_id": self.prepared().release_id}
        elif label == "POST /api/tools/execute":
            case.body = {
                "tool": "db.migrate",
                "environment": "staging",
                "args": {
                    "op": "create_table",
                    "table": "fuzz_tool",
                    "columns": [{"name": "n", "type": "text"}],
                },
            }


@pytest.fixture
def fuzz(live_server, transactional_db, sqlite_database_factory, settings_fixture_rates):
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    # dev is ahead of staging, so a prepare without bundle_data has something to release.
    with engine.open_target(urls["dev"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE customers (id integer PRIMARY KEY, name varchar(100) NOT NULL)")
    tenant = tenant_setup(slug=SLUG, environments=urls, admins=["fuzz-admin"])
    user = get_user_model().objects.get(username="fuzz-admin")
    _, token = token_issue(tenant=tenant, user=user)
    services.release_prepare(tenant=tenant, user=user, from_env="dev", to_env="staging")
    return Fuzz(live_server, tenant, user, token)


@pytest.fixture
def settings_fixture_rates(settings):
    """Fuzzing sends hundreds of requests a minute: lift the throttle (its own tests cover it)."""
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {"releases": "100000/min", "tools": "100000/min"},
    }
    settings.HEALTH_TENANT = SLUG


def test_schema__operations__all_fuzzed(fuzz):
    labels = sorted(result.ok().label for result in fuzz.schema.get_all_operations())
    assert labels == sorted(OPERATIONS)


def fuzz_operation(fuzz: Fuzz, label: str, mode: GenerationMode, *, aim: bool) -> Counter[int]:
    """Run MAX_EXAMPLES generated cases of one operation through CHECKS; the status codes seen."""
    operation = fuzz.operation(label)
    authenticated = bool(operation.definition.raw.get("security"))
    headers = fuzz.headers if authenticated else {}
    strategy = operation.as_strategy(
        generation_mode=mode, headers={"X-Tenant-Slug": SLUG} if authenticated else None
    )
    statuses: Counter[int] = Counter()
    turns = itertools.count()

    @hypothesis_settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case):
        if aim:
            fuzz.aim(label, case, next(turns))
        response = case.call(base_url=fuzz.base_url, headers=headers, timeout=60)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    run()
    return statuses


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz__valid_requests__conform_and_each_operation_answers_2xx(fuzz, label):
    statuses = fuzz_operation(fuzz, label, GenerationMode.POSITIVE, aim=True)
    assert any(200 <= status < 300 for status in statuses), f"{label}: no 2xx among {dict(statuses)}"
    assert not any(status >= 500 for status in statuses), statuses


# Operations with inputs that can be made invalid (health and metrics take none).
INVALID_INPUT_OPERATIONS = [label for label in OPERATIONS if label not in ("GET /health", "GET /metrics")]


@pytest.mark.parametrize("label", INVALID_INPUT_OPERATIONS)
def test_fuzz__invalid_requests__refused_in_the_envelope_never_500(fuzz, label):
    statuses = fuzz_operation(fuzz, label, GenerationMode.NEGATIVE, aim=False)
    assert statuses and not any(status >= 500 for status in statuses), statuses
