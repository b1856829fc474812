"""Human-readable class names for a model's outputs (the ImageNet label sets ship with timm)."""

from __future__ import annotations

from timm.data import ImageNetInfo, infer_imagenet_subset
from torch import nn


def class_labels(model: nn.Module) -> list[str]:
    """One label per output class; ``"class <i>"`` where the model's label set is unknown."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    subset = infer_imagenet_subset(model) if num_classes else None
    if subset is not None:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]
