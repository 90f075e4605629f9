"""Refusals outside the views: an API path that matches no route still answers in the envelope."""

from __future__ import annotations

import pytest
from django.test import Client


@pytest.mark.parametrize(
    "path", ["/api/releases/not-a-release!/", "/api/nothing-here", "/api/releases/x/y/z"]
)
def test_api_path__no_route__404_in_the_envelope(db, path):
    response = Client().get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "success": False,
        "error": {"code": "not_found", "message": "No API endpoint at this path.", "details": {}},
    }


def test_other_path__no_route__django_page_not_json(db):
    response = Client().get("/no-such-page")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("path", ["/api/releases/promote", "/api/releases/"])
def test_api_path__invalid_host_header__400_in_the_envelope(db, path):
    # Found by schemathesis: Django refuses the Host before any view, with an HTML page.
    response = Client(HTTP_HOST="9+7dm").post(path, "{}", content_type="application/json")
    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "success": False,
        "error": {"code": "validation_error", "message": "The request is malformed.", "details": {}},
    }


def test_other_path__invalid_host_header__django_page_not_json(db):
    response = Client(HTTP_HOST="9+7dm").get("/admin/login/")
    assert response.status_code == 400
    assert response["Content-Type"].startswith("text/html")
