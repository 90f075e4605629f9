"""The e-mail approval page: GET shows the release and decides nothing; only its POST decides.

Mail scanners and link previewers fetch links, so a GET must never approve. The page's form
posts back to the same URL with a CSRF token; the link itself identifies the approver, so no
login is needed, but a session of another user is refused.
"""

from __future__ import annotations

import logging

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_http_methods

from releasemgr.api import status_for
from releasemgr.core.errors import ApplicationError, ErrorCode

from . import links, services
from .models import ApprovalDecision, Release
from .selectors import approval_counts

logger = logging.getLogger(__name__)

MAX_COMMENT = 2000


def _page(request: HttpRequest, template: str, context: dict, status: int = 200) -> HttpResponse:
    response = render(request, template, context, status=status)
    # The URL holds a bearer credential: keep it out of other sites' Referer headers, caches and
    # indexes. "same-origin", not "no-referrer": with "no-referrer" a browser posts the page's own
    # form with `Origin: null`, which Django's CSRF check refuses ("Origin checking failed - null").
    # Same-origin requests may carry the URL: they go to the server that issued the token anyway.
    response["Referrer-Policy"] = "same-origin"
    response["X-Robots-Tag"] = "noindex, nofollow"
    return response


def _refused(request: HttpRequest, *, code: ErrorCode, message: str) -> HttpResponse:
    status = status_for(code)
    response = _page(
        request, "approvals/link_refused.html", {"code": code, "message": message}, status=status
    )
    # Django would log the request path, token included; log the refusal without it instead.
    response._has_been_logged = True
    release_pk = request.resolver_match.kwargs.get("release_pk") if request.resolver_match else None
    logger.warning(
        "approval link refused (%s, %s) for release pk %s",
        code,
        status,
        release_pk,
        extra={"status_code": status, "link_refusal": code},
    )
    return response


def _release_context(release: Release, approver) -> dict:
    counts = approval_counts(release)
    current = next((a for a in release.approvals.all() if a.approver_id == approver.pk), None)
    return {
        "release": release,
        "approver": approver,
        "migrations": list(release.migrations.order_by("position")),
        "lint_findings": release.lint_findings or [],
        "dry_run": release.dry_run_summary or {},
        "feature_flags": (release.bundle or {}).get("feature_flags", {}),
        "approvals_required": release.to_environment.approvals_required,
        "approvals_given": counts["approved"],
        "rejections": counts["rejected"],
        "current_decision": current.decision if current else "",
        "max_comment": MAX_COMMENT,
    }


@never_cache
@csrf_protect
@require_http_methods(["GET", "POST"])
def approval_link(request: HttpRequest, release_pk: int, token: str) -> HttpResponse:
    user = request.user if request.user.is_authenticated else None
    if request.method == "GET":
        try:
            resolved = links.approval_link_resolve(release_pk=release_pk, token=token, user=user)
        except links.LinkError as exc:
            return _refused(request, code=exc.code, message=exc.message)
        return _page(request, "approvals/confirm.html", _release_context(resolved.release, resolved.approver))

    decision = request.POST.get("decision", "")
    if decision not in ApprovalDecision.values:
        return _refused(
            request,
            code=ErrorCode.VALIDATION_ERROR,
            message="Choose Approve or Reject on the page.",
        )
    comment = request.POST.get("comment", "")[:MAX_COMMENT]
    try:
        approval = services.approval_link_decide(
            release_pk=release_pk, token=token, decision=decision, comment=comment, user=user
        )
    except ApplicationError as exc:  # the link or the approval service refused: nothing decided
        return _refused(request, code=exc.code, message=exc.message)
    release = Release.objects.select_related("tenant", "to_environment").get(pk=approval.release_id)
    counts = approval_counts(release)
    return _page(
        request,
        "approvals/decided.html",
        {
            "release": release,
            "approval": approval,
            "approvals_required": release.to_environment.approvals_required,
            "approvals_given": counts["approved"],
            "rejections": counts["rejected"],
        },
    )
