"""tome.compiled: per-(r, bucket) graphs give what the eager patched model gives."""

import shutil

import pytest
import torch
from tiny import images, make

import tome
from tome.compiled import CompiledToMe


def _eager(model, x, r):
    with torch.no_grad(), tome.merging(r=r):
        return model(x)


def test_padded_and_split_batches_equal_eager():
    model = tome.patch(make("deit_distilled"))
    runner = CompiledToMe(model, buckets=(2, 4), backend="eager")
    report = runner.warmup([0, 3], buckets=[4])
    assert sorted(report.compiled) == [(0, 4), (3, 4)] and not report.skipped
    for batch in (3, 4, 7):  # padded to 4; exactly 4; split into 4 + 3 (padded)
        x = images(model, batch=batch)
        for r in (0, 3):
            out = runner(x, r)
            assert out.shape == (batch, 10)
            assert torch.allclose(out, _eager(model, x, r), atol=1e-5)
    assert not runner.is_compiled(3, 2)
    x = images(model, batch=2)  # not compiled: runs eagerly
    assert torch.allclose(runner(x, 3), _eager(model, x, 3), atol=1e-5)


def test_budget_and_on_demand():
    model = tome.patch(make("augreg_vit_p16"))
    runner = CompiledToMe(model, buckets=(1, 2), backend="eager", on_demand=True)
    report = runner.warmup([2, 4], budget_s=0)
    assert report.compiled == {} and len(report.skipped) == 4
    x = images(model, batch=1)
    assert torch.allclose(runner(x, 4), _eager(model, x, 4), atol=1e-5)
    assert runner.is_compiled(4, 1) and not runner.is_compiled(2, 1)
    with pytest.raises(TypeError, match="tome.patch"):
        CompiledToMe(make("deit"))


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_cell_equals_the_eager_float32_model(dtype):
    # One real inductor cell per dtype on the tiny model (about 25 s cold, a few s with a warm cache).
    model = tome.patch(make("dinov2_registers"))
    x = images(model, batch=2)
    expected = _eager(model, x, 4)
    low = tome.patch(make("dinov2_registers")).to(dtype)
    runner = CompiledToMe(low, buckets=(2,))
    runner.warmup([4])
    out = runner(x.to(dtype), 4)
    assert out.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    assert torch.allclose(out.float(), expected, atol=tolerance, rtol=tolerance)
