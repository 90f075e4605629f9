"""Tool transcripts in the admin: read-only, filtered to the user's tenants, linked from releases."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from tenants.admin import TenantScopedAdmin

from .models import ToolTranscript


def transcripts_url(release) -> str:
    """The transcript changelist filtered to one release (for the release's admin page)."""
    return reverse("admin:tools_tooltranscript_changelist") + f"?release__id__exact={release.pk}"


@admin.register(ToolTranscript)
class ToolTranscriptAdmin(TenantScopedAdmin):
    """Append-only records: nobody adds, edits or deletes them here; members read their tenants'."""

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
        release = obj.release
        if release is None:
            return "-"
        try:
            url = reverse("admin:releases_release_change", args=[obj.release_id])
        except NoReverseMatch:  # the release admin is not registered
            return release.release_id
        return format_html('<a href="{}">{}</a>', url, release.release_id)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
