"""The admin in a real browser: Debian's chromium driven by Playwright against pytest-django's live server.

Scenario: log in, open a prepared release, promote it with its button and confirmation, see it
promoted, roll it back the same way, then approve a prod release as an approver. Every admin page
visited is checked for console errors and page errors; screenshots go to test-artifacts/.
"""

from __future__ import annotations

import pytest

from releases import engine
from releases.models import Approval, Release, ReleaseStatus
from releases.services import release_prepare, release_promote
from tenants.models import Role
from tenants.services import membership_set, tenant_setup
from tests.conftest import ARTIFACTS
from tests.factories import PASSWORD, UserFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CREATE_WIDGETS = {
    "database": {
        "changes": [
            {
                "type": "create_table",
                "table": "widgets",
                "columns": [{"name": "label", "type": "string", "max_length": 40, "nullable": False}],
            }
        ]
    },
    "feature_flags": {"widgets": True},
}


def tables_of(url: str) -> set[str]:
    with engine.open_target(url) as target:
        return set(engine.introspect(target)["tables"])


class AdminBrowser:
    """One browser page that records console and page errors per admin page visited."""

    def __init__(self, page, base_url: str, name: str) -> None:
        self.page = page
        self.base_url = base_url
        self.name = name
        self.errors: list[str] = []
        self.visited: list[str] = []
        self.shots = 0
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror on {page.url}: {error}"))
        page.on("load", lambda: self.visited.append(page.url))

    def _console(self, message) -> None:
        if message.type == "error":
            self.errors.append(f"console error on {self.page.url}: {message.text}")

    def goto(self, path: str) -> None:
        self.page.goto(self.base_url + path)

    def shot(self, label: str) -> None:
        self.shots += 1
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(
            path=str(ARTIFACTS / f"admin-{self.name}-{self.shots:02d}-{label}.png"), full_page=True
        )

    def login(self, username: str) -> None:
        self.goto("/admin/login/?next=/admin/")
        self.page.fill("#id_username", username)
        self.page.fill("#id_password", PASSWORD)
        self.page.click("input[type=submit]")
        self.page.wait_for_selector("#user-tools")

    def messages(self) -> str:
        return self.page.inner_text("ul.messagelist") if self.page.locator("ul.messagelist").count() else ""


@pytest.fixture
def demo(sqlite_database_factory):
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="acme", environments=urls)
    users = {}
    for role in (Role.ADMIN, Role.APPROVER):
        users[role] = UserFactory(username=f"acme-{role}")
        membership_set(tenant=tenant, user=users[role], role=role)
    return {"tenant": tenant, "urls": urls, **users}


def open_browser(chromium, live_server, name: str) -> AdminBrowser:
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    return AdminBrowser(context.new_page(), live_server.url, name)


