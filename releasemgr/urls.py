"""URL routes."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/tools/", include("tools.urls")),
    path("api/", include("releases.api.urls")),
]
