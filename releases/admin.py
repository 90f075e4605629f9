"""Releases in the admin: read-only manifests, the four operations as buttons and actions, the pipeline.

No business logic here: the buttons and actions call the release services (`admin_views`), the
manifest is shown read-only, and every queryset is filtered by the user's memberships.
"""

from __future__ import annotations

import json
from typing import Any

from auditlog.admin import LogEntryAdmin as AuditlogLogEntryAdmin
from auditlog.models import LogEntry
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.db.models import Count, F, IntegerField, OuterRef, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from tenants.admin import ScopedInline, TenantScopedAdmin, has_any_role, tenant_ids_for
from tenants.models import ApiToken, Environment, FeatureFlag, Membership, Role, Tenant

from . import admin_views
from .models import (
    Approval,
    ApprovalDecision,
    ApprovalLink,
    AuditEvent,
    Backup,
    IdempotencyRecord,
    Migration,
    Preservation,
    Release,
    ReleaseStatus,
)

STATUS_COLOURS = {
    ReleaseStatus.PREPARED: "#3465a4",
    ReleaseStatus.PROMOTING: "#c17d11",
    ReleaseStatus.PROMOTED: "#2e7d32",
    ReleaseStatus.FAILED: "#c62828",
    ReleaseStatus.ROLLING_BACK: "#c17d11",
    ReleaseStatus.ROLLED_BACK: "#616161",
}


def status_badge(status: str) -> str:
    return format_html(
        '<span class="rm-badge rm-status-{}" style="background:{}">{}</span>',
        status,
        STATUS_COLOURS.get(status, "#616161"),
        ReleaseStatus(status).label if status in ReleaseStatus.values else status,
    )


def pre(value: Any, css: str = "rm-pre") -> str:
    """Monospace, escaped; JSON values pretty-printed."""
    if value in (None, "", [], {}):
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, indent=2, sort_keys=True)
    return format_html('<pre class="{}">{}</pre>', css, text)


class ReadOnlyInline(ScopedInline):
    read_only = True
    extra = 0
    can_delete = False


class MigrationInline(ReadOnlyInline, admin.StackedInline):
    model = Migration
    fields = ("position", "operation", "table", "sql_pre", "rollback_sql_pre", "dry_run_pre")
    readonly_fields = fields
    verbose_name_plural = "migrations (forward SQL, rollback SQL, dry-run)"

    @admin.display(description="SQL")
    def sql_pre(self, obj: Migration) -> str:
        return pre(obj.sql, "rm-pre rm-sql")

    @admin.display(description="rollback SQL")
    def rollback_sql_pre(self, obj: Migration) -> str:
        return pre(obj.rollback_sql, "rm-pre rm-sql")

    @admin.display(description="dry-run")
    def dry_run_pre(self, obj: Migration) -> str:
        return pre(obj.dry_run_result)


class ApprovalInline(ReadOnlyInline, admin.TabularInline):
    model = Approval
    fields = ("approver", "decision", "valid", "via", "comment", "created_at")
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("approver", "release")

    @admin.display(boolean=True, description="bound to this bundle and SQL")
    def valid(self, obj: Approval) -> bool:
        return obj.bundle_sha256 == obj.release.bundle_sha256 and obj.sql_sha256 == obj.release.sql_sha256


class BackupInline(ReadOnlyInline, admin.TabularInline):
    model = Backup
    fields = ("format", "file", "tables", "size_bytes", "sha256", "verified", "note", "created_at")
    readonly_fields = fields

    @admin.display(description="file")
    def file(self, obj: Backup) -> str:
        return obj.path.rsplit("/", 1)[-1] if obj.path else "-"


class PreservationInline(ReadOnlyInline, admin.TabularInline):
    model = Preservation
    fields = (
        "position",
        "direction",
        "kind",
        "source_table",
        "source_column",
        "preserved_table",
        "row_count",
        "purged_at",
    )
    readonly_fields = fields
    verbose_name_plural = "preserved data"


