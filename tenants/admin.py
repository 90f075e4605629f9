"""Tenants in the admin: environments (write-only database URL), flags, members and API tokens.

Access in the whole admin follows memberships, not Django model permissions: a staff user sees the
tenants they are a member of (any role) and changes a tenant's configuration only as its `admin`;
superusers see and change everything. `TenantScopedAdmin` carries that rule for every model admin.
"""

from __future__ import annotations

from auditlog.mixins import AuditlogHistoryAdminMixin
from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.http import Http404, HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from releases import engine

from .models import ApiToken, Environment, FeatureFlag, Membership, Role, Tenant
from .selectors import environment_of_another_tenant
from .services import token_issue, token_revoke
from .targets import ANOTHER_TENANT, claim_identity, identity_conflict, read_identity

# --- access by membership -------------------------------------------------------------------------


def memberships_of(request: HttpRequest) -> dict[int, Membership]:
    """The user's memberships by tenant id, read once per request."""
    cached = getattr(request, "_releasemgr_memberships", None)
    if cached is None:
        user = request.user
        cached = {}
        if user.is_authenticated and user.is_active:
            cached = {m.tenant_id: m for m in Membership.objects.filter(user=user)}
        request._releasemgr_memberships = cached
    return cached


def is_superuser(request: HttpRequest) -> bool:
    return request.user.is_active and request.user.is_superuser


def tenant_ids_for(request: HttpRequest, role: str = Role.VIEWER) -> set[int] | None:
    """Ids of the tenants where the user has at least `role`; None means every tenant (superuser)."""
    if is_superuser(request):
        return None
    return {tenant_id for tenant_id, m in memberships_of(request).items() if m.has_role(role)}


def has_tenant_role(request: HttpRequest, tenant_id: int | None, role: str) -> bool:
    """Superusers may do everything; others need a membership of that tenant with at least `role`."""
    user = request.user
    if not (user.is_authenticated and user.is_active and user.is_staff):
        return False
    if user.is_superuser:
        return True
    membership = memberships_of(request).get(tenant_id)
    return membership is not None and membership.has_role(role)


def has_any_role(request: HttpRequest, role: str) -> bool:
    user = request.user
    if not (user.is_authenticated and user.is_active and user.is_staff):
        return False
    return user.is_superuser or any(m.has_role(role) for m in memberships_of(request).values())


class TenantScopedAdmin(AuditlogHistoryAdminMixin, admin.ModelAdmin):
    """A model admin whose rows belong to a tenant reachable through `tenant_path`.

    The queryset is filtered to the user's tenants, so another tenant's object is a 404 (the admin
    redirects with "does not exist"); reading needs any membership, writing the `manage_role`.
    """

    tenant_path = "tenant"
    manage_role = Role.ADMIN
    show_auditlog_history_link = True

    def tenant_id_of(self, obj) -> int | None:
        if self.tenant_path == "":
            return obj.pk
        target = obj
        for part in self.tenant_path.split("__"):
            target = getattr(target, part, None)
            if target is None:
                return None
        return target.pk

    def get_queryset(self, request: HttpRequest):
        queryset = super().get_queryset(request)
        ids = tenant_ids_for(request)
        if ids is None:
            return queryset
        lookup = "pk__in" if self.tenant_path == "" else f"{self.tenant_path}__in"
        return queryset.filter(**{lookup: ids})

    def has_module_permission(self, request: HttpRequest) -> bool:
        return has_any_role(request, Role.VIEWER)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        if obj is None:
            return has_any_role(request, Role.VIEWER)
        return has_tenant_role(request, self.tenant_id_of(obj), Role.VIEWER)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return has_any_role(request, self.manage_role)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        if obj is None:
            return has_any_role(request, self.manage_role)
        return has_tenant_role(request, self.tenant_id_of(obj), self.manage_role)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return self.has_change_permission(request, obj)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        # A tenant admin picks only tenants (and their environments) they administer.
        ids = tenant_ids_for(request, self.manage_role)
        if ids is not None and db_field.related_model is Tenant:
            kwargs["queryset"] = Tenant.objects.filter(pk__in=ids)
        elif ids is not None and db_field.related_model is Environment:
            kwargs["queryset"] = Environment.objects.filter(tenant__in=ids).select_related("tenant")
        elif ids is not None and db_field.related_model is get_user_model():
            # Usernames of other tenants stay hidden: a tenant admin picks among their tenants' members
            # (a user's first membership is given by a superuser or `manage.py tenant_setup`).
            kwargs["queryset"] = get_user_model().objects.filter(memberships__tenant__in=ids).distinct()
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def auditlog_history_view(self, request: HttpRequest, object_id, extra_context=None):
        # The mixin would render a history for `None` when the object is outside the user's tenants.
        if self.get_object(request, object_id) is None:
            raise Http404("Not found.")
        return super().auditlog_history_view(request, object_id, extra_context)

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        opts = self.model._meta
        extra_context["auditlog_url"] = reverse(
            f"admin:{opts.app_label}_{opts.model_name}_auditlog", args=[object_id]
        )
        return super().change_view(request, object_id, form_url, extra_context)


