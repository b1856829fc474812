"""Instance retrieval: augmented views of a few photos, each looked up among the photos' embeddings.

A quality measure for a backbone without a classifier (DINOv2): take several random views of every
photo (crop, flip, colour), embed them, and count a view as found when its nearest photo (cosine,
over one embedding per photo) is the photo it was cut from. Views are seeded, so a run repeats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms


def view_transform(size: int) -> transforms.Compose:
    """Random views as self-supervised training makes them: a crop of 8-100% of the image resized to
    ``size``, a flip, colour jitter and sometimes grey. PIL in, PIL out."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=Image.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ]
    )


def augmented_views(
    photos: Sequence[Image.Image], views: int, size: int, seed: int = 0
) -> tuple[list[Image.Image], torch.Tensor]:
    """``views`` random views of every photo and, for each view, the index of its photo.

    The views depend only on the photos, ``views``, ``size`` and ``seed``: torch's global generator
    (which torchvision's transforms draw from) is seeded inside and restored afterwards.
    """
    if views < 1:
        raise ValueError(f"views must be at least 1, got {views}")
    transform = view_transform(size)
    out, owner = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index, photo in enumerate(photos):
            rgb = photo.convert("RGB")
            out += [transform(rgb) for _ in range(views)]
            owner += [index] * views
    return out, torch.tensor(owner)


def nearest_hits(queries: torch.Tensor, owners: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """[Q] bool: whether each query's nearest gallery row (cosine) is its owner's.

    ``queries`` [Q, C], ``owners`` [Q] gallery indices, ``gallery`` [G, C] one embedding per photo.
    """
    if queries.shape[-1] != gallery.shape[-1]:
        raise ValueError(f"queries have {queries.shape[-1]} channels, the gallery {gallery.shape[-1]}")
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).T
    return similarity.argmax(dim=-1) == owners


def recall_at_1(queries: torch.Tensor, owners: torch.Tensor, gallery: torch.Tensor) -> float:
    """Share of queries whose nearest gallery embedding is their own photo's."""
    return float(nearest_hits(queries, owners, gallery).float().mean())