class AuditEventInline(ReadOnlyInline, admin.TabularInline):
    model = AuditEvent
    fk_name = "release"
    fields = ("created_at", "event", "actor_username", "payload_pre")
    readonly_fields = fields
    verbose_name_plural = "audit events"

    @admin.display(description="payload")
    def payload_pre(self, obj: AuditEvent) -> str:
        return pre(obj.payload)


def _valid_approvals(decision: str) -> Subquery:
    """Approvals of a release that count: this decision, bound to its current bundle and SQL."""
    return Coalesce(
        Subquery(
            Approval.objects.filter(
                release=OuterRef("pk"),
                decision=decision,
                bundle_sha256=OuterRef("bundle_sha256"),
                sql_sha256=OuterRef("sql_sha256"),
            )
            .order_by()
            .values("release")
            .annotate(n=Count("pk"))
            .values("n"),
            output_field=IntegerField(),
        ),
        Value(0),
    )


@admin.register(Release)
class ReleaseAdmin(TenantScopedAdmin):
    """Releases are created by prepare; here they are read, approved, promoted and rolled back."""

    list_display = (
        "release_id",
        "tenant",
        "route",
        "status_badge",
        "approvals_column",
        "migration_count",
        "short_sha",
        "created_by",
        "created_at",
        "promoted_at",
    )
    list_display_links = ("release_id",)
    list_filter = (
        ("tenant", admin.RelatedOnlyFieldListFilter),
        ("to_environment__stage", admin.ChoicesFieldListFilter),
        "status",
    )
    list_select_related = ("tenant", "from_environment", "to_environment", "created_by")
    search_fields = ("release_id", "bundle_sha256", "sql_sha256")
    ordering = ("-created_at", "-id")
    actions = ("approve_selected", "reject_selected", "promote_selected", "rollback_selected")
    inlines = (MigrationInline, ApprovalInline, BackupInline, PreservationInline, AuditEventInline)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "release_id",
                    "tenant",
                    "status_badge",
                    "route",
                    "bundle_sha256",
                    "sql_sha256",
                    "bundle_computed",
                    "created_by",
                )
            },
        ),
        (
            "Timestamps",
            {"fields": ("created_at", "promoted_at", "failed_at", "rolled_back_at", "status_changed_at")},
        ),
        ("Error", {"fields": ("error_code", "error_message")}),
        ("Feature flags", {"fields": ("feature_flags_pre", "flag_changes_pre")}),
        ("Bundle (normalized, as hashed)", {"classes": ("collapse",), "fields": ("bundle_pre",)}),
        ("Safety lint", {"fields": ("lint_table", "allow_unsafe", "unsafe_reason", "blocking_rules")}),
        (
            "Dry-run",
            {
                "fields": (
                    "dry_run_pre",
                    "fingerprint_before",
                    "fingerprint_after",
                    "native_fingerprint_before",
                    "native_fingerprint_after",
                    "post_deploy_pre",
                )
            },
        ),
        ("Approvals", {"fields": ("approvals_summary",)}),
        ("Related", {"fields": ("links",)}),
    )
    readonly_fields = (
        "release_id",
        "tenant",
        "status_badge",
        "route",
        "bundle_sha256",
        "sql_sha256",
        "bundle_computed",
        "created_by",
        "created_at",
        "promoted_at",
        "failed_at",
        "rolled_back_at",
        "status_changed_at",
        "error_code",
        "error_message",
        "bundle_pre",
        "feature_flags_pre",
        "flag_changes_pre",
        "lint_table",
        "allow_unsafe",
        "unsafe_reason",
        "blocking_rules",
        "dry_run_pre",
        "fingerprint_before",
        "fingerprint_after",
        "native_fingerprint_before",
        "native_fingerprint_after",
        "post_deploy_pre",
        "approvals_summary",
        "links",
    )

    def get_queryset(self, request: HttpRequest) -> QuerySet[Release]:
        migrations = (
            Migration.objects.filter(release=OuterRef("pk"))
            .order_by()
            .values("release")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                _migration_count=Coalesce(Subquery(migrations, output_field=IntegerField()), Value(0)),
                _approved=_valid_approvals(ApprovalDecision.APPROVED),
                _rejected=_valid_approvals(ApprovalDecision.REJECTED),
                _approvals_required=F("to_environment__approvals_required"),
            )
        )

    # -- permissions: read-only manifests; the operations have their own role checks ----------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_approve_permission(self, request: HttpRequest) -> bool:
        return has_any_role(request, Role.APPROVER)

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return has_any_role(request, Role.ADMIN)

    # -- list columns ---------------------------------------------------------------------------------

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Release) -> str:
        return status_badge(obj.status)

    @admin.display(description="from → to")
    def route(self, obj: Release) -> str:
        return f"{obj.from_environment.stage} → {obj.to_environment.stage}"

    @admin.display(description="approvals")
    def approvals_column(self, obj: Release) -> str:
        approved = getattr(obj, "_approved", None)
        if approved is None:
            return "-"
        required = obj._approvals_required
        if obj._rejected:
            return format_html('<span class="rm-bad">rejected ({})</span>', obj._rejected)
        css = "rm-ok" if approved >= required else "rm-warn"
        return format_html('<span class="{}">{}/{}</span>', css, approved, required)

    @admin.display(description="changes", ordering="_migration_count")
    def migration_count(self, obj: Release) -> int:
        return obj._migration_count

    @admin.display(description="bundle sha256")
    def short_sha(self, obj: Release) -> str:
        return format_html('<code title="{}">{}</code>', obj.bundle_sha256, obj.bundle_sha256[:12])

    # -- detail fields ---------------------------------------------------------------------------------

    @admin.display(description="bundle")
    def bundle_pre(self, obj: Release) -> str:
        return pre(obj.bundle)

    @admin.display(description="feature flags set")
    def feature_flags_pre(self, obj: Release) -> str:
        return pre(obj.bundle.get("feature_flags", {}))

    @admin.display(description="flag changes applied")
    def flag_changes_pre(self, obj: Release) -> str:
        return pre(obj.flag_changes)

    @admin.display(description="dry-run summary")
    def dry_run_pre(self, obj: Release) -> str:
        return pre(obj.dry_run_summary)

    @admin.display(description="post-deployment check")
    def post_deploy_pre(self, obj: Release) -> str:
        return pre(obj.post_deploy_result)

    @admin.display(description="lint findings")
    def lint_table(self, obj: Release) -> str:
        if not obj.lint_findings:
            return "none"
        rows = format_html_join(
            "",
            '<tr class="rm-lint-{}"><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>',
            (
                (
                    finding.get("severity", ""),
                    finding.get("severity", ""),
                    finding.get("rule", ""),
                    finding.get("change", ""),
                    finding.get("message", ""),
                    finding.get("safe_alternative", ""),
                )
                for finding in obj.lint_findings
            ),
        )
        return format_html(
            '<table class="rm-lint"><thead><tr><th>severity</th><th>rule</th><th>change</th>'
            "<th>message</th><th>safe alternative</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="lint errors blocking promote")
    def blocking_rules(self, obj: Release) -> str:
        rules = admin_views.unsafe_rules(obj)
        return ", ".join(rules) if rules else "none"

    @admin.display(description="approvals")
    def approvals_summary(self, obj: Release) -> str:
        missing = admin_views.approvals_missing(obj)
        required = obj.to_environment.approvals_required
        if missing is None:
            return f"satisfied ({required} required on {obj.to_environment.stage})"
        if missing["rejected"]:
            return format_html('<span class="rm-bad">rejected: promote is blocked</span>')
        return format_html(
            '<span class="rm-warn">missing: {} required on {}, {} given</span>',
            missing["approvals_required"],
            obj.to_environment.stage,
            missing["approved"],
        )

    @admin.display(description="links")
    def links(self, obj: Release) -> str:
        transcripts = reverse("admin:tools_tooltranscript_changelist") + f"?release__id__exact={obj.pk}"
        events = reverse("admin:releases_auditevent_changelist") + f"?release__id__exact={obj.pk}"
        history = reverse("admin:releases_release_auditlog", args=[obj.pk])
        pipeline = reverse("admin:releases_release_pipeline", args=[obj.tenant.slug])
        return format_html(
            '<a href="{}" id="rm-transcripts">tool transcripts ({})</a> · '
            '<a href="{}" id="rm-audit-events">audit events</a> · '
            '<a href="{}">change history (auditlog)</a> · <a href="{}">pipeline of {}</a>',
            transcripts,
            obj.transcripts.count(),
            events,
            history,
            pipeline,
            obj.tenant.slug,
        )

    # -- object buttons and their confirmation pages ---------------------------------------------------

    def get_urls(self):
        wrap = self.admin_site.admin_view
        custom = [
            path("pipeline/", wrap(self.pipeline_index_view), name="releases_release_pipeline_index"),
            path("pipeline/<slug:tenant_slug>/", wrap(self.pipeline_view), name="releases_release_pipeline"),
        ]
        for name in admin_views.OPERATIONS:
            custom.append(
                path(
                    f"<path:object_id>/{name}/",
                    wrap(self.operation_view),
                    {"operation_name": name},
                    name=f"releases_release_{name}",
                )
            )
        return custom + super().get_urls()

    def change_view(self, request: HttpRequest, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {})
        release = self.get_object(request, unquote(object_id))
        if release is not None:
            extra_context["release_buttons"] = admin_views.operation_buttons(request, release)
        return super().change_view(request, object_id, form_url, extra_context)

    def operation_view(self, request: HttpRequest, object_id: str, operation_name: str) -> HttpResponse:
        operation = admin_views.OPERATIONS[operation_name]
        release = self.get_object(request, unquote(object_id))
        if release is None:
            raise Http404("No such release.")
        if not admin_views.operation_allowed(request, release, operation):
            raise PermissionDenied
        release = admin_views.release_for_operation(release)
        change_url = reverse("admin:releases_release_change", args=[release.pk])
        if request.method == "POST":
            admin_views.operation_run(request, release, operation, comment=request.POST.get("comment", ""))
            return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            "title": f"{operation.label} {release.release_id}?",
            "opts": self.model._meta,
            "operation": operation,
            "items": [admin_views.confirmation_item(release, operation)],
            "single": True,
            "cancel_url": change_url,
        }
        return TemplateResponse(request, "releases/admin_confirm.html", context)

    # -- the same operations as changelist actions, with a confirmation step --------------------------

    def _bulk(self, request: HttpRequest, queryset: QuerySet[Release], name: str):
        operation = admin_views.OPERATIONS[name]
        order = ("-promoted_at", "-id") if name == "rollback" else ("created_at", "id")
        releases = [admin_views.release_for_operation(r) for r in queryset.order_by(*order)]
        if request.POST.get("post") == "yes":
            done = 0
            for release in releases:
                if not admin_views.operation_allowed(request, release, operation):
                    messages.error(
                        request, f"{release.release_id}: you may not {name} releases of {release.tenant}."
                    )
                    continue
                done += admin_views.operation_run(
                    request, release, operation, comment=request.POST.get("comment", "")
                )
            if len(releases) > 1:
                messages.info(request, f"{operation.label}: {done} of {len(releases)} release(s) done.")
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": f"{operation.label} {len(releases)} release(s)?",
            "opts": self.model._meta,
            "operation": operation,
            "items": [admin_views.confirmation_item(release, operation) for release in releases],
            "single": False,
            "action_name": f"{name}_selected",
            "selected": [release.pk for release in releases],
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            "cancel_url": reverse("admin:releases_release_changelist"),
        }
        return TemplateResponse(request, "releases/admin_confirm.html", context)

    @admin.action(description="Approve selected releases", permissions=["approve"])
    def approve_selected(self, request, queryset):
        return self._bulk(request, queryset, "approve")

    @admin.action(description="Reject selected releases", permissions=["approve"])
    def reject_selected(self, request, queryset):
        return self._bulk(request, queryset, "reject")

    @admin.action(description="Promote selected releases", permissions=["operate"])
    def promote_selected(self, request, queryset):
        return self._bulk(request, queryset, "promote")

    @admin.action(description="Roll back selected releases", permissions=["operate"])
    def rollback_selected(self, request, queryset):
        return self._bulk(request, queryset, "rollback")

    # -- the pipeline view ---------------------------------------------------------------------------

    def _tenants(self, request: HttpRequest) -> QuerySet[Tenant]:
        ids = tenant_ids_for(request)
        tenants = Tenant.objects.all()
        return tenants if ids is None else tenants.filter(pk__in=ids)

    def pipeline_index_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_module_permission(request):
            raise PermissionDenied
        context = {
            **self.admin_site.each_context(request),
            "title": "Pipelines",
            "opts": self.model._meta,
            "tenants": self._tenants(request),
        }
        return TemplateResponse(request, "admin/releases/pipeline_index.html", context)

    def pipeline_view(self, request: HttpRequest, tenant_slug: str) -> HttpResponse:
        tenant = get_object_or_404(self._tenants(request), slug=tenant_slug)
        context = {
            **self.admin_site.each_context(request),
            "title": f"Pipeline of {tenant.slug}",
            "opts": self.model._meta,
            **admin_views.pipeline_context(tenant),
        }
        return TemplateResponse(request, "admin/releases/pipeline.html", context)


