"""Fixtures of the security tests: a real control plane over HTTP, and the request
headers every test sends (one place, so that authentication is added here only)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.integration.conftest import Api, make_api  # noqa: F401 (a fixture, used by name)


@pytest.fixture
def api_headers() -> dict[str, str]:
    """Headers sent with every request of these tests."""
    return {}


@pytest.fixture
def api(make_api: Callable[..., Api], api_headers: dict[str, str]) -> Api:  # noqa: F811
    """A control plane on loopback whose HTTP client sends :func:`api_headers`."""
    served = make_api()
    served.http.headers.update(api_headers)
    return served
