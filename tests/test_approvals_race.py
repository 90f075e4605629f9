"""A reject racing a promote (issue 13.1): a decision the API accepted is never overtaken.

The attack: an approved prod release is promoted while its only approver rejects it 0-50 ms later,
both over the API, on real threads with PostgreSQL as the control database (pytest-django's
in-memory SQLite takes table locks that ignore busy_timeout, so `make test-pg-control` runs this).
Promote checks the approvals in the request, and again under the release row's lock that moves the
release to `promoting` (the lock the approval service takes). So in every trial exactly one side
wins: the reject answers 200 and the promote 409 `approvals_missing` with the target untouched, or
the promote goes through and the reject answers 409 because the release is no longer prepared.

The approver's reject also stands for revoking their own approval: approvals have no separate
revoke, an approver changes their decision through the same service (API, admin, e-mailed link).
"""

from __future__ import annotations

import random
import threading

import pytest
from django.contrib.auth import get_user_model
from django.db import connection as control_connection
from rest_framework.test import APIClient

from releases import engine, services
from releases.models import Approval, ApprovalDecision, AuditEvent, Release, ReleaseStatus
from releases.services import promote as promote_module
from tenants.services import tenant_setup, token_issue

pytestmark = [pytest.mark.postgres]

TRIALS = 40
MAX_OFFSET_SECONDS = 0.050
ADD_NOTES = {
    "database": {
        "changes": [{"type": "add_column", "table": "accounts", "column": {"name": "notes", "type": "text"}}]
    },
    "feature_flags": {},
}


