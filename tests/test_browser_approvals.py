"""The e-mailed approval link in a real browser: Chromium opens the mailed URL and clicks the button.

Django's test client sends no Origin or Referer header, so it cannot see what a browser's CSRF
headers do to the page's POST. Chromium does: with `Referrer-Policy: no-referrer` it posted the
form with `Origin: null` and Django answered 403 "Origin checking failed - null". These tests
click Approve and Reject on links taken from the mail the real notification sent (locmem backend),
and check that CSRF protection is still on for a form posted from another site.
Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model

from releases import services
from releases.models import Approval, AuditEvent, Release, ReleaseStatus
from tenants.services import tenant_setup
from tests.conftest import ARTIFACTS
from tests.test_approvals_links import ADD_NOTES, create_accounts

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def acme(sqlite_database_factory, settings, live_server):
    settings.SITE_URL = live_server.url
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    create_accounts(urls["dev"])
    create_accounts(
        urls["staging"],
        "ALTER TABLE accounts ADD COLUMN notes text",
        "ALTER TABLE accounts ADD COLUMN plan varchar(20) NOT NULL DEFAULT 'free'",
    )
    create_accounts(urls["prod"])
    tenant = tenant_setup(slug="acme", environments=urls, admins=["acme-admin"], approvers=["alice", "bob"])
    for user in get_user_model().objects.all():
        user.email = f"{user.username}@example.com"
        user.save(update_fields=["email"])
    return {"tenant": tenant, "admin": get_user_model().objects.get(username="acme-admin")}


def prepare_and_mail(acme: dict, mailoutbox, live_server) -> tuple[Release, dict[str, str]]:
    """Prepare staging -> prod; return each approver's URL from the mails the notification sent.

    The test's transactions commit, so the prepare's on-commit notification has already run
    (eagerly, no worker here) by the time release_prepare returns.
    """
    mailoutbox.clear()
    release = services.release_prepare(
        tenant=acme["tenant"], user=acme["admin"], from_env="staging", to_env="prod", bundle_data=ADD_NOTES
    )
    assert release.status == ReleaseStatus.PREPARED, release.error_message
    link = re.compile(re.escape(live_server.url) + r"/approvals/\d+/[^/\s\"<>]+/")
    urls = {}
    for message in mailoutbox:
        [address] = message.to
        urls[address.split("@")[0]] = link.search(message.body).group(0)
    assert set(urls) == {"alice", "bob"}
    return release, urls


def click_decision(page, url: str, button: str, comment: str, shot: str) -> dict[str, str]:
    """Open the mailed URL, type a comment, click the button; return the POST's request headers."""
    page.goto(url)
    page.fill("#comment", comment)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"approval-link-{shot}-page.png"), full_page=True)
    with page.expect_request(lambda request: request.method == "POST") as posted:
        with page.expect_navigation():
            page.click(f"button.{button}")
    page.screenshot(path=str(ARTIFACTS / f"approval-link-{shot}-decided.png"), full_page=True)
    return posted.value.all_headers()


def test_approval_link_in_chromium__approve_then_reject_another_release__both_recorded(
    chromium, live_server, acme, mailoutbox
):
    page = chromium.new_context().new_page()
    first, first_urls = prepare_and_mail(acme, mailoutbox, live_server)

    headers = click_decision(page, first_urls["alice"], "approve", "looks right", "approve")
    # What broke the channel: a real browser sends an Origin, and it must be the page's own.
    assert headers.get("origin") == live_server.url, headers
    assert "CSRF" not in page.content()
    assert page.locator("h1").inner_text() == f"Release {first.release_id} approved"
    approval = Approval.objects.get(release=first)
    assert (approval.approver.username, approval.decision, approval.via, approval.comment) == (
        "alice",
        "approved",
        "email",
        "looks right",
    )
    assert AuditEvent.objects.filter(release=first, event="release.approved").count() == 1

    second, second_urls = prepare_and_mail(acme, mailoutbox, live_server)
    assert second.pk != first.pk
    click_decision(page, second_urls["bob"], "reject", "not tonight", "reject")
    assert page.locator("h1").inner_text() == f"Release {second.release_id} rejected"
    rejection = Approval.objects.get(release=second)
    assert (rejection.approver.username, rejection.decision, rejection.via) == ("bob", "rejected", "email")

    # The used link now shows a refusal page, in the browser too, and decides nothing more.
    page.goto(second_urls["bob"])
    assert page.locator("form").count() == 0
    assert Approval.objects.filter(release=second).count() == 1


def test_approval_link_in_chromium__form_posted_from_another_site__refused_by_csrf(
    chromium, live_server, acme, mailoutbox
):
    release, urls = prepare_and_mail(acme, mailoutbox, live_server)
    context = chromium.new_context()
    page = context.new_page()
    # The approver has the real page open (it set the CSRF cookie) when another site posts to the link.
    page.goto(urls["alice"])
    token = page.locator("input[name=csrfmiddlewaretoken]").get_attribute("value")
    evil = (
        f'<form id="f" method="post" action="{urls["alice"]}">'
        f'<input name="csrfmiddlewaretoken" value="{token}">'
        '<input name="decision" value="approved"></form>'
        '<script>document.getElementById("f").submit()</script>'
    )
    context.route(
        "http://evil.example/**", lambda route: route.fulfill(status=200, content_type="text/html", body=evil)
    )
    with page.expect_response(lambda response: response.request.method == "POST") as posted:
        page.goto("http://evil.example/page")
    response = posted.value
    assert response.request.all_headers().get("origin") == "http://evil.example"
    assert response.status == 403
    assert "CSRF" in response.text()
    assert not Approval.objects.filter(release=release).exists()
    assert not AuditEvent.objects.filter(release=release, event="release.approved").exists()
