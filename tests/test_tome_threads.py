"""One patched model shared by several threads, each merging with its own r."""

from concurrent.futures import ThreadPoolExecutor

import torch
from tiny import images, make

import tome


def _run(model, x, r):
    with torch.no_grad(), tome.merging(r=r) as info:
        out = model(x)
    return out, info.token_counts


def test_threads_with_different_r_get_their_own_results():
    model = tome.patch(make("dinov2_registers"))
    x = images(model, batch=2)
    rs = [0, 2, 5, 9, 13, 100]
    expected = {r: _run(model, x, r) for r in rs}
    jobs = rs * 6
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda r: (r, _run(model, x, r)), jobs))
    for r, (out, counts) in results:
        assert counts == expected[r][1], f"r={r} got another call's token counts"
        assert torch.allclose(out, expected[r][0], atol=1e-5), f"r={r} got another call's output"
    # The override never leaks into the model's default.
    assert model.r == 0
    with torch.no_grad(), tome.merging() as info:
        model(x)
    assert info.token_counts == [info.input_tokens] * 4
