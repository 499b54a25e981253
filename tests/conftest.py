"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL


class _MockedResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 omits the `stream_writer` aiohttp 3.14 requires (pnuckowski/aioresponses#289)."""

    def __init__(self, method: str, url: URL, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


class _Aioresponses(aioresponses):
    def add(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _MockedResponse)
        super().add(*args, **kwargs)


@pytest.fixture
def http_mock() -> Iterator[aioresponses]:
    """aioresponses that works with aiohttp 3.14: requests are answered by what the test registers."""
    with _Aioresponses() as mock:
        yield mock
