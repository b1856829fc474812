"""Merge rules: "tome" (the paper's size-weighted mean) and "mlerp" (ToFu's norm-preserving merge)."""

import copy

import pytest
import torch
from reference_tome import reference_forward
from tiny import FAMILIES, images, make, with_reference

import tome
from tome.merge import bipartite_soft_matching


@pytest.mark.parametrize("rule", tome.MERGE_RULES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_rule_at_r0_is_the_unpatched_model(family, rule):
    model, reference, x = with_reference(make(family))
    with torch.no_grad(), tome.merging(r=0, merge=rule):
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("family", ["augreg_vit_p16", "dinov2_registers", "siglip_map_head"])
def test_tome_rule_is_the_default_and_the_papers_algorithm(family):
    model, reference, x = with_reference(make(family))
    expected, _, _ = reference_forward(reference, x, [3] * 4)
    with torch.no_grad():
        with tome.merging(r=3, merge="tome"):
            explicit = model(x)
        with tome.merging(r=3):
            default = model(x)
    assert torch.allclose(explicit, expected, atol=1e-4, rtol=0)
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("r", [3, (4, -1.0)])
def test_mlerp_matches_the_group_by_group_reference_in_every_family(family, r):
    model, reference, x = with_reference(make(family))
    schedule = tome.parse_r(r, len(model.blocks))
    expected, counts, sources = reference_forward(reference, x, schedule, rule="mlerp")
    plain, _, _ = reference_forward(reference, x, schedule)
    with torch.no_grad(), tome.merging(r=r, merge="mlerp", trace_source=True) as info:
        out = model(x)
    assert info.token_counts == counts[0]
    assert torch.equal(info.source, sources)
    assert torch.allclose(out, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(out, plain, atol=1e-3)  # the rule changed something


def test_mlerp_without_proportional_attention_matches_the_reference():
    model, reference, x = with_reference(make("mae_avg_pool"), prop_attn=False)
    expected, _, _ = reference_forward(reference, x, [5] * 4, prop_attn=False, rule="mlerp")
    with torch.no_grad(), tome.merging(r=5, merge="mlerp"):
        assert torch.allclose(model(x), expected, atol=1e-4, rtol=0)


def _groups(match, batch: int, num_tokens: int) -> torch.Tensor:
    """[B, N] output position of every input token."""
    return match.follow(torch.arange(num_tokens).expand(batch, -1))


def test_mlerp_gives_each_merged_token_the_largest_norm_of_its_group():
    generator = torch.Generator().manual_seed(0)
    batch, num_tokens, protected = 2, 21, 1
    x = torch.randn(batch, num_tokens, 16, generator=generator) * torch.rand(batch, num_tokens, 1) * 3
    size = torch.randint(1, 5, (batch, num_tokens, 1), generator=generator).float()
    # Every A token is equally close to every B token: all merges go into the first B token, so one
    # group holds r + 1 tokens, as scatter_reduce has to handle.
    metric = torch.ones(batch, num_tokens, 4)
    match = bipartite_soft_matching(metric, 6, protected)
    merged, new_size = match.merge_weighted(x, size, "mlerp")
    mean, mean_size = match.merge_weighted(x, size, "tome")
    assert torch.equal(new_size, mean_size)
    groups = _groups(match, batch, num_tokens)
    norms = x.norm(dim=-1)
    for image in range(batch):
        for token in range(match.num_out):
            members = (groups[image] == token).nonzero()[:, 0]
            if len(members) == 1:
                assert torch.equal(merged[image, token], x[image, members[0]])
                continue
            assert len(members) == 7  # the first B token and the 6 A tokens
            largest = norms[image, members].max()
            assert torch.allclose(merged[image, token].norm(), largest, rtol=1e-5)
            assert merged[image, token].norm() > mean[image, token].norm()
            cos = torch.cosine_similarity(merged[image, token], mean[image, token], dim=0)
            assert cos > 1 - 1e-5  # same direction as the mean


def test_mlerp_of_tokens_that_cancel_out_is_zero_not_nan():
    x = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [-1.0, -2.0]]])  # A: token 1, B: token 2
    match = bipartite_soft_matching(torch.ones(1, 3, 2), 1, 1)
    merged, _ = match.merge_weighted(x, None, "mlerp")
    assert torch.equal(merged, torch.zeros(1, 2, 2))


def test_model_default_rule_and_per_call_override():
    model = tome.patch(make("deit"))
    x = images(model)
    with torch.no_grad():
        with tome.merging(r=5, merge="mlerp"):
            mlerp = model(x)
        with tome.merging(r=5, merge="tome"):
            mean = model(x)
        model.merge_rule = "mlerp"
        with tome.merging(r=5):
            assert torch.equal(model(x), mlerp)
        with tome.merging(r=5, merge="tome"):
            assert torch.equal(model(x), mean)
        assert torch.equal(model.tome_forward(x, 5), mlerp)
        assert torch.equal(model.tome_forward(x, 5, merge="tome"), mean)
    assert model.merge_rule == tome.patch(model).merge_rule == "mlerp"  # patching again keeps it


def test_unknown_rules_are_refused_naming_the_allowed_ones():
    assert tome.MERGE_RULES == ("tome", "mlerp")
    refused = pytest.raises(ValueError, match=r"unknown merge rule 'slerp': use one of 'tome', 'mlerp'")
    with refused, tome.merging(r=2, merge="slerp"):
        pass  # refused on entering the block, before any model call
    model = tome.patch(make("deit"))
    model.merge_rule = "average"
    with pytest.raises(ValueError, match="unknown merge rule 'average'"), torch.no_grad():
        model(images(model))


def test_mlerp_in_bfloat16_stays_close_to_float32():
    model = tome.patch(make("dinov2_registers"))
    x = images(model)
    with torch.no_grad(), tome.merging(r=6, merge="mlerp") as info:
        expected = model(x)
        half = copy.deepcopy(model).to(torch.bfloat16)
        with tome.merging(r=6, merge="mlerp") as half_info:
            out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert half_info.token_counts == info.token_counts
    assert torch.allclose(out.float(), expected, atol=0.05, rtol=0.05)
