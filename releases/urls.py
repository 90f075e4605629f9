"""Routes of the e-mail approval pages (mounted under /approvals/)."""

from django.urls import path

from . import views

urlpatterns = [
    path("<int:release_pk>/<str:token>/", views.approval_link, name="approval-link"),
]
