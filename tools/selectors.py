"""Reads of transcripts, always through the tenant or the release."""

from __future__ import annotations

from .models import ToolTranscript


def transcript_ids_for_release(release) -> list[str]:
    """The manifest's `tools_transcript_ids`: the release's tool calls in the order they were made."""
    return list(
        ToolTranscript.objects.filter(release=release)
        .order_by("transcript_id")
        .values_list("transcript_id", flat=True)
    )
