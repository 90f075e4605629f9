"""Task idempotency (acks_late redelivery): the database and the target's `_rm_history` decide, on both dialects."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from releases import engine, services, tasks
from releases.models import AuditEvent, Release, ReleaseStatus
from tenants.models import Environment
from tenants.services import tenant_setup

pytestmark = pytest.mark.django_db

ADD_NOTES = {
    "database": {
        "changes": [{"type": "add_column", "table": "accounts", "column": {"name": "notes", "type": "text"}}]
    },
    "feature_flags": {},
}


@pytest.fixture
def staging_release(database_factory):
    """A release dev -> staging prepared through the real service on the test's dialect."""
    urls = {stage: database_factory() for stage in ("dev", "staging", "prod")}
    for url in urls.values():
        with engine.open_target(url) as target, target.connection.cursor() as cursor:
            cursor.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, email varchar(100))")
            cursor.execute(
                "INSERT INTO accounts (id, email) VALUES (1, 'a@example.com'), (2, 'b@example.com')"
            )
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"])
    admin = get_user_model().objects.get(username="acme-admin")
    release = services.release_prepare(
        tenant=tenant, user=admin, from_env="dev", to_env="staging", bundle_data=ADD_NOTES
    )
    assert release.status == ReleaseStatus.PREPARED, release.error_message
    return release, urls["staging"], admin


def history_rows(url: str, release: Release) -> list[dict]:
    with engine.open_target(url) as target:
        return [row for row in engine.history(target) if row["release_pk"] == release.pk]


def native(url: str) -> str:
    with engine.open_target(url) as target:
        return engine.native_fingerprint(target)


def events(release: Release, name: str) -> int:
    return AuditEvent.objects.filter(release=release, event=name).count()


def test_promote_task__delivered_twice__second_does_nothing(
    staging_release, django_capture_on_commit_callbacks
):
    release, url, admin = staging_release
    # The request's half: lease and status, as release_promote does before queueing the task.
    owner = services.begin(release, status_from=ReleaseStatus.PREPARED, status_to=ReleaseStatus.PROMOTING)
    with django_capture_on_commit_callbacks(execute=True):
        tasks.promote_task(release.pk, owner, admin.pk)
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED, release.error_message
    after = native(url)

    with django_capture_on_commit_callbacks(execute=True):
        tasks.promote_task(release.pk, owner, admin.pk)  # the broker delivers it again

    assert len(history_rows(url, release)) == 1
    assert native(url) == after
    assert events(release, "release.promoted") == 1
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PROMOTED


def test_promote_task__redelivered_after_the_target_committed__settled_from_history_not_applied_again(
    staging_release, django_capture_on_commit_callbacks
):
    release, url, admin = staging_release
    owner = services.begin(release, status_from=ReleaseStatus.PREPARED, status_to=ReleaseStatus.PROMOTING)
    # The first delivery applied and committed on the target, then its worker died before it
    # could record the outcome in the control database.
    with engine.open_target(url) as target:
        engine.apply(
            target,
            release_pk=release.pk,
            release_id=release.release_id,
            bundle_sha256=release.bundle_sha256,
            changes=services.recorded_changes(release),
            expected_native_before=release.native_fingerprint_before,
            expected_fingerprint_after=release.fingerprint_after,
        )
    after = native(url)
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PROMOTING

    with django_capture_on_commit_callbacks(execute=True):
        tasks.promote_task(release.pk, owner, admin.pk)  # redelivered (acks_late)

    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED
    assert len(history_rows(url, release)) == 1, "nothing applied twice"
    assert native(url) == after
    assert events(release, "release.promoted") == 1
    assert Environment.objects.get(pk=release.to_environment_id).lock_owner == ""


def test_promote_task__another_owner_holds_a_live_lease__does_nothing(staging_release):
    release, url, admin = staging_release
    before = native(url)
    services.begin(release, status_from=ReleaseStatus.PREPARED, status_to=ReleaseStatus.PROMOTING)
    holder = Environment.objects.get(pk=release.to_environment_id).lock_owner

    tasks.promote_task(release.pk, "otherhost:1:deadbeef", admin.pk)

    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PROMOTING
    assert history_rows(url, release) == [] and native(url) == before
    assert Environment.objects.get(pk=release.to_environment_id).lock_owner == holder


def test_rollback_task__delivered_twice__second_does_nothing(
    staging_release, django_capture_on_commit_callbacks
):
    release, url, admin = staging_release
    with django_capture_on_commit_callbacks(execute=True):
        services.release_promote(release=release, user=admin)
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PROMOTED
    owner = services.begin(
        Release.objects.get(pk=release.pk),
        status_from=ReleaseStatus.PROMOTED,
        status_to=ReleaseStatus.ROLLING_BACK,
    )
    with django_capture_on_commit_callbacks(execute=True):
        tasks.rollback_task(release.pk, owner, admin.pk)
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.ROLLED_BACK
    rolled = native(url)
    with django_capture_on_commit_callbacks(execute=True):
        tasks.rollback_task(release.pk, owner, admin.pk)
    directions = [row["direction"] for row in history_rows(url, release)]
    assert len(directions) == 2 and directions[-1] == "rollback", directions
    assert native(url) == rolled
    assert events(release, "release.rollback") == 1


def test_tasks__audit_events_name_the_task_process(staging_release, django_capture_on_commit_callbacks):
    release, _, admin = staging_release
    with django_capture_on_commit_callbacks(execute=True):
        services.release_promote(release=release, user=admin)
    event = AuditEvent.objects.get(release=release, event="release.promoted")
    assert event.request_id.startswith(f"celery:{os.getpid()}:"), "eager: the task ran in this process"


def test_reconcile__worker_died_after_the_target_committed__settled_promoted(staging_release):
    release, url, admin = staging_release
    services.begin(release, status_from=ReleaseStatus.PREPARED, status_to=ReleaseStatus.PROMOTING)
    with engine.open_target(url) as target:
        engine.apply(
            target,
            release_pk=release.pk,
            release_id=release.release_id,
            bundle_sha256=release.bundle_sha256,
            changes=services.recorded_changes(release),
            expected_native_before=release.native_fingerprint_before,
            expected_fingerprint_after=release.fingerprint_after,
        )
    # The worker is gone: its lease runs out.
    Environment.objects.filter(pk=release.to_environment_id).update(
        lock_expires_at=timezone.now() - timedelta(seconds=1)
    )
    services.release_reconcile(environment=Environment.objects.get(pk=release.to_environment_id))
    release.refresh_from_db()
    assert release.status == ReleaseStatus.PROMOTED, (release.error_code, release.error_message)
    assert len(history_rows(url, release)) == 1
