"""Structured logs: one JSON line per event through the configured console handler, secrets scrubbed."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from releasemgr.logging import JsonFormatter, RequestContextFilter, SecretScrubFilter, scrub_secrets
from tenants.services import tenant_setup, token_issue

SECRETS = [
    "s3cr3t-pass",
    "rm_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "eyJhbGciOiJIUzI1NiJ9.payload.signature",
    "gAAAAABlZ3Vlc3MtdGhpcy1pcy1hLWZlcm5ldC10b2tlbi1jaXBoZXJ0ZXh0",
]


@pytest.fixture
def console_lines() -> Iterator[io.StringIO]:
    """The stream of the console handler configured in settings.LOGGING (JSON), for one test."""
    handlers = [
        handler for handler in logging.getLogger().handlers if isinstance(handler.formatter, JsonFormatter)
    ]
    assert len(handlers) == 1, "settings.LOGGING must put one JSON console handler on the root logger"
    [handler] = handlers
    stream = io.StringIO()
    previous = handler.setStream(stream)
    try:
        yield stream
    finally:
        handler.setStream(previous)


def parsed(stream: io.StringIO) -> list[dict]:
    lines = stream.getvalue().splitlines()
    assert lines, "nothing was logged"
    return [json.loads(line) for line in lines]  # every line is one JSON object


def test_logging__settings__console_handler_has_context_and_scrub_filters():
    [handler] = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    kinds = {type(item) for item in handler.filters}
    assert {RequestContextFilter, SecretScrubFilter} <= kinds


def test_logging__extra_fields__one_json_line_with_context(console_lines):
    logging.getLogger("releases.services").info(
        "release %s promoted",
        "rel_20250101_1200",
        extra={"release_id": "rel_20250101_1200", "tenant": "primary", "environment": "prod"},
    )

    [entry] = parsed(console_lines)
    assert entry["message"] == "release rel_20250101_1200 promoted"
    assert entry["level"] == "INFO" and entry["logger"] == "releases.services"
    assert (entry["release_id"], entry["tenant"], entry["environment"]) == (
        "rel_20250101_1200",
        "primary",
        "prod",
    )
    assert entry["time"].endswith("Z") and "T" in entry["time"]


def test_logging__secrets_in_message_args_extras_and_traceback__scrubbed(console_lines):
    password, raw_token, jwt, ciphertext = SECRETS
    logger = logging.getLogger("releasemgr.test")
    logger.warning("cannot reach %s", f"postgres://deploy:{password}@db.internal:5432/app")
    logger.info("request headers %s", {"Authorization": f"Bearer {jwt}"}, extra={"token": raw_token})
    logger.info("stored %s; dsn host=db user=deploy password=%s", ciphertext, password)
    try:
        raise RuntimeError(f"connect failed for mysql://root:{password}@10.0.0.1/x with Bearer {raw_token}")
    except RuntimeError:
        logger.exception("apply failed")

    entries = parsed(console_lines)
    assert len(entries) == 4
    output = console_lines.getvalue()
    for secret in SECRETS:
        assert secret not in output
    assert "postgres://***@db.internal:5432/app" in entries[0]["message"]
    assert "password=***" in entries[2]["message"]
    assert "RuntimeError" in entries[3]["exception"] and "Bearer ***" in entries[3]["exception"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("sqlite:///var/control.sqlite3", "sqlite:///var/control.sqlite3"),
        ("Authorization: Token abc123", "Authorization: ***"),
        ("mail approver@example.com", "mail approver@example.com"),
        ("the token is invalid", "the token is invalid"),
        ("DSN=POSTGRES://u:pw@h/db", "DSN=POSTGRES://***@h/db"),
        ("x_postgres://u:pw@h/db", "x_postgres://***@h/db"),  # `\b` missed a scheme after "_"
    ],
)
def test_scrub_secrets__text__credentials_only_removed(text, expected):
    assert scrub_secrets(text) == expected


@pytest.mark.parametrize("filler", ["a.", "a-", "y"])
def test_scrub_secrets__long_words_before_a_url__linear_time(filler):
    # The URL pattern retried from every letter of a long run of scheme characters (quadratic, and re
    # holds the GIL): 60 kB of "a." took ~1.7 s in every log line carrying it; now ~25 ms.
    text = filler * (60_000 // len(filler)) + " postgres://user:pw@dbhost/db"
    started = time.perf_counter()
    scrubbed = scrub_secrets(text)
    assert time.perf_counter() - started < 0.5
    assert scrubbed.endswith(" postgres://***@dbhost/db")


@pytest.mark.django_db
def test_logging__django_request_warning__json_with_request_id(console_lines):
    Client().get("/no-such-page", HTTP_X_REQUEST_ID="req-logging-404")

    entries = parsed(console_lines)
    [not_found] = [entry for entry in entries if entry["logger"] == "django.request"]
    assert not_found["level"] == "WARNING" and "/no-such-page" in not_found["message"]
    assert not_found["request_id"] == "req-logging-404"


@pytest.mark.django_db(transaction=True)
def test_logging__release_prepare_and_promote__lines_name_release_tenant_and_request(
    console_lines, sqlite_database_factory
):
    slug = f"log{uuid.uuid4().hex[:8]}"
    tenant = tenant_setup(
        slug=slug,
        environments={stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")},
        admins=[f"{slug}-admin"],
    )
    _, token = token_issue(tenant=tenant, user=get_user_model().objects.get(username=f"{slug}-admin"))
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_X_TENANT_SLUG=slug)
    bundle = {"database": {"changes": []}, "feature_flags": {"beta": True}}

    prepared = api.post(
        "/api/releases/prepare",
        {"from_env": "dev", "to_env": "staging", "bundle_data": bundle},
        format="json",
        HTTP_X_REQUEST_ID="req-prepare-1",
    )
    assert prepared.status_code == 201, prepared.content
    release_id = prepared.json()["data"]["release_id"]
    promoted = api.post(
        "/api/releases/promote", {"release_id": release_id}, format="json", HTTP_X_REQUEST_ID="req-promote-1"
    )
    assert promoted.json()["data"]["status"] == "promoted", promoted.content

    entries = [entry for entry in parsed(console_lines) if entry.get("release_id") == release_id]
    by_phase = {entry["phase"]: entry for entry in entries if entry["logger"] == "releases.services"}
    assert by_phase["prepare"]["message"] == f"release {release_id} prepared"
    assert by_phase["prepare"]["request_id"] == "req-prepare-1"
    assert by_phase["promote"]["message"] == f"release {release_id} promoted"
    # The promotion runs as a Celery task (in-process here), which logs under the task's own id.
    assert by_phase["promote"]["request_id"].startswith("celery:")
    for entry in by_phase.values():
        assert entry["tenant"] == slug and entry["environment"] == "staging"
    assert token not in console_lines.getvalue()


@pytest.mark.django_db
def test_logging__approval_link_requests_django_logs__never_carry_the_link_token(console_lines):
    """A link is a bearer credential: mail scanners HEAD it (405) and a cross-site POST fails CSRF (403);
    Django's own loggers (django.request, django.security.csrf, runserver's django.server) name the path."""
    from releases import links

    token = links.sign({"r": 999999, "u": 1, "b": "0" * 64, "n": "nonce-of-the-test"})
    path = links.approval_link_path(release_pk=999999, token=token)

    assert Client().head(path).status_code == 405
    assert Client(enforce_csrf_checks=True).post(path, {"decision": "approved"}).status_code == 403
    logging.getLogger("django.server").info('"GET %s HTTP/1.1" 200 1234', path)

    entries = parsed(console_lines)
    loggers = {entry["logger"] for entry in entries}
    assert {"django.request", "django.security.csrf", "django.server"} <= loggers
    signature = token.rsplit(":", 1)[1]
    assert signature not in console_lines.getvalue()
    assert any("/approvals/999999/***" in entry["message"] for entry in entries)


def test_scrub_secrets__approval_link_path__token_removed_pk_kept():
    text = 'Forbidden (CSRF cookie not set.): /approvals/42/.eJwNzDsKwkAQ:1xVmlX:jY3lKtYFWT2y_aaZ4rf/ "x"'
    assert scrub_secrets(text) == 'Forbidden (CSRF cookie not set.): /approvals/42/***/ "x"'