def client_for(token: str, slug: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    return client


def prod_columns(url: str) -> list[str]:
    with engine.open_target(url) as target:
        return sorted(engine.introspect(target)["tables"]["accounts"]["columns"])


def approved_prod_release(slug: str, sqlite_database_factory) -> dict:
    """A tenant whose staging -> prod release is prepared and approved by its only approver."""
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    for stage, url in urls.items():
        with engine.open_target(url) as target, target.connection.cursor() as cursor:
            cursor.execute("CREATE TABLE accounts (id integer PRIMARY KEY, email varchar(100))")
            if stage == "staging":  # the prod gate: staging already runs the release's schema
                cursor.execute("ALTER TABLE accounts ADD COLUMN notes text")
    tenant = tenant_setup(
        slug=slug, environments=urls, admins=[f"{slug}-admin"], approvers=[f"{slug}-approver"]
    )
    users = {u.username: u for u in get_user_model().objects.filter(username__startswith=f"{slug}-")}
    release = services.release_prepare(
        tenant=tenant, user=users[f"{slug}-admin"], from_env="staging", to_env="prod", bundle_data=ADD_NOTES
    )
    assert release.status == ReleaseStatus.PREPARED, release.error_message
    services.approval_record(release=release, user=users[f"{slug}-approver"], decision="approved")
    return {
        "release": release,
        "prod": urls["prod"],
        "admin": client_for(token_issue(tenant=tenant, user=users[f"{slug}-admin"])[1], slug),
        "approver": client_for(token_issue(tenant=tenant, user=users[f"{slug}-approver"])[1], slug),
    }


def race(world: dict, offset: float) -> dict[str, tuple[int, dict]]:
    """Promote (admin) and reject (the approver, `offset` seconds later) over the API, on two threads."""
    release_id = world["release"].release_id
    barrier = threading.Barrier(2)
    answers: dict[str, tuple[int, dict]] = {}

    def post(name: str, client: APIClient, path: str, body: dict, delay: float) -> None:
        try:
            barrier.wait(timeout=30)
            threading.Event().wait(delay)
            response = client.post(path, body, format="json")
            answers[name] = (response.status_code, response.json())
        finally:
            control_connection.close()

    threads = [
        threading.Thread(
            target=post,
            args=("promote", world["admin"], "/api/releases/promote", {"release_id": release_id}, 0),
        ),
        threading.Thread(
            target=post,
            args=(
                "reject",
                world["approver"],
                f"/api/releases/{release_id}/reject",
                {"comment": "stop"},
                offset,
            ),
        ),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


@pytest.fixture
def check_calls(monkeypatch):
    """Which promotion_check refused: the request's pre-check (call 1 in a thread) or the one under
    the row lock in `begin` (call 2). Only counted, never changed."""
    mine = threading.local()  # per thread: each trial's promote runs on a new thread
    refused_at: list[str] = []
    real = promote_module.promotion_check

    def counting(release):
        mine.calls = getattr(mine, "calls", 0) + 1
        try:
            real(release)
        except Exception:
            refused_at.append("pre-check" if mine.calls == 1 else "under the lock")
            raise

    monkeypatch.setattr(promote_module, "promotion_check", counting)
    return refused_at


@pytest.mark.django_db(transaction=True)
def test_promote_vs_reject__40_trials_0_to_50ms__an_accepted_reject_is_never_overtaken(
    sqlite_database_factory, check_calls
):
    if control_connection.vendor == "sqlite":
        pytest.skip(
            "threads need a real control database: pytest-django's in-memory SQLite takes table locks "
            "that ignore busy_timeout; `make test-pg-control` runs this test on PostgreSQL"
        )
    rng = random.Random(1313)
    tally = {"reject won": 0, "promote won": 0}
    for trial in range(TRIALS):
        world = approved_prod_release(f"race{trial}", sqlite_database_factory)
        release = world["release"]
        offset = rng.uniform(0, MAX_OFFSET_SECONDS)
        answers = race(world, offset)

        context = f"trial {trial}, offset {offset * 1000:.1f} ms: {answers}"
        assert set(answers) == {"promote", "reject"}, context
        (promote_status, promote_body), (reject_status, reject_body) = answers["promote"], answers["reject"]
        stored = Release.objects.get(pk=release.pk)
        decision = Approval.objects.get(release=release).decision
        if reject_status == 200:
            tally["reject won"] += 1
            assert promote_status == 409, context
            assert promote_body["error"]["code"] == "approvals_missing", context
            assert promote_body["error"]["details"]["rejected"] == 1, context
            assert stored.status == ReleaseStatus.PREPARED, context
            assert stored.to_environment.lock_owner == "", context  # no lease left behind
            assert decision == ApprovalDecision.REJECTED, context
            assert prod_columns(world["prod"]) == ["email", "id"], context  # the target has no change
            assert not AuditEvent.objects.filter(release=release, event="release.promoted").exists(), context
        else:
            tally["promote won"] += 1
            assert reject_status == 409, context
            assert reject_body["error"]["details"]["status"] in ("promoting", "promoted"), context
            assert promote_status == 200, context
            assert promote_body["data"]["status"] == ReleaseStatus.PROMOTED, context
            assert stored.status == ReleaseStatus.PROMOTED, context
            assert decision == ApprovalDecision.APPROVED, context  # the refused reject left nothing
            assert not AuditEvent.objects.filter(release=release, event="release.rejected").exists(), context
            assert prod_columns(world["prod"]) == ["email", "id", "notes"], context

    under_lock = check_calls.count("under the lock")
    print(
        f"\n{TRIALS} trials: reject won {tally['reject won']} "
        f"(promote refused by its pre-check {check_calls.count('pre-check')}, under the lock {under_lock}), "
        f"promote won {tally['promote won']}"
    )
    assert sum(tally.values()) == TRIALS
    # Who wins depends on the machine's speed (a fast promote takes the lock before most rejects);
    # the window itself is forced deterministically by the test below.


@pytest.mark.django_db(transaction=True)
def test_promote__reject_committed_between_the_precheck_and_the_lock__409_target_unchanged_no_lease(
    sqlite_database_factory, monkeypatch
):
    """The attack's window, forced: the reject commits after promote's pre-check passed and before
    `begin` locks the row. Only the check under the lock can refuse it."""
    world = approved_prod_release("window", sqlite_database_factory)
    release = world["release"]
    real_reconcile = promote_module.release_reconcile

    def reject_then_reconcile(*, environment):
        response = world["approver"].post(f"/api/releases/{release.release_id}/reject", {}, format="json")
        assert response.status_code == 200, response.content
        return real_reconcile(environment=environment)

    monkeypatch.setattr(promote_module, "release_reconcile", reject_then_reconcile)
    response = world["admin"].post("/api/releases/promote", {"release_id": release.release_id}, format="json")
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "approvals_missing"
    stored = Release.objects.get(pk=release.pk)
    assert stored.status == ReleaseStatus.PREPARED
    assert stored.to_environment.lock_owner == ""
    assert prod_columns(world["prod"]) == ["email", "id"]
