"""The tool kernel: registry validation, roles, transcripts for every call, redaction, run_tool."""

from __future__ import annotations

import time

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from hypothesis import given, settings
from hypothesis import strategies as st
from rest_framework import serializers

from tenants.models import Role
from tenants.services import membership_set, user_ensure
from tools.ids import new_transcript_id, new_ulid
from tools.kernel import ToolCall, ToolContext, ToolKernel, run_tool, tool_kernel
from tools.models import ToolTranscript
from tools.redaction import redact
from tools.registry import Tool, ToolRegistry, registry
from tools.selectors import transcript_ids_for_release

from .test_tools_support import make_tenant

pytestmark = pytest.mark.django_db

EMAIL_ARGS = {"template": "release_notification", "to": "ops@example.com", "payload": {"release_id": "rel_1"}}
VALID_ARGS = {
    "email.send": EMAIL_ARGS,
    "queue.enqueue": {"queue": "default", "job": "post_deployment_task", "payload": {"release_id": "rel_x"}},
    "db.migrate": {"op": "drop_table", "table": "t"},
}


@pytest.fixture
def setup(sqlite_database_factory):
    return make_tenant("acme", sqlite_database_factory)


@pytest.fixture
def other(sqlite_database_factory):
    return make_tenant("globex", sqlite_database_factory)


def only_transcript() -> ToolTranscript:
    assert ToolTranscript.objects.count() == 1
    return ToolTranscript.objects.get()


# --- ids ------------------------------------------------------------------------------------


def test_transcript_id__many_generated__unique_sortable_in_creation_order():
    ids = [new_transcript_id() for _ in range(2000)]
    assert len(set(ids)) == 2000
    assert ids == sorted(ids)
    assert all(i.startswith("tr_") and len(i) == 29 for i in ids)


def test_ulid__timestamp_prefix__encodes_current_milliseconds():
    import time

    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    before = time.time_ns() // 1_000_000
    value = new_ulid()
    after = time.time_ns() // 1_000_000
    decoded = 0
    for char in value[:10]:
        decoded = decoded * 32 + alphabet.index(char)
    assert before <= decoded <= after + 1


# --- registry and validation ------------------------------------------------------------------


def test_registry__builtin_tools__declare_schema_mutation_and_admin_role():
    assert registry.names() == ["db.migrate", "email.send", "queue.enqueue"]
    for name in registry.names():
        tool = registry.get(name)
        assert tool.mutates is True
        assert tool.min_role == Role.ADMIN
        assert issubclass(tool.serializer_class, serializers.Serializer)


def test_execute__unknown_tool__validation_error_and_transcript(setup):
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="shell.exec", args={"cmd": "ls"}), ToolContext(setup.tenant)
    )
    assert result.ok is False
    assert result.error_code == "validation_error"
    assert "shell.exec" in result.error and "email.send" in result.error
    transcript = only_transcript()
    assert transcript.transcript_id == result.transcript_id
    assert (transcript.tool, transcript.call_id, transcript.ok) == ("shell.exec", "c1", False)
    assert transcript.error == result.error


def test_execute__args_not_an_object__validation_error_naming_args(setup):
    result = tool_kernel.execute(ToolCall(id="c1", tool="email.send", args=["x"]), ToolContext(setup.tenant))
    assert result.ok is False
    assert result.details == {"args": ["args must be a JSON object."]}
    assert only_transcript().args == {"_invalid": ["x"]}


def test_execute__missing_required_argument__error_names_the_field(setup):
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="email.send", args={"template": "release_notification"}),
        ToolContext(setup.tenant),
    )
    assert result.ok is False
    assert result.error_code == "validation_error"
    assert set(result.details) == {"to"}
    assert "to: This field is required." in result.error
    transcript = only_transcript()
    assert transcript.ok is False
    assert transcript.result == {"details": {"to": ["This field is required."]}}


def test_execute__unknown_argument__error_names_it(setup):
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="email.send", args={**EMAIL_ARGS, "bcc": "spy@example.com"}),
        ToolContext(setup.tenant),
    )
    assert result.ok is False
    assert list(result.details) == ["bcc"]
    assert "Unknown argument" in result.details["bcc"][0]
    assert mail.outbox == []


