"""The admin for tenants, environments (write-only URL), flags and tokens; auditlog history; the pipeline."""

from __future__ import annotations

import re

import pytest
from auditlog.models import LogEntry
from django.contrib.messages import get_messages
from django.test import Client
from django.urls import reverse

from releases.models import Release, ReleaseStatus
from releases.services import release_prepare, release_promote
from tenants.models import ApiToken, Environment, FeatureFlag, Role
from tenants.services import environment_set, membership_set, tenant_setup
from tests.factories import ReleaseFactory, UserFactory

pytestmark = pytest.mark.django_db

SECRET_URL = "postgres://alice:s3cr3t-pass@db.internal.example:5432/acme_prod"
# libpq takes the password from the query string too (django-environ passes it on in OPTIONS).
SECRET_QUERY_URL = "postgres://db.internal.example/acme_prod?user=alice&password=s3cr3t-pass&sslmode=require"


def login(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def form_data(response) -> dict:
    """The POST a browser would send for an admin change form as rendered (inlines included)."""
    data: dict = {}

    def add(form) -> None:
        for name in form.fields:
            value = form[name].value()
            if isinstance(value, bool):
                if value:
                    data[form.add_prefix(name)] = "on"
            elif value is not None:
                data[form.add_prefix(name)] = value

    add(response.context["adminform"].form)
    for inline in response.context["inline_admin_formsets"]:
        formset = inline.formset
        add(formset.management_form)
        for form in formset.forms:
            add(form)
    return data


@pytest.fixture
def acme(sqlite_database_factory):
    urls = {stage: sqlite_database_factory() for stage in ("dev", "staging", "prod")}
    tenant = tenant_setup(slug="acme", environments=urls)
    users = {}
    for role in (Role.ADMIN, Role.APPROVER, Role.VIEWER):
        users[role] = UserFactory(username=f"acme-{role}")
        membership_set(tenant=tenant, user=users[role], role=role)
    other = tenant_setup(slug="other", environments={stage: sqlite_database_factory() for stage in urls})
    other_admin = UserFactory(username="other-admin")
    membership_set(tenant=other, user=other_admin, role=Role.ADMIN)
    return {"tenant": tenant, "urls": urls, "other": other, "other_admin": other_admin, **users}


# --- environments: write-only database URL ---------------------------------------------------------------


@pytest.mark.parametrize("secret_url", [SECRET_URL, SECRET_QUERY_URL])
@pytest.mark.parametrize("role", [Role.ADMIN, Role.APPROVER, Role.VIEWER])
def test_tenant_page__environment_with_credentials__masked_never_plain_or_ciphertext(acme, role, secret_url):
    """Read-only users too: Django renders a view-only form's fields as text, the URL field included."""
    environment = environment_set(tenant=acme["tenant"], stage="prod", database_url=secret_url)
    client = login(acme[role])

    for url in (
        reverse("admin:tenants_tenant_change", args=[acme["tenant"].pk]),
        reverse("admin:tenants_environment_change", args=[environment.pk]),
        reverse("admin:tenants_environment_changelist"),
    ):
        html = client.get(url).content.decode()
        assert environment.database_url_masked in html, url
        for secret in ("s3cr3t-pass", "alice", "db.internal.example", environment.database_url_encrypted):
            assert secret not in html, (url, secret)


def test_environment_form__url_filled_sets_it_blank_keeps_it__never_in_auditlog(acme):
    environment = Environment.objects.get(tenant=acme["tenant"], stage="prod")
    original = environment.database_url
    client = login(acme[Role.ADMIN])
    url = reverse("admin:tenants_environment_change", args=[environment.pk])

    data = form_data(client.get(url))
    assert data.get("database_url", "") == "", "the URL is never rendered back into the form"
    data["approvals_required"] = 2
    response = client.post(url, data)
    assert response.status_code == 302, re.findall(
        r'<ul class="errorlist.*?</ul>', response.content.decode(), re.S
    )
    environment.refresh_from_db()
    assert environment.database_url == original and environment.approvals_required == 2

    data = form_data(client.get(url))
    data["database_url"] = SECRET_URL
    assert client.post(url, data).status_code == 302
    environment.refresh_from_db()
    assert environment.database_url == SECRET_URL

    for entry in LogEntry.objects.get_for_object(environment):
        assert "database_url_encrypted" not in entry.changes_dict
        assert "s3cr3t" not in str(entry.changes)


def test_environment_form__viewer_posts__403_url_unchanged(acme):
    environment = Environment.objects.get(tenant=acme["tenant"], stage="prod")
    before = environment.database_url_encrypted
    url = reverse("admin:tenants_environment_change", args=[environment.pk])
    data = form_data(login(acme[Role.ADMIN]).get(url))
    data["database_url"] = SECRET_URL

    assert login(acme[Role.VIEWER]).post(url, data).status_code == 403
    environment.refresh_from_db()
    assert environment.database_url_encrypted == before


def test_feature_flags__inline_on_environment__edited_and_added(acme):
    environment = Environment.objects.get(tenant=acme["tenant"], stage="staging")
    FeatureFlag.objects.create(environment=environment, name="dark_mode", value=True)
    client = login(acme[Role.ADMIN])
    url = reverse("admin:tenants_environment_change", args=[environment.pk])
    data = form_data(client.get(url))
    [index] = [k.split("-")[1] for k, v in data.items() if k.endswith("-name") and v == "dark_mode"]
    data[f"flags-{index}-value"] = "false"
    extra = int(data["flags-TOTAL_FORMS"]) - 1
    data[f"flags-{extra}-name"] = "plan"
    data[f"flags-{extra}-value"] = '"gold"'

    response = client.post(url, data)

    assert response.status_code == 302, response.content.decode()[:3000]
    flags = dict(environment.flags.values_list("name", "value"))
    assert flags["dark_mode"] is False and flags["plan"] == "gold"


def test_feature_flags__value_not_bool_or_plan__form_error_nothing_saved(acme):
    environment = Environment.objects.get(tenant=acme["tenant"], stage="staging")
    client = login(acme[Role.ADMIN])
    url = reverse("admin:tenants_environment_change", args=[environment.pk])
    data = form_data(client.get(url))
    extra = int(data["flags-TOTAL_FORMS"]) - 1
    data[f"flags-{extra}-name"] = "bad"
    data[f"flags-{extra}-value"] = "[1, 2]"

    response = client.post(url, data)

    assert response.status_code == 200 and "true, false or a plan name" in response.content.decode()
    assert not environment.flags.filter(name="bad").exists()


# --- API tokens ---------------------------------------------------------------------------------------------


def test_api_token__created_in_admin__raw_shown_once_only_hash_stored_then_prefix(acme):
    client = login(acme[Role.ADMIN])
    response = client.post(
        reverse("admin:tenants_apitoken_add"),
        {"tenant": acme["tenant"].pk, "user": acme[Role.ADMIN].pk, "name": "ci"},
        follow=True,
    )

    assert response.status_code == 200
    [raw] = re.findall(r"rm_[A-Za-z0-9_\-]{20,}", response.content.decode())
    token = ApiToken.objects.get(name="ci")
    assert token.token_hash == ApiToken.hash(raw) and raw not in (token.prefix, token.token_hash)
    assert raw.startswith(token.prefix)
    page = client.get(reverse("admin:tenants_apitoken_change", args=[token.pk])).content.decode()
    assert token.prefix in page and raw not in page and token.token_hash not in page
    tenant_page = client.get(
        reverse("admin:tenants_tenant_change", args=[acme["tenant"].pk])
    ).content.decode()
    assert token.prefix in tenant_page and raw not in tenant_page
    for entry in LogEntry.objects.get_for_object(token):
        assert "token_hash" not in entry.changes_dict and raw not in str(entry.changes)


def test_api_token__tenant_admin_for_another_member__refused_superuser_may(acme):
    """A token acts as its user: a tenant admin holding an approver's token would approve their own
    release as that approver (seen live: promote then passed its approval check)."""
    client = login(acme[Role.ADMIN])
    add = reverse("admin:tenants_apitoken_add")
    assert acme[Role.APPROVER].username not in client.get(add).content.decode()
    response = client.post(add, {"tenant": acme["tenant"].pk, "user": acme[Role.APPROVER].pk, "name": "x"})
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert ApiToken.objects.count() == 0

    superuser = UserFactory(username="root", is_superuser=True)
    response = login(superuser).post(
        add, {"tenant": acme["tenant"].pk, "user": acme[Role.APPROVER].pk, "name": "ops"}
    )
    assert response.status_code == 302
    assert ApiToken.objects.get().user == acme[Role.APPROVER]


def test_api_token__user_not_member_or_other_tenant__refused_no_token(acme):
    client = login(acme[Role.ADMIN])
    stranger = UserFactory(username="stranger")
    response = client.post(
        reverse("admin:tenants_apitoken_add"), {"tenant": acme["tenant"].pk, "user": stranger.pk, "name": "x"}
    )
    # The stranger is not even offered to a tenant admin; posting them anyway is refused.
    assert response.status_code == 200 and "Select a valid choice" in response.content.decode()
    assert ApiToken.objects.count() == 0
    response = client.post(
        reverse("admin:tenants_apitoken_add"),
        {"tenant": acme["other"].pk, "user": acme["other_admin"].pk, "name": "y"},
    )
    assert response.status_code == 200 and ApiToken.objects.count() == 0


def test_user_choices__tenant_admin__only_members_of_their_tenants_listed(acme):
    UserFactory(username="stranger-of-nowhere")
    client = login(acme[Role.ADMIN])
    for name in ("tenants_apitoken_add", "tenants_membership_add"):
        html = client.get(reverse(f"admin:{name}")).content.decode()
        assert acme["other_admin"].username not in html and "stranger-of-nowhere" not in html
        assert acme[Role.ADMIN].username in html


# --- tenant isolation in the tenants admin -----------------------------------------------------------------


def test_tenants_admin__member_of_acme__sees_only_acme_and_cannot_open_other(acme):
    client = login(acme[Role.ADMIN])
    html = client.get(reverse("admin:tenants_tenant_changelist")).content.decode()
    assert ">acme<" in html and ">other<" not in html
    other_env = Environment.objects.get(tenant=acme["other"], stage="prod")
    for url in (
        reverse("admin:tenants_tenant_change", args=[acme["other"].pk]),
        reverse("admin:tenants_environment_change", args=[other_env.pk]),
    ):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"] == reverse("admin:index")
    assert client.get(reverse("admin:tenants_environment_auditlog", args=[other_env.pk])).status_code == 404


# --- auditlog ------------------------------------------------------------------------------------------------


def test_auditlog__history_reachable_from_release_and_environment_pages(acme):
    release = ReleaseFactory(tenant=acme["tenant"])
    environment = Environment.objects.get(tenant=acme["tenant"], stage="dev")
    client = login(acme[Role.VIEWER])
    for change, history in (
        (
            reverse("admin:releases_release_change", args=[release.pk]),
            reverse("admin:releases_release_auditlog", args=[release.pk]),
        ),
        (
            reverse("admin:tenants_environment_change", args=[environment.pk]),
            reverse("admin:tenants_environment_auditlog", args=[environment.pk]),
        ),
    ):
        assert history in client.get(change).content.decode()
        response = client.get(history)
        assert response.status_code == 200 and "create" in response.content.decode().lower()


def test_auditlog_admin__member__sees_only_own_tenants_entries_superuser_all(acme):
    mine = ReleaseFactory(tenant=acme["tenant"])
    theirs = ReleaseFactory(tenant=acme["other"])
    url = reverse("admin:auditlog_logentry_changelist")

    html = login(acme[Role.VIEWER]).get(url).content.decode()
    assert mine.release_id in html and theirs.release_id not in html
    assert ">other<" not in html and "acme" in html
    theirs_entry = LogEntry.objects.get_for_object(theirs).first()
    response = login(acme[Role.VIEWER]).get(reverse("admin:auditlog_logentry_change", args=[theirs_entry.pk]))
    assert response.status_code == 302

    root = UserFactory(username="root", is_superuser=True)
    html = login(root).get(url).content.decode()
    assert mine.release_id in html and theirs.release_id in html


# --- the pipeline view ---------------------------------------------------------------------------------------

ADD_TABLE = {
    "database": {
        "changes": [
            {"type": "create_table", "table": "gadgets", "columns": [{"name": "label", "type": "text"}]}
        ]
    },
    "feature_flags": {"gadgets": True},
}


def test_pipeline__index_links_it__columns_live_fingerprint_waiting_and_flag_differences(acme):
    admin_user = acme[Role.ADMIN]
    staged = release_prepare(
        tenant=acme["tenant"], user=admin_user, from_env="dev", to_env="staging", bundle_data=ADD_TABLE
    )
    release_promote(release=staged, user=admin_user)
    waiting = release_prepare(tenant=acme["tenant"], user=admin_user, from_env="staging", to_env="prod")
    assert waiting.status == ReleaseStatus.PREPARED
    environment_set(
        tenant=acme["tenant"], stage="dev", database_url=acme["urls"]["dev"], flags={"beta": "plan_a"}
    )
    client = login(acme[Role.VIEWER])

    index = client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:releases_release_pipeline_index") in index
    overview = client.get(reverse("admin:releases_release_pipeline_index")).content.decode()
    assert reverse("admin:releases_release_pipeline", args=["acme"]) in overview
    assert reverse("admin:releases_release_pipeline", args=["other"]) not in overview

    response = client.get(reverse("admin:releases_release_pipeline", args=["acme"]))
    html = response.content.decode()
    assert response.status_code == 200
    columns = {column["stage"]: column for column in response.context["columns"]}
    assert list(columns) == ["dev", "staging", "prod"]
    assert columns["staging"]["live"] == Release.objects.get(pk=staged.pk)
    assert staged.release_id in html
    for stage in columns:
        assert re.fullmatch(r"[0-9a-f]{64}", columns[stage]["schema"]["fingerprint"]), stage
    assert columns["staging"]["schema"]["fingerprint"] != columns["prod"]["schema"]["fingerprint"]
    [item] = columns["prod"]["waiting"]
    assert item["release"].pk == waiting.pk and item["missing"]["approvals_required"] == 1
    assert "approvals missing: 0/1" in html
    differences = {(d["left"], d["right"]): d["rows"] for d in response.context["flag_differences"]}
    assert {"name": "beta", "left": '"plan_a"', "right": "(absent)"} in differences[("dev", "staging")]
    assert {"name": "gadgets", "left": "(absent)", "right": "true"} in differences[("dev", "staging")]
    assert {"name": "gadgets", "left": "true", "right": "(absent)"} in differences[("staging", "prod")]


def test_pipeline__target_unreachable__shown_unreachable_page_still_renders(acme):
    environment_set(tenant=acme["tenant"], stage="prod", database_url="postgres://u:pw@127.0.0.1:1/none")
    response = login(acme[Role.VIEWER]).get(reverse("admin:releases_release_pipeline", args=["acme"]))
    assert response.status_code == 200
    columns = {column["stage"]: column for column in response.context["columns"]}
    assert columns["prod"]["schema"]["fingerprint"] == ""
    assert "rm-unreachable" in response.content.decode()
    assert "pw@" not in response.content.decode()
    assert columns["dev"]["schema"]["fingerprint"]


def test_api_token__revoke_action__revoked_and_no_longer_active(acme):
    from tenants.services import token_issue

    token, _raw = token_issue(tenant=acme["tenant"], user=acme[Role.VIEWER])
    client = login(acme[Role.ADMIN])
    response = client.post(
        reverse("admin:tenants_apitoken_changelist"),
        {"action": "revoke_selected", "_selected_action": [token.pk]},
    )
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.revoked_at is not None and not token.is_active


def test_environment_add__tenant_admin__only_own_tenants_offered_url_required(acme):
    Environment.objects.filter(tenant=acme["tenant"], stage="prod").delete()
    client = login(acme[Role.ADMIN])
    page = client.get(reverse("admin:tenants_environment_add"))
    choices = [choice for choice, _label in page.context["adminform"].form.fields["tenant"].choices if choice]
    assert [str(choice) for choice in choices] == [str(acme["tenant"].pk)]
    data = {
        "tenant": acme["tenant"].pk,
        "stage": "prod",
        "approvals_required": 1,
        "flags-TOTAL_FORMS": 0,
        "flags-INITIAL_FORMS": 0,
        "dry_run_lock_timeout_ms": 1000,
        "dry_run_statement_timeout_ms": 60000,
        "apply_lock_timeout_ms": 2000,
        "apply_lock_retries": 3,
        "apply_statement_timeout_ms": 900000,
    }

    response = client.post(reverse("admin:tenants_environment_add"), data)
    assert (
        response.status_code == 200
        and "A new environment needs its database URL." in response.content.decode()
    )
    response = client.post(
        reverse("admin:tenants_environment_add"),
        {**data, "tenant": acme["other"].pk, "database_url": SECRET_URL},
    )
    assert (
        response.status_code == 200
        and not Environment.objects.filter(tenant=acme["tenant"], stage="prod").exists()
    )
    response = client.post(reverse("admin:tenants_environment_add"), {**data, "database_url": SECRET_URL})
    assert response.status_code == 302
    assert Environment.objects.get(tenant=acme["tenant"], stage="prod").database_url == SECRET_URL


def test_delete_action__admin_of_acme_viewer_of_other__other_tenants_membership_kept(acme):
    from tenants.models import Membership

    user = acme[Role.ADMIN]
    membership_set(tenant=acme["other"], user=user, role=Role.VIEWER)
    theirs = Membership.objects.get(tenant=acme["other"], user=acme["other_admin"])
    client = login(user)
    url = reverse("admin:tenants_membership_changelist")

    response = client.post(url, {"action": "delete_selected", "_selected_action": [theirs.pk], "post": "yes"})

    assert response.status_code in (200, 403)
    assert Membership.objects.filter(pk=theirs.pk).exists()
    assert (
        client.post(reverse("admin:tenants_membership_delete", args=[theirs.pk]), {"post": "yes"}).status_code
        == 403
    )
    assert Membership.objects.filter(pk=theirs.pk).exists()