class ScopedInline:
    """Inline rows readable by the parent's members and writable by the parent's managers."""

    tenant_role_to_change = Role.ADMIN
    read_only = False

    def _parent_tenant_id(self, obj) -> int | None:
        if obj is None:
            return None
        if isinstance(obj, Tenant):
            return obj.pk
        return getattr(obj, "tenant_id", None)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        if obj is None:
            return has_any_role(request, Role.VIEWER)
        return has_tenant_role(request, self._parent_tenant_id(obj), Role.VIEWER)

    def _may_change(self, request: HttpRequest, obj) -> bool:
        if self.read_only:
            return False
        if obj is None:
            return has_any_role(request, self.tenant_role_to_change)
        return has_tenant_role(request, self._parent_tenant_id(obj), self.tenant_role_to_change)

    def has_add_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._may_change(request, obj)

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._may_change(request, obj)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return self._may_change(request, obj)


# --- environments: the database URL is write-only -------------------------------------------------


class EnvironmentForm(forms.ModelForm):
    """Sets `Environment.database_url` when filled; never renders the URL or its ciphertext."""

    database_url = forms.CharField(
        required=False,
        strip=True,
        max_length=2000,
        label="Database URL",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password", "size": 60}),
        help_text="Write-only: leave empty to keep the current URL. It is stored encrypted.",
    )

    class Meta:
        model = Environment
        fields = (
            "tenant",
            "stage",
            "approvals_required",
            "allow_self_approval",
            "dry_run_lock_timeout_ms",
            "dry_run_statement_timeout_ms",
            "apply_lock_timeout_ms",
            "apply_lock_retries",
            "apply_statement_timeout_ms",
        )

    def clean_database_url(self) -> str:
        value = self.cleaned_data.get("database_url", "")
        if not value and not (self.instance.pk and self.instance.database_url_encrypted):
            raise forms.ValidationError("A new environment needs its database URL.")
        if value and not value.startswith(("sqlite:", "postgres://", "postgresql://", "pgsql://")):
            raise forms.ValidationError("A sqlite:/// or postgres:// URL.")
        tenant = self.cleaned_data.get("tenant")  # absent in the tenant page's inline: the instance has it
        tenant_id = tenant.pk if tenant else self.instance.tenant_id
        if value and environment_of_another_tenant(url=value, tenant_id=tenant_id):
            # Releases would run on that tenant's database without its approvals; which tenant is not said.
            raise forms.ValidationError(ANOTHER_TENANT)
        self._identity = None
        if value:
            # Whatever the spelling: the database the URL reaches, asked of its server. Unreachable
            # now: saved unclaimed, and checked (and claimed) on its first open.
            try:
                self._identity = read_identity(value)
            except engine.TargetRefused as exc:
                raise forms.ValidationError(exc.message) from None
            if self._identity is not None and identity_conflict(identity=self._identity, tenant_id=tenant_id):
                raise forms.ValidationError(ANOTHER_TENANT)
        return value

    def save(self, commit: bool = True):
        value = self.cleaned_data.get("database_url")
        if value:
            self.instance.database_url = value  # clears the claimed identity
        environment = super().save(commit)
        identity = getattr(self, "_identity", None)
        if value and identity is not None:
            if commit:
                claim_identity(environment, identity)
            else:  # the admin saves later (save_model): record it with that save
                environment.target_identity, environment.target_file_id = identity.key, identity.file_id
                environment.target_identity_at = timezone.now()
        return environment


