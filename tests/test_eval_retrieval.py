"""Augmented views and recall@1 for instance retrieval (tome_eval.retrieval)."""

import numpy as np
import pytest
import torch
from PIL import Image

from tome_eval.retrieval import augmented_views, nearest_hits, recall_at_1


def _photos() -> list[Image.Image]:
    generator = np.random.default_rng(0)
    return [Image.fromarray(generator.integers(0, 256, (40, 60, 3), dtype=np.uint8)) for _ in range(3)]


def test_views_repeat_with_the_seed_and_name_their_photo():
    photos = _photos()
    views, owners = augmented_views(photos, 4, 32, seed=7)
    again, _ = augmented_views(photos, 4, 32, seed=7)
    other, _ = augmented_views(photos, 4, 32, seed=8)
    assert owners.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert all(view.size == (32, 32) and view.mode == "RGB" for view in views)
    pixels = [np.asarray(view) for view in views]
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(pixels, again, strict=True))
    assert not all(np.array_equal(a, np.asarray(b)) for a, b in zip(pixels, other, strict=True))
    assert not np.array_equal(pixels[0], pixels[1])  # two views of one photo differ


def test_views_leave_torchs_generator_alone():
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    augmented_views(_photos(), 2, 16, seed=0)
    assert torch.equal(torch.rand(2), expected)
    with pytest.raises(ValueError, match="at least 1"):
        augmented_views(_photos(), 0, 16)


def test_recall_counts_views_whose_nearest_photo_is_their_own():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    queries = torch.tensor([[5.0, 0.1], [0.2, 3.0], [0.1, 1.0], [-2.0, -0.5]])
    owners = torch.tensor([0, 1, 2, 2])  # the third query is nearer photo 1 than its own photo 2
    assert nearest_hits(queries, owners, gallery).tolist() == [True, True, False, True]
    assert recall_at_1(queries, owners, gallery) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="channels"):
        nearest_hits(queries, owners, torch.zeros(3, 5))
