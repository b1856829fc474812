"""Shared fixtures. The tiny model they use is defined once, in tiny.py."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest
from serverutil import run_server


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[str]:
    """Base URL of a real server (tiny random ViT, default settings) shared by one test module."""
    with run_server() as url:
        yield url


@pytest.fixture
def promtool() -> Callable[..., subprocess.CompletedProcess]:
    """``promtool(*args, cwd=None, input=None)`` runs Prometheus' promtool; the test is skipped, saying
    how to install it, where it is missing."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip(
            "promtool not installed (Debian: apt-get install prometheus; scripts/test does it as root)"
        )

    def run(*args: str, cwd=None, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([tool, *args], cwd=cwd, input=input, capture_output=True, text=True, timeout=60)

    return run
