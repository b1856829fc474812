"""The server benchmarks' answer to a missing extra: one line that names it, instead of a traceback."""

from __future__ import annotations

from typing import NoReturn

SERVER_EXTRAS = "install the [bench] and [serve] extras (pip install 'tome-serve[bench,serve]')"
"""What the server benchmarks need: [bench] brings their HTTP clients, [serve] the server they start."""

_OURS = frozenset({"tome", "tome_runtime", "tome_serve", "tome_eval", "tome_bench"})


def exit_for_missing(error: ModuleNotFoundError) -> NoReturn:
    """Exit with one line naming the missing module and the extras. A missing module of this project
    is a bug, not an install problem, so it is raised as it is."""
    if not error.name or error.name.split(".")[0] in _OURS:
        raise error
    raise SystemExit(f"the server benchmarks need {error.name}, which is not installed: {SERVER_EXTRAS}")