class ReadOnlyScopedAdmin(TenantScopedAdmin):
    """Append-only or derived records: nobody adds, changes or deletes them in the admin."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


def _release_link(release: Release | None) -> str:
    if release is None:
        return "-"
    return format_html(
        '<a href="{}">{}</a>', reverse("admin:releases_release_change", args=[release.pk]), release.release_id
    )


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyScopedAdmin):
    list_display = ("created_at", "event", "tenant", "release_link", "environment", "actor_username")
    list_filter = ("event", ("tenant", admin.RelatedOnlyFieldListFilter), "environment__stage")
    list_select_related = ("tenant", "release", "environment__tenant")
    search_fields = ("release__release_id", "actor_username", "event")
    ordering = ("-created_at", "-id")
    fields = (
        "created_at",
        "event",
        "tenant",
        "release_link",
        "environment",
        "actor_username",
        "payload_pre",
        "client_address",
        "request_id",
    )
    readonly_fields = fields

    @admin.display(description="release", ordering="release__release_id")
    def release_link(self, obj: AuditEvent) -> str:
        return _release_link(obj.release)

    @admin.display(description="payload")
    def payload_pre(self, obj: AuditEvent) -> str:
        return pre(obj.payload)


@admin.register(Migration)
class MigrationAdmin(ReadOnlyScopedAdmin):
    tenant_path = "release__tenant"
    list_display = ("__str__", "release_link", "position", "operation", "table")
    list_filter = ("operation",)
    list_select_related = ("release__tenant",)
    search_fields = ("release__release_id", "table")
    fields = (
        "release_link",
        "position",
        "operation",
        "table",
        "change_pre",
        "sql_pre",
        "rollback_sql_pre",
        "dry_run_pre",
    )
    readonly_fields = fields

    @admin.display(description="release")
    def release_link(self, obj: Migration) -> str:
        return _release_link(obj.release)

    @admin.display(description="change")
    def change_pre(self, obj: Migration) -> str:
        return pre(obj.change)

    @admin.display(description="SQL")
    def sql_pre(self, obj: Migration) -> str:
        return pre(obj.sql, "rm-pre rm-sql")

    @admin.display(description="rollback SQL")
    def rollback_sql_pre(self, obj: Migration) -> str:
        return pre(obj.rollback_sql, "rm-pre rm-sql")

    @admin.display(description="dry-run")
    def dry_run_pre(self, obj: Migration) -> str:
        return pre(obj.dry_run_result)


@admin.register(Backup)
class BackupAdmin(ReadOnlyScopedAdmin):
    tenant_path = "release__tenant"
    list_display = (
        "__str__",
        "release_link",
        "environment",
        "format",
        "size_bytes",
        "verified",
        "created_at",
    )
    list_filter = ("format", "verified")
    list_select_related = ("release__tenant", "environment__tenant")
    search_fields = ("release__release_id", "sha256")
    fields = (
        "release_link",
        "environment",
        "format",
        "file",
        "tables",
        "size_bytes",
        "sha256",
        "verified",
        "note",
        "created_at",
    )
    readonly_fields = fields

    @admin.display(description="release")
    def release_link(self, obj: Backup) -> str:
        return _release_link(obj.release)

    @admin.display(description="file")
    def file(self, obj: Backup) -> str:
        return obj.path.rsplit("/", 1)[-1] if obj.path else "-"


@admin.register(Approval)
class ApprovalAdmin(ReadOnlyScopedAdmin):
    """Approvals are recorded through the release's Approve/Reject buttons, never edited."""

    tenant_path = "release__tenant"
    list_display = ("release_link", "approver", "decision", "via", "created_at")
    list_filter = ("decision", "via")
    list_select_related = ("release__tenant", "approver")
    search_fields = ("release__release_id", "approver__username")
    fields = (
        "release_link",
        "approver",
        "decision",
        "bundle_sha256",
        "sql_sha256",
        "via",
        "comment",
        "created_at",
    )
    readonly_fields = fields

    @admin.display(description="release")
    def release_link(self, obj: Approval) -> str:
        return _release_link(obj.release)


