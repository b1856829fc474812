"""timm's forward methods, GMACs and the merge-map picture on patched models."""

import copy

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from tiny import images, make

import tome


@pytest.mark.parametrize("family", ["mae_avg_pool", "siglip_map_head", "deit_distilled", "dinov2_registers"])
def test_forward_features_then_forward_head_equals_forward(family):
    model = tome.patch(make(family))
    x = images(model)
    with torch.no_grad(), tome.merging(r=4) as info:
        whole = model(x)
        features = model.forward_features(x)
        assert features.shape[1] == info.output_tokens
        split = model.forward_head(features)
        pre_logits = model.forward_head(features, pre_logits=True)
    assert torch.allclose(whole, split, atol=1e-6)
    assert pre_logits.shape == (2, model.embed_dim)


def test_average_pooling_is_weighted_by_token_size():
    model = tome.patch(make("mae_avg_pool", num_classes=0))
    x = images(model)
    with torch.no_grad(), tome.merging(r=6) as info:
        features = model.forward_features(x)
        pooled = model.forward_head(features)
    patches, sizes = features[:, 1:], info.sizes[:, 1:, None]
    assert torch.allclose(pooled, model.fc_norm((patches * sizes).sum(1) / sizes.sum(1)), atol=1e-5)
    assert not torch.allclose(pooled, model.fc_norm(patches.mean(1)), atol=1e-3)


def test_features_are_pooled_with_their_own_sizes_after_another_call():
    model = tome.patch(make("mae_avg_pool"))
    first, second = images(model, seed=1), images(model, seed=2)
    with torch.no_grad():
        with tome.merging(r=6) as info:
            expected = model(first)
            features = model.forward_features(first)
        with tome.merging(r=6) as other_info:
            other = model.forward_features(second)  # same shape, other merges
        assert other.shape == features.shape
        assert not torch.equal(other_info.sizes, info.sizes)
        assert torch.allclose(model.forward_head(features), expected, atol=1e-6)


def test_pooling_a_copy_of_merged_features_warns():
    model = tome.patch(make("mae_avg_pool"))
    with torch.no_grad(), tome.merging(r=6):
        features = model.forward_features(images(model))
        with pytest.warns(UserWarning, match="without token sizes"):
            model.forward_head(features.clone())


def test_models_without_pooling_return_every_merged_token():
    model = tome.patch(make("mae_avg_pool", num_classes=0, global_pool=""))
    x = images(model)
    with torch.no_grad(), tome.merging(r=6) as info:
        tokens = model(x)
    assert tokens.shape == (2, info.output_tokens, model.embed_dim)


@pytest.mark.parametrize("family", ["augreg_vit_p16", "dinov2_registers"])
def test_forward_intermediates_keeps_timm_shapes_and_values_at_r0(family):
    model = make(family)
    reference = copy.deepcopy(model)
    tome.patch(model)
    x = images(model)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=2, norm=True)
        ref_final, ref_inter = reference.forward_intermediates(x, indices=2, norm=True)
        assert torch.allclose(final, ref_final, atol=1e-5)
        for ours, theirs in zip(inter, ref_inter, strict=True):
            assert torch.allclose(ours, theirs, atol=1e-5)
        with tome.merging(r=5) as info:
            final, inter = model.forward_intermediates(x, indices=[0, 3], output_fmt="NCHW")
        assert final.shape[1] == info.output_tokens
        assert [t.shape for t in inter] == [t.shape for t in ref_inter]


def test_forward_intermediates_spreads_merged_tokens_over_their_patches():
    model = tome.patch(make("augreg_vit_p16"))
    x = images(model)
    with torch.no_grad(), tome.merging(r=5, trace_source=True) as info:
        (last,) = model.forward_intermediates(x, indices=[3], output_fmt="NLC", intermediates_only=True)
        features = model.forward_features(x)
    # Intermediates are taken before the final norm, forward_features after it.
    spread = model.norm(last)
    gathered = features.gather(1, info.source[:, 1:, None].expand(-1, -1, features.shape[-1]))
    assert torch.allclose(spread, gathered, atol=1e-5)
    # get_intermediate_layers (the DINO interface) goes through the same path.
    with torch.no_grad(), tome.merging(r=5):
        (grid,) = model.get_intermediate_layers(x, n=1, reshape=True)
    assert grid.shape == (2, model.embed_dim, 4, 4)


def test_gmacs_match_the_paper_for_vit_b16():
    model = timm.create_model("vit_base_patch16_224", pretrained=False)
    assert tome.gmacs(model, 0) == pytest.approx(17.56, abs=0.05)
    assert tome.gmacs(model, 16) == pytest.approx(8.77, abs=0.05)
    assert tome.gmacs(model, 0) / tome.gmacs(model, 16) == pytest.approx(2.0, abs=0.02)
    assert tome.gmacs(model, 8) < tome.gmacs(model, 4) < tome.gmacs(model, 0)


def test_visualize_fills_groups_with_their_mean_colour():
    # A 2x2 grid of 8-pixel patches; patches 0 and 3 merged into final token 1.
    pixels = torch.zeros(16, 16, 3)
    pixels[:8, :8] = 200.0  # patch 0
    pixels[:8, 8:] = 50.0  # patch 1
    pixels[8:, :8] = 100.0  # patch 2
    pixels[8:, 8:] = 0.0  # patch 3
    image = Image.fromarray(pixels.to(torch.uint8).numpy())
    source = torch.tensor([0, 1, 2, 3, 1])  # class token, then the four patches
    out = tome.visualize(image, source, 8, border=False)
    array = torch.from_numpy(np.array(out)).float()
    assert out.size == (16, 16)
    assert torch.all(array[:8, :8] == 100) and torch.all(array[8:, 8:] == 100)  # mean of 200 and 0
    assert torch.all(array[:8, 8:] == 50) and torch.all(array[8:, :8] == 100)
    bordered = torch.from_numpy(np.array(tome.visualize(image, source, 8, scale=2)))
    assert bordered.shape == (32, 32, 3)
    assert not torch.equal(bordered[15, 0], bordered[0, 0])  # border drawn between groups


def test_visualize_from_a_real_merge():
    model = tome.patch(make("dinov2"))
    x = images(model, batch=1)
    with torch.no_grad(), tome.merging(r=6, trace_source=True) as info:
        model(x)
    picture = tome.visualize(x[0].sigmoid(), info.source[0], 14, scale=3)
    assert picture.size == (56 * 3, 56 * 3)
    with pytest.raises(ValueError, match="patch grid"):
        tome.visualize(x[0].sigmoid(), info.source[0][:5], 14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_merge_with_exact_sizes(dtype):
    model = tome.patch(make("dinov2_registers"))
    x = images(model)
    with torch.no_grad(), tome.merging(r=6) as info:
        expected = model(x)
        half = copy.deepcopy(model).to(dtype)
        with tome.merging(r=6) as half_info:
            out = half(x.to(dtype))
    assert out.dtype == dtype
    assert half_info.token_counts == info.token_counts
    assert half_info.sizes.dtype == torch.float32 and torch.equal(half_info.sizes, info.sizes)
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.05)
