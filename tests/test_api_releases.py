"""The guide's release flow over HTTP, its refusals and its bad inputs, on SQLite and PostgreSQL targets."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from django.contrib.auth import get_user_model
from rest_framework.test import APIClient

from releases import engine
from releases.models import AuditEvent, Migration, Release
from tenants.models import Role
from tenants.services import membership_set, tenant_setup, token_issue, user_ensure

pytestmark = pytest.mark.django_db

CREATE_NEW_FEATURE = {
    "type": "create_table",
    "table": "new_feature",
    "columns": [
        {"name": "name", "type": "string", "max_length": 100, "nullable": False},
        {"name": "enabled", "type": "boolean", "nullable": False, "default": False},
    ],
}


def client_for(token: str, slug: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client


@pytest.fixture
def tenant_factory(database_factory):
    """A tenant whose three environments are fresh target databases of the test's dialect."""

    def make(slug: str = "primary"):
        urls = {stage: database_factory() for stage in ("dev", "staging", "prod")}
        tenant = tenant_setup(
            slug=slug, environments=urls, admins=[f"{slug}-admin"], approvers=[f"{slug}-approver"]
        )
        admin = get_user_model().objects.get(username=f"{slug}-admin")
        _, token = token_issue(tenant=tenant, user=admin)
        return tenant, urls, client_for(token, slug)

    return make


def target_state(url: str) -> tuple[dict, str]:
    with engine.open_target(url) as target:
        return engine.introspect(target), engine.native_fingerprint(target)


def control_counts() -> tuple[int, int, int]:
    return Release.objects.count(), Migration.objects.count(), AuditEvent.objects.count()


def prepare(client, bundle=None, from_env="dev", to_env="staging", **extra):
    body = {"from_env": from_env, "to_env": to_env, **extra}
    if bundle is not None:
        body["bundle_data"] = bundle
    return client.post("/api/releases/prepare", body, format="json")