def test_execute__nested_invalid_value__error_path_names_the_nested_field(setup):
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="db.migrate", args={"op": "create_table", "table": "t", "columns": ["x"]}),
        ToolContext(setup.tenant, environment=setup.environment()),
    )
    assert result.ok is False
    assert "columns[0]" in result.details


def test_execute__invalid_choice__error_names_op(setup):
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="db.migrate", args={"op": "truncate", "table": "t"}),
        ToolContext(setup.tenant, environment=setup.environment()),
    )
    assert result.ok is False
    assert result.details == {"op": ['"truncate" is not a valid choice.']}


# --- roles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["db.migrate", "queue.enqueue", "email.send"])
@pytest.mark.parametrize("role_user", ["viewer", "approver"])
def test_execute__mutating_tool_below_admin__refused_and_transcribed(setup, tool, role_user):
    user = getattr(setup, role_user)
    result = tool_kernel.execute(
        ToolCall(id="c1", tool=tool, args=VALID_ARGS[tool]),
        ToolContext(setup.tenant, environment=setup.environment(), user=user),
    )
    assert result.ok is False
    assert result.error_code == "forbidden"
    assert f"needs the admin role; {user.username} is {role_user}" in result.error
    transcript = only_transcript()
    assert (transcript.ok, transcript.error_code, transcript.user_id) == (False, "forbidden", user.pk)
    assert mail.outbox == []


def test_execute__user_without_membership__refused(setup, other):
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="email.send", args=EMAIL_ARGS), ToolContext(setup.tenant, user=other.admin)
    )
    assert result.ok is False
    assert result.error_code == "forbidden"
    assert "not a member of tenant acme" in result.error
    assert mail.outbox == []


def test_execute__admin__allowed(setup):
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="email.send", args=EMAIL_ARGS), ToolContext(setup.tenant, user=setup.admin)
    )
    assert result.ok is True, result.error
    assert only_transcript().user_id == setup.admin.pk


def test_execute__superuser_without_membership__allowed(setup):
    root = get_user_model().objects.create_superuser("root", "root@example.com", "pw-unused-123")
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="email.send", args=EMAIL_ARGS), ToolContext(setup.tenant, user=root)
    )
    assert result.ok is True, result.error


def test_execute__inactive_admin__refused(setup):
    setup.admin.is_active = False
    setup.admin.save()
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="email.send", args=EMAIL_ARGS), ToolContext(setup.tenant, user=setup.admin)
    )
    assert (result.ok, result.error_code) == (False, "forbidden")


def test_execute__environment_of_another_tenant__refused_and_not_linked(setup, other):
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="email.send", args=EMAIL_ARGS),
        ToolContext(setup.tenant, environment=other.environment(), user=setup.admin),
    )
    assert (result.ok, result.error_code) == (False, "forbidden")
    transcript = only_transcript()
    assert transcript.tenant_id == setup.tenant.pk
    assert transcript.environment_id is None


def test_execute__role_promoted_to_admin__allowed_afterwards(setup):
    call = ToolCall(id="c1", tool="email.send", args=EMAIL_ARGS)
    assert tool_kernel.execute(call, ToolContext(setup.tenant, user=setup.viewer)).ok is False
    membership_set(tenant=setup.tenant, user=setup.viewer, role=Role.ADMIN)
    assert tool_kernel.execute(call, ToolContext(setup.tenant, user=setup.viewer)).ok is True


# --- handler failures, scrubbing, redaction ----------------------------------------------------------


class _NoArgs(serializers.Serializer):
    dry_run = serializers.BooleanField(required=False)


def _failing_handler(args, ctx, *, call, dry_run):
    raise RuntimeError(
        "could not connect to postgres://deploy:hunter2secret@db.internal.example:5432/prod: password "
        'authentication failed for user "deploy"'
    )


def _kernel_with(tool: Tool) -> ToolKernel:
    tools = ToolRegistry(builtin=False)
    tools.register(tool)
    return ToolKernel(tools)