def test_admin_in_browser__promote_rollback_and_approve__states_follow_no_js_errors(
    chromium, live_server, demo
):
    release = release_prepare(
        tenant=demo["tenant"],
        user=demo[Role.ADMIN],
        from_env="dev",
        to_env="staging",
        bundle_data=CREATE_WIDGETS,
    )
    assert release.status == ReleaseStatus.PREPARED
    staging = demo["urls"]["staging"]

    # An admin logs in, opens the prepared release and promotes it through the confirmation page.
    admin = open_browser(chromium, live_server, "admin")
    admin.login("acme-admin")
    admin.shot("index")
    assert admin.page.locator("#rm-pipeline-link").count() == 1
    admin.goto("/admin/releases/release/")
    admin.page.click(f"text={release.release_id}")
    admin.page.wait_for_selector("#rm-button-promote")
    assert admin.page.inner_text(".field-status_badge .readonly").strip().lower() == "prepared"
    assert "CREATE TABLE" in admin.page.inner_text(".inline-group")
    admin.shot("release-prepared")

    admin.page.click("#rm-button-promote")
    admin.page.wait_for_selector("#rm-confirm-submit")
    assert admin.page.inner_text("#rm-target-env") == "staging"
    assert "widgets" in admin.page.inner_text(".rm-confirm-item")
    admin.shot("promote-confirmation")
    admin.page.click("#rm-confirm-submit")
    admin.page.wait_for_selector("ul.messagelist")
    assert "was promoted to staging" in admin.messages()
    assert admin.page.inner_text(".field-status_badge .readonly").strip().lower() == "promoted"
    assert admin.page.locator("#rm-button-rollback").count() == 1
    assert admin.page.locator("#rm-button-promote").count() == 0
    admin.shot("release-promoted")
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.PROMOTED
    assert "widgets" in tables_of(staging)

    # ... and rolls it back the same way.
    admin.page.click("#rm-button-rollback")
    admin.page.wait_for_selector("#rm-confirm-submit")
    assert "Rollback SQL" in admin.page.inner_text(".rm-confirm-item")
    admin.shot("rollback-confirmation")
    admin.page.click("#rm-confirm-submit")
    admin.page.wait_for_selector("ul.messagelist")
    assert "was rolled back on staging" in admin.messages()
    assert admin.page.inner_text(".field-status_badge .readonly").strip().lower() == "rolled back"
    admin.shot("release-rolled-back")
    assert Release.objects.get(pk=release.pk).status == ReleaseStatus.ROLLED_BACK
    assert "widgets" not in tables_of(staging)

    # A prod release waits for an approver.
    again = release_prepare(
        tenant=demo["tenant"],
        user=demo[Role.ADMIN],
        from_env="dev",
        to_env="staging",
        bundle_data=CREATE_WIDGETS,
    )
    release_promote(release=again, user=demo[Role.ADMIN])
    prod_release = release_prepare(
        tenant=demo["tenant"], user=demo[Role.ADMIN], from_env="staging", to_env="prod"
    )
    assert prod_release.status == ReleaseStatus.PREPARED

    admin.goto("/admin/releases/release/pipeline/acme/")
    admin.page.wait_for_selector("#rm-pipeline")
    assert "approvals missing: 0/1" in admin.page.inner_text("#rm-stage-prod")
    assert again.release_id in admin.page.inner_text("#rm-stage-staging")
    admin.shot("pipeline")

    approver = open_browser(chromium, live_server, "approver")
    approver.login("acme-approver")
    approver.goto(f"/admin/releases/release/{prod_release.pk}/change/")
    approver.page.wait_for_selector("#rm-button-approve")
    assert approver.page.locator("#rm-button-promote").count() == 0, "approvers do not promote"
    approver.shot("prod-release")
    approver.page.click("#rm-button-approve")
    approver.page.wait_for_selector("#rm-confirm-submit")
    assert approver.page.inner_text("#rm-target-env") == "prod"
    approver.page.fill("#rm-comment", "checked the SQL")
    approver.shot("approve-confirmation")
    approver.page.click("#rm-confirm-submit")
    approver.page.wait_for_selector("ul.messagelist")
    assert f"approved {prod_release.release_id}" in approver.messages()
    approver.shot("prod-release-approved")
    approval = Approval.objects.get(release=prod_release)
    assert (approval.approver.username, approval.decision, approval.via, approval.comment) == (
        "acme-approver",
        "approved",
        "admin",
        "checked the SQL",
    )

    for browser in (admin, approver):
        assert browser.visited, "pages were visited"
        assert all("/admin/" in url for url in browser.visited)
        assert browser.errors == []

    # The collector itself works: an error raised on an admin page is caught.
    admin.page.evaluate("console.error('canary'); setTimeout(() => { throw new Error('canary thrown'); }, 0)")
    admin.page.wait_for_timeout(200)
    assert any("canary" in error for error in admin.errors)
    assert any("canary thrown" in error for error in admin.errors)


def test_admin_in_browser__every_admin_page_as_superuser__no_console_or_page_errors(
    chromium, live_server, demo
):
    release = release_prepare(
        tenant=demo["tenant"],
        user=demo[Role.ADMIN],
        from_env="dev",
        to_env="staging",
        bundle_data=CREATE_WIDGETS,
    )
    UserFactory(username="root", is_superuser=True)
    browser = open_browser(chromium, live_server, "tour")
    browser.login("root")

    # Every changelist and add page linked from the index, then the first object of each changelist.
    links = browser.page.eval_on_selector_all(
        "#content-main a[href^='/admin/']", "anchors => anchors.map(a => a.getAttribute('href'))"
    )
    changelists = sorted({link for link in links if link.count("/") == 4 and not link.endswith("/add/")})
    pages = sorted(set(links))
    assert "/admin/releases/release/" in changelists and "/admin/tenants/tenant/" in changelists
    for path in pages:
        browser.goto(path)
        assert browser.page.locator("#content").count() == 1, path
    inline_rows_added = 0
    for path in changelists:
        browser.goto(path)
        first = browser.page.locator("#result_list tbody tr th a, #result_list tbody tr td a").first
        if first.count():
            first.click()
            browser.page.wait_for_selector("#content")
            for add_row in browser.page.locator(".add-row a").all():
                if add_row.is_visible():
                    add_row.click()  # inline "Add another ..." runs the admin's inline JavaScript
                    inline_rows_added += 1
    assert inline_rows_added >= 3, "tenant (environments, memberships) and environment (flags) inlines"
    browser.shot("inlines-added")

    # The changelist action with its confirmation step, driven through the admin's actions JavaScript.
    browser.goto("/admin/releases/release/")
    browser.page.check(f"input.action-select[value='{release.pk}']")
    browser.page.select_option("select[name=action]", "approve_selected")
    browser.page.click("button[name=index]")
    browser.page.wait_for_selector("#rm-confirm-submit")
    assert release.release_id in browser.page.inner_text("#content-main")
    browser.shot("action-confirmation")
    browser.page.click("#rm-confirm-submit")
    browser.page.wait_for_selector("ul.messagelist")
    assert f"approved {release.release_id}" in browser.messages()

    for path in (
        "/admin/releases/release/pipeline/",
        "/admin/releases/release/pipeline/acme/",
        f"/admin/releases/release/{release.pk}/auditlog/",
        f"/admin/releases/release/{release.pk}/promote/",
        f"/admin/releases/release/{release.pk}/reject/",
    ):
        browser.goto(path)
        assert browser.page.locator("#content").count() == 1, path
    browser.shot("last-page")

    assert len(browser.visited) >= 20, browser.visited
    assert browser.errors == []
