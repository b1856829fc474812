"""RGB image -> model input tensor, following the model's own data config (resize, crop, normalise)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from torch import nn


@dataclass(frozen=True)
class Preprocessor:
    """The model's evaluation transform, plus its inverse normalisation for drawing merge maps."""

    transform: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    data_config: dict

    @classmethod
    def for_model(cls, model: nn.Module) -> Preprocessor:
        config = resolve_model_data_config(model)
        # A model built with img_size=... keeps its pretrained config's input size; the patch
        # embedding knows the size the model was really built for.
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            config["input_size"] = (config["input_size"][0], *img_size)
        transform = create_transform(**config, is_training=False)
        mean = torch.tensor(config["mean"]).view(3, 1, 1)
        std = torch.tensor(config["std"]).view(3, 1, 1)
        return cls(transform=transform, mean=mean, std=std, data_config=config)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """[3, H, W] float32 tensor, normalised as the model expects."""
        return self.transform(image)

    def unnormalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """The resized and cropped image as a [3, H, W] tensor in [0, 1] (what the model saw)."""
        return (tensor.float().cpu() * self.std + self.mean).clamp(0.0, 1.0)