def test_execute__handler_raises__error_scrubbed_no_traceback_transcribed(setup):
    kernel = _kernel_with(
        Tool("test.fail", "fails", _NoArgs, _failing_handler, mutates=False, min_role=Role.VIEWER)
    )
    result = kernel.execute(
        ToolCall(id="c1", tool="test.fail", args={}), ToolContext(setup.tenant, user=setup.viewer)
    )
    assert result.ok is False
    assert result.error_code == "tool_error"
    assert result.error.startswith("RuntimeError: could not connect to postgres://")
    transcript = only_transcript()
    for text in (result.error, transcript.error, str(transcript.result)):
        assert "hunter2secret" not in text
        assert "db.internal.example" not in text
        assert '"deploy"' not in text
        assert "Traceback" not in text
    assert transcript.result is None


def test_execute__handler_raises_with_environment_host__host_scrubbed(setup):
    environment = setup.environment()
    environment.database_url = "postgres://app:Sup3rS3cret@pg-prod-7.corp.example:5432/app"
    environment.save()

    def leaky(args, ctx, *, call, dry_run):
        raise ValueError("timeout talking to pg-prod-7.corp.example (Sup3rS3cret)")

    kernel = _kernel_with(Tool("test.leak", "leaks", _NoArgs, leaky, mutates=False, min_role=Role.VIEWER))
    result = kernel.execute(
        ToolCall(id="c1", tool="test.leak", args={}), ToolContext(setup.tenant, environment)
    )
    assert result.ok is False
    assert "pg-prod-7.corp.example" not in result.error
    assert "Sup3rS3cret" not in result.error
    assert "pg-prod-7" not in only_transcript().error


def test_execute__secrets_in_args__redacted_in_transcript(setup):
    payload = {
        "release_id": "rel_1",
        "approve_url": "https://rm.example/approve/nonce-abc",
        "database_url": "postgres://u:pw@h/db",
        "token": "rm_secret_token",
        "nested": {"Password": "x1", "items": ["plain", "see mysql://root:toor@10.0.0.9/x"]},
    }
    result = tool_kernel.execute(
        ToolCall(id="c1", tool="email.send", args={**EMAIL_ARGS, "payload": payload, "dry_run": True}),
        ToolContext(setup.tenant),
    )
    assert result.ok is True, result.error
    stored = only_transcript().args
    assert stored["payload"]["approve_url"] == "***"
    assert stored["payload"]["database_url"] == "***"
    assert stored["payload"]["token"] == "***"
    assert stored["payload"]["nested"]["Password"] == "***"
    assert stored["payload"]["nested"]["items"][0] == "plain"
    assert "toor" not in stored["payload"]["nested"]["items"][1]
    assert stored["payload"]["release_id"] == "rel_1"
    for secret in ("nonce-abc", "u:pw@", "rm_secret_token", "x1", "toor"):
        assert secret not in str(ToolTranscript.objects.values().get())


def test_redact__keys_and_values__secrets_replaced_rest_kept():
    assert redact({"to": "a@b.c", "status": "ok", "apiKey": "k", "access_token": "t", "n": 3}) == {
        "to": "a@b.c",
        "status": "ok",
        "apiKey": "***",
        "access_token": "***",
        "n": 3,
    }
    (scrubbed,) = redact(["postgres://user:pw@dbhost:5432/db"])
    assert scrubbed.startswith("postgres://***")
    assert "user" not in scrubbed and "pw" not in scrubbed and "dbhost" not in scrubbed