def test_guide_flow__prepare_promote_get_rollback__target_follows(tenant_factory):
    tenant, urls, client = tenant_factory()
    before, native_before = target_state(urls["staging"])

    response = prepare(
        client, {"database": {"changes": [CREATE_NEW_FEATURE]}, "feature_flags": {"custom_domains": True}}
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["success"] is True
    data = body["data"]
    release_id = data["release_id"]
    assert data["id"] == release_id and release_id.startswith("rel_")
    assert data["status"] == "prepared" and (data["from_env"], data["to_env"]) == ("dev", "staging")
    canonical = json.dumps(data["bundle"], sort_keys=True, separators=(",", ":")).encode()
    assert data["bundle_sha256"] == hashlib.sha256(canonical).hexdigest()
    [migration] = data["migrations"]
    assert migration["operation"] == "create_table" and migration["table"] == "new_feature"
    assert "CREATE TABLE" in migration["sql"] and migration["dry_run_result"]["ok"] is True
    assert data["dry_run"]["forward_ok"] and data["dry_run"]["rollback_verified"]
    assert data["created_at"].endswith("Z") and data["created_by"] == "primary-admin"
    assert target_state(urls["staging"]) == (before, native_before), "prepare must not change the target"

    response = client.post("/api/releases/promote", {"release_id": release_id}, format="json")
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["status"] == "promoted" and data["promoted_at"].endswith("Z")
    after, _ = target_state(urls["staging"])
    assert "new_feature" in after["tables"]
    assert data["flag_changes"]["custom_domains"]["after"] is True

    detail = client.get(f"/api/releases/{release_id}")
    assert detail.status_code == 200 and detail.json()["data"]["status"] == "promoted"
    assert client.get(f"/api/releases/{release_id}/").status_code == 200
    listing = client.get("/api/releases/").json()["data"]
    assert listing["count"] == 1 and listing["results"][0]["release_id"] == release_id
    assert "migrations" not in listing["results"][0]

    response = client.post("/api/releases/rollback", {"release_id": release_id}, format="json")
    assert response.status_code == 200, response.content
    data = response.json()["data"]
    assert data["rolled_back"] is True and data["status"] == "rolled_back"
    rolled, _ = target_state(urls["staging"])
    assert engine.fingerprint(rolled) == engine.fingerprint(before)
    events = list(AuditEvent.objects.filter(release__release_id=release_id).values_list("event", flat=True))
    assert events == ["release.prepared", "release.promoted", "release.rollback"]


def test_prepare__last_of_three_changes_fails__target_unchanged_and_release_failed(tenant_factory):
    tenant, urls, client = tenant_factory()
    with engine.open_target(urls["staging"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email varchar(100))")
        cursor.execute("INSERT INTO accounts (id, email) VALUES (1, 'a@x'), (2, 'a@x')")
        if target.vendor == "sqlite":
            target.connection.commit()
    before = target_state(urls["staging"])
    bundle = {
        "database": {
            "changes": [
                CREATE_NEW_FEATURE,
                {
                    "type": "add_column",
                    "table": "accounts",
                    "column": {"name": "plan", "type": "string", "max_length": 20},
                },
                {"type": "modify_column", "table": "accounts", "column": {"name": "email", "unique": True}},
            ]
        }
    }
    response = prepare(client, bundle, allow_unsafe=["disallowed-unique-constraint"], reason="test")
    assert response.status_code == 201, response.content
    data = response.json()["data"]
    assert data["status"] == "failed" and data["failed_at"] and data["error_message"]
    assert [m["dry_run_result"]["ok"] for m in data["migrations"]][:2] == [True, True]
    assert data["migrations"][2]["dry_run_result"]["ok"] is False
    assert target_state(urls["staging"]) == before
    assert AuditEvent.objects.filter(event="release.failed", payload__phase="prepare").count() == 1
    # A failed release cannot be promoted; rolling it back settles it without touching the target.
    assert (
        client.post("/api/releases/promote", {"release_id": data["release_id"]}, format="json").status_code
        == 409
    )
    response = client.post("/api/releases/rollback", {"release_id": data["release_id"]}, format="json")
    assert response.status_code == 200 and response.json()["data"]["status"] == "rolled_back"
    assert target_state(urls["staging"]) == before


@pytest.mark.slow
def test_drop_column__promoted_then_rolled_back__every_value_restored(tenant_factory):
    tenant, urls, client = tenant_factory()
    rows = [(i, f"note {i} 'quoted'") for i in range(1, 3001)]
    with engine.open_target(urls["staging"]) as target, target.connection.cursor() as cursor:
        cursor.execute("CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL)")
        cursor.executemany("INSERT INTO notes (id, body) VALUES (%s, %s)", rows)
        if target.vendor == "sqlite":
            target.connection.commit()
    bundle = {"database": {"changes": [{"type": "drop_column", "table": "notes", "column": "body"}]}}
    release_id = prepare(client, bundle).json()["data"]["release_id"]
    promoted = client.post("/api/releases/promote", {"release_id": release_id}, format="json")
    assert promoted.json()["data"]["status"] == "promoted", promoted.content
    assert "body" not in target_state(urls["staging"])[0]["tables"]["notes"]["columns"]
    rolled = client.post("/api/releases/rollback", {"release_id": release_id}, format="json")
    assert rolled.json()["data"]["status"] == "rolled_back", rolled.content
    with engine.open_target(urls["staging"]) as target, target.connection.cursor() as cursor:
        cursor.execute("SELECT id, body FROM notes ORDER BY id")
        assert [tuple(row) for row in cursor.fetchall()] == rows


def test_next_release_id__taken__suffixes_in_order(tenant_factory):
    from releases.services import next_release_id

    tenant, urls, client = tenant_factory()
    first = prepare(client, {"database": {"changes": [CREATE_NEW_FEATURE]}}).json()["data"]["release_id"]
    assert re.fullmatch(r"rel_\d{8}_\d{4}", first)
    release = Release.objects.get(release_id=first)
    for suffix in (2, 3):
        candidate = next_release_id(tenant=tenant)
        if candidate[:17] != first[:17]:
            pytest.skip("the minute turned during the test")
        assert candidate == f"{first}_{suffix}"
        release.pk = None
        release.release_id = candidate
        release.save()


def test_next_release_id__concurrent_prepares__each_gets_its_own_id(tenant_factory):
    """Ids handed out but not saved yet (prepares still in their dry-run) are not handed out again."""
    import threading

    from releases.services import next_release_id

    tenant, _, _ = tenant_factory()
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def pick() -> None:
        barrier.wait()
        ids.append(next_release_id(tenant=tenant))

    threads = [threading.Thread(target=pick) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    if len({release_id[:17] for release_id in ids}) != 1:
        pytest.skip("the minute turned during the test")
    base = ids[0][:17]
    assert sorted(ids) == sorted([base] + [f"{base}_{n}" for n in range(2, 9)])


def test_rollback__not_the_latest_live_release__409_naming_the_one_first(tenant_factory):
    tenant, urls, client = tenant_factory()
    ids = []
    for table in ("first_table", "second_table"):
        change = {**CREATE_NEW_FEATURE, "table": table}
        release_id = prepare(client, {"database": {"changes": [change]}}).json()["data"]["release_id"]
        assert (
            client.post("/api/releases/promote", {"release_id": release_id}, format="json").status_code == 200
        )
        ids.append(release_id)
    response = client.post("/api/releases/rollback", {"release_id": ids[0]}, format="json")
    assert response.status_code == 409
    assert response.json()["error"]["details"]["release_id"] == ids[1]


# --- refusals -----------------------------------------------------------------------------------


@pytest.fixture
def world(sqlite_database_factory):
    """Two tenants on SQLite targets, with admin, viewer and approver tokens, and one prepared release."""
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    other_urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"], approvers=["acme-approver"])
    other = tenant_setup(slug="other", environments=other_urls, admins=["other-admin"])
    viewer = user_ensure(username="acme-viewer")
    membership_set(tenant=tenant, user=viewer, role=Role.VIEWER)
    users = {u.username: u for u in get_user_model().objects.all()}
    tokens = {
        "admin": token_issue(tenant=tenant, user=users["acme-admin"])[1],
        "viewer": token_issue(tenant=tenant, user=viewer)[1],
        "approver": token_issue(tenant=tenant, user=users["acme-approver"])[1],
        "other": token_issue(tenant=other, user=users["other-admin"])[1],
    }
    admin = client_for(tokens["admin"], "acme")
    release_id = prepare(admin, {"database": {"changes": [CREATE_NEW_FEATURE]}}).json()["data"]["release_id"]
    other_client = client_for(tokens["other"], "other")
    # Release ids are unique per tenant: the other tenant's second release has an id acme does not have.
    for _ in range(2):
        response = prepare(other_client, {"database": {"changes": [CREATE_NEW_FEATURE]}})
        other_release = response.json()["data"]["release_id"]
    assert not Release.objects.filter(tenant=tenant, release_id=other_release).exists()
    return {"urls": urls, "tokens": tokens, "release_id": release_id, "other_release": other_release}


REFUSALS = [
    ("anonymous", None, None, 401, "unauthorized"),
    ("bad token", "rm_not-a-real-token", "acme", 401, "unauthorized"),
    ("malformed header", "Token abc", "acme", 401, "unauthorized"),
    ("missing tenant header", "admin", "", 400, "validation_error"),
    ("other tenant's slug", "admin", "other", 403, "forbidden"),
    ("viewer role", "viewer", "acme", 403, "forbidden"),
    ("approver role", "approver", "acme", 403, "forbidden"),
]


@pytest.mark.parametrize("operation", ["prepare", "promote", "rollback"])
@pytest.mark.parametrize(("label", "token", "slug", "status", "code"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_release_operations__refused__nothing_changes(world, operation, label, token, slug, status, code):
    client = APIClient()
    headers = {}
    if token is not None:
        raw = world["tokens"].get(token, token)
        headers["HTTP_AUTHORIZATION"] = raw if raw.startswith("Token") else f"Bearer {raw}"
    if slug is not None:
        headers["HTTP_X_TENANT_SLUG"] = slug
    body = (
        {
            "from_env": "dev",
            "to_env": "staging",
            "bundle_data": {"database": {"changes": [CREATE_NEW_FEATURE]}},
        }
        if operation == "prepare"
        else {"release_id": world["release_id"]}
    )
    before_counts = control_counts()
    before_target = target_state(world["urls"]["staging"])
    response = client.post(f"/api/releases/{operation}", body, format="json", **headers)
    assert response.status_code == status, response.content
    assert response.json() == {"success": False, "error": response.json()["error"]}
    assert response.json()["error"]["code"] == code
    assert control_counts() == before_counts
    assert target_state(world["urls"]["staging"]) == before_target
    assert Release.objects.get(release_id=world["release_id"], tenant__slug="acme").status == "prepared"


def test_other_tenants_release__404_on_read_and_write(world):
    client = client_for(world["tokens"]["admin"], "acme")
    assert client.get(f"/api/releases/{world['other_release']}").status_code == 404
    response = client.post("/api/releases/promote", {"release_id": world["other_release"]}, format="json")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert Release.objects.get(release_id=world["other_release"], tenant__slug="other").status == "prepared"


def test_viewer__can_read__cannot_write(world):
    client = client_for(world["tokens"]["viewer"], "acme")
    assert client.get("/api/releases/").status_code == 200
    assert client.get(f"/api/releases/{world['release_id']}").status_code == 200
    environments = client.get("/api/environments/")
    assert environments.status_code == 200
    text = environments.content.decode()
    assert "sqlite" not in text and world["urls"]["dev"] not in text


def test_revoked_or_expired_token__401(world):
    from django.utils import timezone

    from tenants.models import ApiToken

    ApiToken.objects.filter(user__username="acme-viewer").update(revoked_at=timezone.now())
    client = client_for(world["tokens"]["viewer"], "acme")
    assert client.get("/api/releases/").status_code == 401


# --- bad input ----------------------------------------------------------------------------------

BAD_BUNDLES = [
    ("unknown change type", {"database": {"changes": [{"type": "truncate_table", "table": "x"}]}}),
    (
        "unknown column type",
        {"database": {"changes": [{**CREATE_NEW_FEATURE, "columns": [{"name": "a", "type": "money"}]}]}},
    ),
    ("injection in table", {"database": {"changes": [{**CREATE_NEW_FEATURE, "table": "x; DROP TABLE y"}]}}),
    ("quote in table", {"database": {"changes": [{**CREATE_NEW_FEATURE, "table": 'x"; --'}]}}),
    (
        "injection in column",
        {"database": {"changes": [{**CREATE_NEW_FEATURE, "columns": [{"name": "a b", "type": "text"}]}]}},
    ),
    ("keyword table", {"database": {"changes": [{**CREATE_NEW_FEATURE, "table": "select"}]}}),
    ("reserved prefix", {"database": {"changes": [{**CREATE_NEW_FEATURE, "table": "_rm_history"}]}}),
    (
        "default of wrong type",
        {
            "database": {
                "changes": [
                    {
                        **CREATE_NEW_FEATURE,
                        "columns": [{"name": "n", "type": "integer", "default": "1; DROP TABLE x"}],
                    }
                ]
            }
        },
    ),
    ("changes not a list", {"database": {"changes": "create everything"}}),
    ("change not an object", {"database": {"changes": [42]}}),
    ("bundle not an object", ["nope"]),
    ("flag value not allowed", {"database": {"changes": []}, "feature_flags": {"x": {"nested": 1}}}),
    (
        "too many changes",
        {"database": {"changes": [{**CREATE_NEW_FEATURE, "table": f"t{i}"} for i in range(501)]}},
    ),
    ("too many flags", {"database": {"changes": []}, "feature_flags": {f"f{i}": True for i in range(501)}}),
]


@pytest.mark.parametrize(("label", "bundle"), BAD_BUNDLES, ids=[b[0] for b in BAD_BUNDLES])
def test_prepare__bad_bundle__400_and_nothing_saved(world, label, bundle):
    client = client_for(world["tokens"]["admin"], "acme")
    before_counts, before_target = control_counts(), target_state(world["urls"]["staging"])
    response = prepare(client, bundle)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_error" and error["message"]
    assert "Traceback" not in response.content.decode()
    assert control_counts() == before_counts
    assert target_state(world["urls"]["staging"]) == before_target


@pytest.mark.parametrize(
    ("label", "raw", "status"),
    [
        ("malformed json", b'{"from_env": "dev",', 400),
        ("not an object", b"[1, 2]", 400),
        ("NaN", b'{"from_env": NaN}', 400),
        ("wrong pipeline", b'{"from_env": "dev", "to_env": "prod"}', 400),
        ("backwards", b'{"from_env": "staging", "to_env": "dev"}', 400),
        ("unknown env", b'{"from_env": "qa", "to_env": "staging"}', 400),
        (
            "unknown lint rule",
            b'{"from_env": "dev", "to_env": "staging", "allow_unsafe": ["nope"], "reason": "x"}',
            400,
        ),
        ("oversize body", b'{"from_env": "dev", "pad": "' + b"x" * (1024 * 1024 + 10) + b'"}', 413),
    ],
)
def test_prepare__bad_request_body__clear_4xx(world, label, raw, status):
    client = client_for(world["tokens"]["admin"], "acme")
    before_counts = control_counts()
    response = client.generic("POST", "/api/releases/prepare", raw, content_type="application/json")
    assert response.status_code == status, response.content
    assert response.json()["success"] is False and response.json()["error"]["code"]
    assert control_counts() == before_counts


@pytest.mark.parametrize(
    ("label", "raw", "where"),
    [
        # Found by fuzzing: a lone surrogate is valid JSON but not UTF-8, and failed the response (500).
        (
            "surrogate flag name",
            rb'{"from_env": "dev", "to_env": "staging", '
            rb'"bundle_data": {"feature_flags": {"\ud800": true}}}',
            "bundle_data.feature_flags",
        ),
        ("surrogate echoed in an error", rb'{"from_env": "\udfff", "to_env": "staging"}', "from_env"),
        # PostgreSQL stores no NUL in text or jsonb: the release's bundle failed to save (500).
        (
            "NUL in a column default",
            rb'{"from_env": "dev", "to_env": "staging", "bundle_data": {"database": '
            rb'{"changes": [{"type": "create_table", "table": "t", "columns": [{"name": "c", "type": "string", '
            rb'"max_length": 9, "default": "a\u0000b"}]}]}}}',
            "bundle_data.database.changes[0].columns[0].default",
        ),
        # json.loads raised RecursionError (500).
        (
            "deep nesting",
            b'{"from_env": "dev", "to_env": "staging", "bundle_data": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "body",
        ),
    ],
)
def test_prepare__body_json_cannot_store__400_naming_where(world, label, raw, where):
    client = client_for(world["tokens"]["admin"], "acme")
    before_counts = control_counts()
    response = client.generic("POST", "/api/releases/prepare", raw, content_type="application/json")
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_error" and list(error["details"]) == [where], error
    assert control_counts() == before_counts


def test_prepare__nesting_at_the_limit__accepted_by_the_parser(world):
    # 64 levels parse; the bundle validator then refuses the unknown section, in its own words.
    client = client_for(world["tokens"]["admin"], "acme")
    deep = b'{"from_env": "dev", "to_env": "staging", "bundle_data": {"x": ' + b"[" * 62 + b"]" * 62 + b"}}"
    response = client.generic("POST", "/api/releases/prepare", deep, content_type="application/json")
    assert response.status_code == 400 and list(response.json()["error"]["details"]) == ["x"], (
        response.content
    )


def test_prepare__no_content_type__parsed_as_json(world):
    client = client_for(world["tokens"]["admin"], "acme")
    body = json.dumps(
        {
            "from_env": "dev",
            "to_env": "staging",
            "bundle_data": {"database": {"changes": [CREATE_NEW_FEATURE]}},
        }
    )
    response = client.generic(
        "POST", "/api/releases/prepare", body, content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 201, response.content


def test_promote__unknown_or_malformed_release_id__clear_errors(world):
    client = client_for(world["tokens"]["admin"], "acme")
    assert (
        client.post("/api/releases/promote", {"release_id": "rel_20000101_0000"}, format="json").status_code
        == 404
    )
    assert (
        client.post("/api/releases/promote", {"release_id": "'; DROP TABLE x"}, format="json").status_code
        == 400
    )
    assert client.post("/api/releases/promote", {}, format="json").status_code == 400
