"""Patched models compute what the unpatched model (r=0) and the paper's algorithm (r>0) compute."""

import copy

import pytest
import torch
from reference_tome import reference_forward
from tiny import FAMILIES, images, make, make_named, with_reference

import tome


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_r0_matches_unpatched_model(family):
    model, reference, x = with_reference(make(family))
    with torch.no_grad():
        expected = reference(x)
        assert torch.allclose(model(x), expected, atol=1e-5, rtol=0)
        with tome.merging(r=0) as info:
            assert torch.allclose(model(x), expected, atol=1e-5, rtol=0)
    assert info.token_counts == [info.input_tokens] * len(model.blocks)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("r", [3, (4, -1.0), [6, 0, 2]])
def test_merging_matches_reference_algorithm(family, r):
    model, reference, x = with_reference(make(family))
    schedule = tome.parse_r(r, len(model.blocks))
    expected, counts, sources = reference_forward(reference, x, schedule)
    with torch.no_grad(), tome.merging(r=r, trace_source=True) as info:
        out = model(x)
    assert info.token_counts == counts[0]
    assert torch.equal(info.source, sources)
    assert torch.allclose(out, expected, atol=1e-4, rtol=0)


def test_without_proportional_attention_matches_reference():
    model, reference, x = with_reference(make("mae_avg_pool"), prop_attn=False)
    expected, _, _ = reference_forward(reference, x, [5] * 4, prop_attn=False)
    with torch.no_grad(), tome.merging(r=5):
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=0)


def test_merging_changes_the_output():
    model = tome.patch(make("augreg_vit_p16"))
    x = images(model)
    with torch.no_grad():
        plain = model(x)
        with tome.merging(r=8):
            merged = model(x)
    assert not torch.allclose(plain, merged, atol=1e-3)


def test_model_default_r_applies_without_a_context():
    model = tome.patch(make("deit"))
    x = images(model)
    with torch.no_grad(), tome.merging(r=6) as info:
        expected = model(x)
    model.r = 6
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    with torch.no_grad(), tome.merging() as default_info:
        model(x)
    assert default_info.token_counts == info.token_counts


def test_full_size_vit_s16_matches_timm_and_the_reference():
    model, reference, x = with_reference(make_named("vit_small_patch16_224"), batch=1)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5, rtol=0)
        expected, counts, sources = reference_forward(reference, x, [8] * 12)
        with tome.merging(r=8, trace_source=True) as info:
            out = model(x)
    assert info.token_counts == counts[0] == tome.token_counts(197, 12, 8)
    assert torch.equal(info.source, sources)
    assert torch.allclose(out, expected, atol=1e-4, rtol=0)


def test_attention_without_the_attributes_newer_timm_added():
    # timm releases before gated attention have no Attention.gate and no Attention.attn_dim.
    model = make("augreg_vit_p16")
    for block in model.blocks:
        for name in ("gate", "attn_dim"):
            if hasattr(block.attn, name):
                delattr(block.attn, name)
    reference = copy.deepcopy(model)
    tome.patch(model)
    x = images(model)
    expected, _, _ = reference_forward(reference, x, [3] * 4)
    with torch.no_grad(), tome.merging(r=3):
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=0)
    assert tome.gmacs(model, 3) > 0
