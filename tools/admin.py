"""Tool transcripts in the admin: read-only, filtered to the user's tenants, linked from releases."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from .models import ToolTranscript


def transcripts_url(release) -> str:
    """The transcript changelist filtered to one release (for the release's admin page)."""
    return reverse("admin:tools_tooltranscript_changelist") + f"?release__id__exact={release.pk}"


@admin.register(ToolTranscript)
class ToolTranscriptAdmin(admin.ModelAdmin):
    """Append-only records: nobody adds, edits or deletes them here."""

    list_display = ("transcript_id", "tool", "ok", "dry_run", "release_link", "user", "created_at")
    list_filter = ("tool", "ok", "dry_run")
    search_fields = ("transcript_id", "call_id", "release__release_id")
    list_select_related = ("release", "user", "tenant")
    date_hierarchy = "created_at"
    ordering = ("-transcript_id",)
    fields = (
        "transcript_id",
        "call_id",
        "tool",
        "tenant",
        "environment",
        "release",
        "user",
        "ok",
        "dry_run",
        "error_code",
        "error",
        "duration_ms",
        "args",
        "result",
        "created_at",
    )
    readonly_fields = fields

    @admin.display(description="release", ordering="release__release_id")
    def release_link(self, obj: ToolTranscript) -> str:
        if obj.release_id is None:
            return "-"
        try:
            url = reverse("admin:releases_release_change", args=[obj.release_id])
        except NoReverseMatch:  # the release admin is not registered
            return obj.release.release_id
        return format_html('<a href="{}">{}</a>', url, obj.release.release_id)

    def get_queryset(self, request: HttpRequest):
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        return queryset.filter(tenant__memberships__user=request.user)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj=None) -> bool:
        user = request.user
        if not (user.is_active and user.is_staff):
            return False
        # Staff members of a tenant read their tenant's transcripts (the queryset is filtered).
        if user.is_superuser or super().has_view_permission(request, obj):
            return True
        return user.memberships.exists()

    def has_module_permission(self, request: HttpRequest) -> bool:
        return self.has_view_permission(request)