# --- django-auditlog's log, filtered by membership ---------------------------------------------------

# Each audited model and the path from it to its tenant: a member sees the log of their tenants' rows.
AUDITED_TENANT_PATHS: tuple[tuple[type, str], ...] = (
    (Tenant, "pk"),
    (Environment, "tenant"),
    (FeatureFlag, "environment__tenant"),
    (Membership, "tenant"),
    (ApiToken, "tenant"),
    (Release, "tenant"),
    (Migration, "release__tenant"),
    (Approval, "release__tenant"),
    (Backup, "release__tenant"),
    (Preservation, "release__tenant"),
    (AuditEvent, "tenant"),
    (ApprovalLink, "release__tenant"),
    (IdempotencyRecord, "tenant"),
)


def logentries_visible(request: HttpRequest, queryset: QuerySet[LogEntry]) -> QuerySet[LogEntry]:
    ids = tenant_ids_for(request)
    if ids is None:
        return queryset
    visible = Q(pk__in=[])
    for model, tenant_path in AUDITED_TENANT_PATHS:
        lookup = "pk__in" if tenant_path == "pk" else f"{tenant_path}__in"
        visible |= Q(
            content_type=ContentType.objects.get_for_model(model),
            object_id__in=model.objects.filter(**{lookup: ids}).values("pk"),
        )
    try:
        from tools.models import ToolTranscript
    except ImportError:  # pragma: no cover
        pass
    else:
        visible |= Q(
            content_type=ContentType.objects.get_for_model(ToolTranscript),
            object_id__in=ToolTranscript.objects.filter(tenant__in=ids).values("pk"),
        )
    return queryset.filter(visible)


if admin.site.is_registered(LogEntry):
    admin.site.unregister(LogEntry)


@admin.register(LogEntry)
class LogEntryAdmin(AuditlogLogEntryAdmin):
    """auditlog's log, limited to the rows of the user's tenants (superusers see all)."""

    def get_queryset(self, request: HttpRequest):
        return logentries_visible(request, super().get_queryset(request))

    def has_module_permission(self, request: HttpRequest) -> bool:
        return has_any_role(request, Role.VIEWER)

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        return has_any_role(request, Role.VIEWER)
