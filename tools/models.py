"""Transcripts of tool-kernel calls."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class ToolTranscript(models.Model):
    """The record of one tool call: arguments (secrets redacted), result, error, timing."""

    transcript_id = models.CharField(max_length=40, unique=True, help_text="tr_ plus a sortable id")
    tenant = models.ForeignKey("tenants.Tenant", on_delete=models.CASCADE, related_name="transcripts")
    environment = models.ForeignKey(
        "tenants.Environment", null=True, blank=True, on_delete=models.SET_NULL, related_name="transcripts"
    )
    release = models.ForeignKey(
        "releases.Release", null=True, blank=True, on_delete=models.SET_NULL, related_name="transcripts"
    )
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    call_id = models.CharField(max_length=100)
    tool = models.CharField(max_length=64)
    args = models.JSONField(default=dict, blank=True)
    ok = models.BooleanField(default=False)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    error_code = models.CharField(
        max_length=40, blank=True, default="", help_text="validation_error, forbidden, tool_error, ..."
    )
    dry_run = models.BooleanField(default=True)
    duration_ms = models.FloatField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["transcript_id"]
        indexes = [models.Index(fields=["release", "transcript_id"], name="transcript_release")]

    def __str__(self) -> str:
        return f"{self.transcript_id} {self.tool}"
