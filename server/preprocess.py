"""RGB image -> model input, following the model's own data config (resize, crop, normalise).

The work is split in two. The geometric steps of timm's evaluation transform (resize, crop) run
per image in the preprocessing threads and yield a uint8 [3, H, W] tensor. Scaling to [0, 1] and
normalising run once per batch in the inference worker, on the model's device. That keeps torch's
multi-threaded kernels out of the preprocessing threads (on a small CPU they would fight the
inference thread for cores) and queues a quarter of the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from timm.data.transforms import MaybeToTensor
from torch import nn
from torchvision import transforms
from torchvision.transforms.functional import pil_modes_mapping

from .decode import DRAFTED_FROM


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
        """The resized and cropped image as a uint8 [3, H, W] tensor (no torch kernels run here).

        The usual evaluation transform (resize the shorter side, centre crop) runs as one resampling
        of just the cropped region (``Image.resize(box=...)``): the same filter at the same scale
        and the same sample positions as resizing the whole image and then cropping, without
        computing the pixels the crop throws away. Anything else runs the transform's own steps.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        plan = _resize_crop_plan(self.geometry)
        cropped = _resize_and_crop(image, *plan) if plan is not None else None
        if cropped is None:
            cropped = self.geometry(image)
        pixels = np.asarray(cropped, dtype=np.uint8)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))

    @property
    def resize_short_side(self) -> int | None:
        """The shorter side the transform resizes to first (before cropping), if it has that form.

        A decoder may hand over any image whose shorter side is at least about this long, e.g. a
        JPEG decoded at reduced scale: see ``decode_image(..., reduce_to=...)``."""
        plan = _resize_crop_plan(self.geometry)
        return None if plan is None else plan[0]

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> the model's normalised input, on the batch's device, in ``dtype``."""
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        return ((batch.float() / 255.0 - mean) / std).to(dtype)

    def model_input(self, image: Image.Image) -> torch.Tensor:
        """One image all the way to a normalised float [1, 3, H, W] batch (for offline use)."""
        return self.normalize(self(image)[None], torch.float32)


@lru_cache(maxsize=16)
def _resize_crop_plan(geometry: transforms.Compose) -> tuple[int, int, int, int] | None:
    """(short side, PIL resampling filter, crop height, crop width) when ``geometry`` is exactly
    ``Resize(short side)`` then ``CenterCrop``, as timm builds for ``crop_mode="center"``; else None."""
    steps = geometry.transforms
    if len(steps) != 2:
        return None
    resize, crop = steps
    if type(resize) is not transforms.Resize or type(crop) is not transforms.CenterCrop:
        return None
    size = resize.size
    if isinstance(size, list | tuple):
        if len(size) != 1:
            return None
        size = size[0]
    if resize.max_size is not None or resize.interpolation not in pil_modes_mapping:
        return None
    crop_size = crop.size if isinstance(crop.size, list | tuple) else (crop.size, crop.size)
    if len(crop_size) == 1:
        crop_size = (crop_size[0], crop_size[0])
    return int(size), pil_modes_mapping[resize.interpolation], int(crop_size[0]), int(crop_size[1])


def _full_size(image: Image.Image) -> tuple[tuple[int, int], int, tuple[int, int]]:
    """The upright image's full size, the scale it was decoded at and the offset of its first pixel
    (see ``DRAFTED_FROM``); for an image decoded in full, its own size, 1 and (0, 0)."""
    drafted_from = image.info.get(DRAFTED_FROM)
    if drafted_from is not None and len(drafted_from) == 5:
        width, height, scale, off_x, off_y = drafted_from
        if image.size == (-(-width // scale), -(-height // scale)):
            return (width, height), scale, (off_x, off_y)
    return image.size, 1, (0, 0)


def _resize_and_crop(
    image: Image.Image, short: int, resample: int, crop_h: int, crop_w: int
) -> Image.Image | None:
    """torchvision's ``Resize(short)`` then ``CenterCrop((crop_h, crop_w))`` as one PIL resampling of
    the region the crop keeps. None where the image would be enlarged (small, cheap images: Pillow's
    box resampling differs from resize-then-crop by up to ~10 levels at the edges when enlarging) or
    the crop would pad."""
    (width, height), scale, (off_x, off_y) = _full_size(image)
    # torchvision's output size: the shorter side becomes ``short``, the longer one is truncated.
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    if new_w < crop_w or new_h < crop_h or new_w > width or new_h > height:
        return None
    top = int(round((new_h - crop_h) / 2.0))
    left = int(round((new_w - crop_w) / 2.0))
    if (new_w, new_h) == (width, height) and scale == 1:
        return image.crop((left, top, left + crop_w, top + crop_h))
    # The crop's corners in the decoded image's pixels (a drafted image is 1/scale of the file's).
    scale_x, scale_y = width / new_w, height / new_h
    box = (
        (left * scale_x + off_x) / scale,
        (top * scale_y + off_y) / scale,
        ((left + crop_w) * scale_x + off_x) / scale,
        ((top + crop_h) * scale_y + off_y) / scale,
    )
    return image.resize((crop_w, crop_h), resample, box=box)
