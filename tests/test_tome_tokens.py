"""Token bookkeeping: schedules, counts, protected tokens and source maps."""

import pytest
import torch
from tiny import images, make

import tome


def test_parse_r_forms():
    assert tome.parse_r(4, 3) == [4, 4, 4]
    assert tome.parse_r([5, 1], 4) == [5, 1, 0, 0]
    assert tome.parse_r((8, -1.0), 5) == [16, 12, 8, 4, 0]  # the paper's decreasing 2r -> 0
    assert tome.parse_r((8, 1.0), 5) == [0, 4, 8, 12, 16]
    assert tome.parse_r((8, 0), 3) == [8, 8, 8]


@pytest.mark.parametrize("bad", [-1, [1, -2], (4, 1.5), (1, 2, 3), "8", True, [1, 2, 3, 4, 5]])
def test_parse_r_rejects_bad_values(bad):
    with pytest.raises((ValueError, TypeError)):
        tome.parse_r(bad, 4)


def test_token_counts_cap_at_half_the_mergeable_tokens():
    # ViT-B/16 at 224 px, r=16: 11 layers leave 197 - 176 = 21 tokens, and the last layer may merge
    # only (21 - 1) // 2 = 10 of them.
    assert tome.token_counts(197, 12, 16)[-2:] == [21, 11]
    # r far too large: each layer merges half of the 196 patch tokens, never the class token.
    assert tome.token_counts(197, 3, 1000) == [99, 50, 26]
    assert tome.token_counts(201, 2, 1000, num_protected=5) == [103, 54]


@pytest.mark.parametrize(
    "family", ["augreg_vit_p16", "deit_distilled", "dinov2_registers", "siglip_map_head"]
)
@pytest.mark.parametrize("r", [2, 7, 100])
def test_counts_follow_token_counts_and_protected_tokens_stay_put(family, r):
    model = tome.patch(make(family))
    x = images(model, batch=3)
    with torch.no_grad(), tome.merging(r=r, trace_source=True) as info:
        model.forward_features(x)
    protected = model.num_prefix_tokens
    expected = tome.token_counts(info.input_tokens, len(model.blocks), r, protected)
    assert info.token_counts == expected
    assert info.output_tokens == expected[-1]
    assert info.sizes.shape == (3, expected[-1])
    # Sizes count input tokens: every input token is in exactly one final token.
    assert torch.equal(info.sizes.sum(dim=1), torch.full((3,), float(info.input_tokens)))
    source = info.source
    assert source.shape == (3, info.input_tokens)
    assert torch.equal(source[:, :protected], torch.arange(protected).expand(3, -1))
    # No patch ended up in a protected token, and every final token holds at least one input token.
    assert bool((source[:, protected:] >= protected).all())
    for row in source:
        assert torch.equal(
            torch.bincount(row, minlength=expected[-1]) > 0, torch.ones(expected[-1], dtype=bool)
        )


def test_sizes_match_the_source_map():
    model = tome.patch(make("deit"))
    with torch.no_grad(), tome.merging(r=5, trace_source=True) as info:
        model(images(model))
    for sizes, source in zip(info.sizes, info.source, strict=True):
        assert torch.equal(torch.bincount(source, minlength=sizes.numel()).float(), sizes)


def test_dynamic_image_size_counts_tokens_per_call():
    model = tome.patch(make("dinov2", dynamic_img_size=True))
    for side in (42, 70):
        x = torch.randn(1, 3, side, side)
        with torch.no_grad(), tome.merging(r=3) as info:
            model(x)
        assert info.input_tokens == (side // 14) ** 2 + 1
        assert info.token_counts == tome.token_counts(info.input_tokens, 4, 3)