@pytest.mark.parametrize("filler", ["y", "a.", "1a"])
def test_redact__long_words_before_a_url__linear_time(filler):
    # Found by fuzzing /api/tools/execute: the URL pattern retried from every letter of a long word
    # (quadratic, holding the GIL): a 500 kB argument froze the server. 20 kB took 1.2-2.4 s; now ~1 ms.
    value = filler * (20_000 // len(filler)) + " postgres://user:pw@dbhost/db"
    started = time.perf_counter()
    (scrubbed,) = redact([value])
    assert time.perf_counter() - started < 0.5
    assert scrubbed.endswith(" postgres://***/db") and "pw" not in scrubbed


def test_execute__successful_call__transcript_has_timing_dry_run_and_result(setup):
    result = tool_kernel.execute(
        ToolCall(id="mail_1", tool="email.send", args=EMAIL_ARGS), ToolContext(setup.tenant, user=setup.admin)
    )
    transcript = only_transcript()
    assert transcript.ok is True
    assert transcript.dry_run is True  # ToolContext's default
    assert transcript.duration_ms > 0
    assert transcript.call_id == "mail_1"
    assert transcript.result["subject"] == result.data["subject"]
    assert transcript.error == "" and transcript.error_code == ""


def test_execute__args_dry_run_false__overrides_context_default(setup):
    args = {**EMAIL_ARGS, "dry_run": False}
    result = tool_kernel.execute(ToolCall(id="m", tool="email.send", args=args), ToolContext(setup.tenant))
    assert result.ok is True, result.error
    assert len(mail.outbox) == 1
    assert only_transcript().dry_run is False


def test_execute__empty_call_id__generated(setup):
    result = tool_kernel.execute(
        ToolCall(id="", tool="email.send", args=EMAIL_ARGS), ToolContext(setup.tenant)
    )
    assert only_transcript().call_id.startswith("call_")
    assert result.ok is True


# --- run_tool for the release services -------------------------------------------------------------


def _release(setup):
    from releases.models import Release

    return Release.objects.create(
        tenant=setup.tenant,
        release_id="rel_20260101_0000",
        from_environment=setup.environment("dev"),
        to_environment=setup.environment("staging"),
        bundle={"database": {"changes": []}, "feature_flags": {}},
        bundle_sha256="0" * 64,
    )


def test_run_tool__calls_for_a_release__transcript_ids_listed_in_call_order(setup):
    release = _release(setup)
    made = []
    for index in range(5):
        result = run_tool(
            "email.send",
            {"template": "release_notification", "to": ["a@example.com"], "payload": {"n": index}},
            tenant=setup.tenant,
            release=release,
        )
        assert result.ok, result.error
        made.append(result.transcript_id)
    failed = run_tool("queue.enqueue", {"job": "nope"}, tenant=setup.tenant, release=release)
    made.append(failed.transcript_id)
    run_tool("email.send", EMAIL_ARGS, tenant=setup.tenant, dry_run=True)  # another call, no release
    assert transcript_ids_for_release(release) == made
    assert len(mail.outbox) == 5  # run_tool is not a dry run by default
    transcript = ToolTranscript.objects.get(transcript_id=made[0])
    assert transcript.environment_id == release.to_environment_id  # defaulted from the release
    assert transcript.call_id.startswith("call_")


def test_run_tool__release_of_another_tenant__refused(setup, other):
    release = _release(other)
    result = run_tool("email.send", EMAIL_ARGS, tenant=setup.tenant, release=release)
    assert (result.ok, result.error_code) == (False, "forbidden")
    assert only_transcript().release_id is None
    assert mail.outbox == []


def test_run_tool__system_caller_without_user__allowed(setup):
    user_ensure(username="nobody")
    result = run_tool("email.send", EMAIL_ARGS, tenant=setup.tenant, dry_run=True)
    assert result.ok is True
    assert only_transcript().user_id is None


# --- redaction, property-based -------------------------------------------------------------------

_SECRET_KEYS = ["password", "DATABASE_URL", "approve_url", "apiKey", "refresh_token", "client_secret", "dsn"]
_PLAIN_KEYS = ["to", "status", "release_id", "table", "columns", "payload", "note", "count"]


@st.composite
def _documents(draw, depth=0):
    """Nested objects whose secret-keyed values (and credentials in URLs) carry a SECRET marker."""
    items = {}
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            key = draw(st.sampled_from(_SECRET_KEYS))
            items[key] = draw(
                st.one_of(
                    st.just("SECRET-plain"),
                    st.just({"nested": "SECRET-in-object"}),
                    st.just(["SECRET-in-list"]),
                )
            )
        else:
            key = draw(st.sampled_from(_PLAIN_KEYS))
            if depth < 3 and draw(st.booleans()):
                items[key] = draw(_documents(depth=depth + 1))
            else:
                items[key] = draw(
                    st.one_of(
                        st.integers(),
                        st.text(alphabet="abc xyz", max_size=10),
                        st.just("postgres://SECRETuser:SECRETpw@SECRET-host.example:5432/db"),
                        st.lists(st.just("see mysql://SECRETu:SECRETp@SECRET-h/x"), max_size=2),
                    )
                )
    return items


@settings(max_examples=200, deadline=None)
@given(_documents())
def test_redact__any_document__no_secret_marker_survives(document):
    import json

    assert "SECRET" not in json.dumps(redact(document))
