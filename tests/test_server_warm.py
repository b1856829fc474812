"""The inference worker's warm-up before /readyz: every batch size once on every inference thread, and
no batch twice (at r=0 a traced batch is the untraced one)."""

from __future__ import annotations

import threading

import pytest
from serverutil import TINY_MODEL_KWARGS
from tiny import NAME

from tome_serve.config import Settings
from tome_serve.inference import InferenceWorker
from tome_serve.loading import load_model
from tome_serve.metrics import Metrics


@pytest.mark.parametrize("default_r, traced", [("auto", []), (4, [(4, 1)])])
def test_each_thread_warms_every_batch_size_once(monkeypatch, default_r, traced) -> None:
    settings = Settings(model=NAME, weights="random", model_kwargs=TINY_MODEL_KWARGS, default_r=default_r)
    worker = InferenceWorker(load_model(NAME, settings), Metrics(), instances=2, torch_threads=1)
    runs: dict[str, list[tuple[int, int, bool]]] = {}
    forward = worker._forward

    def recording(r, pixels, trace, *args, **kwargs):
        runs.setdefault(threading.current_thread().name, []).append((r, len(pixels), trace))
        return forward(r, pixels, trace, *args, **kwargs)

    monkeypatch.setattr(worker, "_forward", recording)
    try:
        worker.warm((1, 8))
    finally:
        worker.close()
    r = 0 if default_r == "auto" else default_r
    expected = sorted([(r, 1, False), (r, 8, False), *((at, size, True) for at, size in traced)])
    assert len(runs) == 2  # both inference threads
    assert all(sorted(each) == expected for each in runs.values())
