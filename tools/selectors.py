"""Reads of transcripts, always through the tenant or the release."""

from __future__ import annotations

from django.db.models import QuerySet

from .models import ToolTranscript


def transcript_ids_for_release(release) -> list[str]:
    """The manifest's `tools_transcript_ids`: the release's tool calls in the order they were made."""
    return list(
        ToolTranscript.objects.filter(release=release)
        .order_by("transcript_id")
        .values_list("transcript_id", flat=True)
    )


def transcript_list(*, tenant, release=None) -> QuerySet[ToolTranscript]:
    queryset = ToolTranscript.objects.filter(tenant=tenant)
    if release is not None:
        queryset = queryset.filter(release=release)
    return queryset.order_by("transcript_id")


def transcript_get(*, tenant, transcript_id: str) -> ToolTranscript | None:
    return ToolTranscript.objects.filter(tenant=tenant, transcript_id=transcript_id).first()