class WriteOnlyDatabaseURL:
    """What a read-only rendering of the `database_url` field shows: never the URL.

    For a user who may view but not change an environment (viewer, approver), Django renders every
    field of the form as text, looked up on the model admin before the model: without this it
    would print `Environment.database_url`, the decrypted URL with its password.
    """

    @admin.display(description="Database URL")
    def database_url(self, obj: Environment) -> str:
        return "(write-only)"


class EnvironmentInline(WriteOnlyDatabaseURL, ScopedInline, admin.TabularInline):
    model = Environment
    form = EnvironmentForm
    extra = 0
    fields = (
        "stage",
        "database_url",
        "database_url_masked",
        "approvals_required",
        "allow_self_approval",
        "flags_link",
    )
    readonly_fields = ("database_url_masked", "flags_link")
    show_change_link = True

    @admin.display(description="current URL (masked)")
    def database_url_masked(self, obj: Environment) -> str:
        return obj.database_url_masked if obj.pk and obj.database_url_encrypted else "-"

    @admin.display(description="feature flags")
    def flags_link(self, obj: Environment) -> str:
        if not obj.pk:
            return "-"
        url = reverse("admin:tenants_environment_change", args=[obj.pk])
        return format_html('<a href="{}#flags-group">{} flag(s)</a>', url, obj.flags.count())


class MembershipInline(ScopedInline, admin.TabularInline):
    model = Membership
    extra = 0
    fields = ("user", "role", "created_at")
    readonly_fields = ("created_at",)


class ApiTokenInline(ScopedInline, admin.TabularInline):
    """Tokens are listed by prefix only; they are created on the API token page (shown once there)."""

    model = ApiToken
    read_only = True
    extra = 0
    fields = ("prefix", "name", "user", "created_at", "expires_at", "last_used_at", "revoked_at")
    readonly_fields = fields
    show_change_link = True


@admin.register(Tenant)
class TenantAdmin(TenantScopedAdmin):
    tenant_path = ""
    list_display = ("slug", "name", "environment_count", "pipeline_link", "created_at")
    search_fields = ("slug", "name")
    inlines = (EnvironmentInline, MembershipInline, ApiTokenInline)

    def get_queryset(self, request: HttpRequest):
        from django.db.models import Count

        return super().get_queryset(request).annotate(_environment_count=Count("environments"))

    @admin.display(description="environments", ordering="_environment_count")
    def environment_count(self, obj: Tenant) -> int:
        return obj._environment_count

    @admin.display(description="pipeline")
    def pipeline_link(self, obj: Tenant) -> str:
        url = reverse("admin:releases_release_pipeline", args=[obj.slug])
        return format_html('<a href="{}">pipeline</a>', url)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return is_superuser(request)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return is_superuser(request)


class FeatureFlagForm(forms.ModelForm):
    class Meta:
        model = FeatureFlag
        fields = ("name", "value")

    def clean_value(self):
        value = self.cleaned_data.get("value")
        if not isinstance(value, bool | str) or (isinstance(value, str) and not value.strip()):
            raise forms.ValidationError('true, false or a plan name in quotes, e.g. "beta".')
        return value


class FeatureFlagInline(ScopedInline, admin.TabularInline):
    model = FeatureFlag
    form = FeatureFlagForm
    extra = 1
    fields = ("name", "value", "updated_at")
    readonly_fields = ("updated_at",)


