"""The API's orjson renderer answers with the very bytes DRF's JSONRenderer would."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import pytest
from django.utils.translation import gettext_lazy
from rest_framework.exceptions import ErrorDetail
from rest_framework.renderers import JSONRenderer

from releasemgr.api import FastJSONRenderer

PAYLOADS = [
    {
        "success": True,
        "data": {"count": 2, "next": None, "results": [{"id": "rel_1", "x": None}, {"é": "ü"}]},
    },
    {
        "when": dt.datetime(2024, 1, 15, 12, 0, tzinfo=dt.UTC),
        "day": dt.date(2024, 1, 15),
        "at": dt.time(12, 0),
    },
    {"amount": decimal.Decimal("1.10"), "id": uuid.UUID(int=5), "lazy": gettext_lazy("Not found.")},
    {
        "success": False,
        "error": {"code": "validation_error", "details": {"x": [ErrorDetail("bad", code="invalid")]}},
    },
    {1: "int key", "nested": {"list": [1, 2.5, True, False, None]}},
    {"big": 2**80},
    [1, "two", {"three": 3}],
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_fast_renderer__payload__same_bytes_as_drf(payload):
    assert FastJSONRenderer().render(payload) == JSONRenderer().render(payload)


def test_fast_renderer__indent_requested__same_bytes_as_drf():
    payload = {"a": [1, 2], "b": {"c": None}}
    media = "application/json; indent=4"
    assert FastJSONRenderer().render(payload, media, {}) == JSONRenderer().render(payload, media, {})


def test_fast_renderer__none__empty_body():
    assert FastJSONRenderer().render(None) == b""
