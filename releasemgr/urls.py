"""URL routes."""

from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from .health import HealthView
from .metrics_view import metrics_view

urlpatterns = [
    path("admin/", admin.site.urls),
    re_path(r"^health/?$", HealthView.as_view(), name="health"),
    re_path(r"^metrics/?$", metrics_view, name="metrics"),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/tools/", include("tools.urls")),
    path("api/", include("releases.api.urls")),
    path("approvals/", include("releases.urls")),
]

# An unknown path under /api/ gets the JSON envelope (when DEBUG is off), not an HTML page.
handler400 = "releasemgr.api.bad_request"
handler404 = "releasemgr.api.not_found"
