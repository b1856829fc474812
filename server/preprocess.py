"""RGB image -> model input, following the model's own data config (resize, crop, normalise).

The work is split in two. The geometric steps of timm's evaluation transform (resize, crop) run
per image in the preprocessing threads and yield a uint8 [3, H, W] tensor. Scaling to [0, 1] and
normalising run once per batch in the inference worker, on the model's device. That keeps torch's
multi-threaded kernels out of the preprocessing threads (on a small CPU they would fight the
inference thread for cores) and queues a quarter of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.data.transforms import MaybeToTensor
from torch import nn
from torchvision import transforms


@dataclass(frozen=True)
class Preprocessor:
    geometry: transforms.Compose
    """The transform's PIL steps, up to (not including) its conversion to a tensor."""
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
        *geometry, to_tensor, normalize = create_transform(**config, is_training=False).transforms
        converts = isinstance(to_tensor, MaybeToTensor | transforms.ToTensor)
        if not converts or not isinstance(normalize, transforms.Normalize):
            raise ValueError(f"unexpected evaluation transform ending in {to_tensor}, {normalize}")
        mean = torch.as_tensor(normalize.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.as_tensor(normalize.std, dtype=torch.float32).view(1, 3, 1, 1)
        return cls(transforms.Compose(geometry), mean, std, config)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return tuple(self.data_config["input_size"])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The resized and cropped image as a uint8 [3, H, W] tensor (no torch kernels run here)."""
        pixels = np.asarray(self.geometry(image.convert("RGB")), dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the model's normalised input, on the batch's device, in ``dtype``."""
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        return ((batch.float() / 255.0 - mean) / std).to(dtype)

    def model_input(self, image: Image.Image) -> torch.Tensor:
        """One image all the way to a normalised float [1, 3, H, W] batch (for offline use)."""
        return self.normalize(self(image)[None], torch.float32)
