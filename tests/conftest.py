"""Shared fixtures. ``tiny_server`` is one tiny-model server per test module that asks for it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from serverutil import run_server


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[str]:
    """Base URL of a real server (tiny random ViT, default settings) shared by one test module."""
    with run_server() as url:
        yield url