@admin.register(Environment)
class EnvironmentAdmin(WriteOnlyDatabaseURL, TenantScopedAdmin):
    form = EnvironmentForm
    list_display = ("__str__", "tenant", "stage", "database_url_masked", "approvals_required", "flag_count")
    list_filter = ("stage", ("tenant", admin.RelatedOnlyFieldListFilter))
    list_select_related = ("tenant",)
    search_fields = ("tenant__slug",)
    inlines = (FeatureFlagInline,)
    readonly_fields = ("database_url_masked", "lock_owner", "lock_release", "lock_expires_at", "created_at")
    fieldsets = (
        (None, {"fields": ("tenant", "stage", "database_url", "database_url_masked")}),
        ("Approvals", {"fields": ("approvals_required", "allow_self_approval")}),
        (
            "Timeouts",
            {
                "classes": ("collapse",),
                "fields": (
                    "dry_run_lock_timeout_ms",
                    "dry_run_statement_timeout_ms",
                    "apply_lock_timeout_ms",
                    "apply_lock_retries",
                    "apply_statement_timeout_ms",
                ),
            },
        ),
        ("Release lock", {"fields": ("lock_owner", "lock_release", "lock_expires_at", "created_at")}),
    )

    def get_queryset(self, request: HttpRequest):
        from django.db.models import Count

        return super().get_queryset(request).annotate(_flag_count=Count("flags"))

    @admin.display(description="database URL (masked)")
    def database_url_masked(self, obj: Environment) -> str:
        return obj.database_url_masked if obj.pk and obj.database_url_encrypted else "-"

    @admin.display(description="flags", ordering="_flag_count")
    def flag_count(self, obj: Environment) -> int:
        return obj._flag_count


@admin.register(Membership)
class MembershipAdmin(TenantScopedAdmin):
    list_display = ("user", "tenant", "role", "created_at")
    list_filter = ("role", ("tenant", admin.RelatedOnlyFieldListFilter))
    list_select_related = ("user", "tenant")
    search_fields = ("user__username", "tenant__slug")


class ApiTokenAddForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ("tenant", "user", "name", "expires_at")

    def clean(self):
        cleaned = super().clean()
        tenant, user = cleaned.get("tenant"), cleaned.get("user")
        if tenant and user and not Membership.objects.filter(tenant=tenant, user=user).exists():
            raise forms.ValidationError(f"{user} is not a member of {tenant}; add the membership first.")
        return cleaned


@admin.register(ApiToken)
class ApiTokenAdmin(TenantScopedAdmin):
    """A new token is shown once, in a message; afterwards only its prefix."""

    add_form = ApiTokenAddForm
    list_display = ("prefix", "name", "tenant", "user", "created_at", "expires_at", "last_used_at", "active")
    list_filter = (("tenant", admin.RelatedOnlyFieldListFilter),)
    list_select_related = ("tenant", "user")
    search_fields = ("prefix", "name", "user__username")
    readonly_fields = ("prefix", "tenant", "user", "created_at", "last_used_at", "revoked_at")
    fields = ("prefix", "name", "tenant", "user", "created_at", "expires_at", "last_used_at", "revoked_at")
    actions = ("revoke_selected",)

    @admin.display(boolean=True, description="active")
    def active(self, obj: ApiToken) -> bool:
        return obj.is_active

    def get_form(self, request: HttpRequest, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = self.add_form
        return super().get_form(request, obj, change=change, **kwargs)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        field = super().formfield_for_foreignkey(db_field, request, **kwargs)
        if db_field.name == "user" and not is_superuser(request):
            # A token acts as its user: a tenant admin holding an approver's token could approve their
            # own release as that approver. Others' tokens come from a superuser or `issue_token`.
            field.queryset = field.queryset.filter(pk=request.user.pk)
        return field

    def get_fields(self, request: HttpRequest, obj=None):
        if obj is None:
            return ("tenant", "user", "name", "expires_at")
        return self.fields

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return () if obj is None else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: ApiToken, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        token, raw = token_issue(tenant=obj.tenant, user=obj.user, name=obj.name, expires_at=obj.expires_at)
        obj.pk, obj.prefix, obj.token_hash, obj.created_at = (
            token.pk,
            token.prefix,
            token.token_hash,
            token.created_at,
        )
        obj._state.adding = False
        messages.warning(
            request,
            f"New API token for {token.user} @ {token.tenant}: {raw} — copy it now, it will not be shown again.",
        )

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset) -> None:
        count = 0
        for token in queryset:
            if not has_tenant_role(request, token.tenant_id, Role.ADMIN):
                messages.error(request, f"You are not an admin of {token.tenant}; {token.prefix}… kept.")
                continue
            token_revoke(token=token)
            count += 1
        if count:
            messages.success(request, f"Revoked {count} token(s).")
