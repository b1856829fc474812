"""Bytes from a client -> the model's uint8 input: decoding (:func:`decode_image`) and the model's own
resize and crop (:class:`Preprocessor`), two steps that share one private contract: a JPEG much larger
than the model input is decoded at a reduced scale (``DRAFTED_FROM`` records how), and the resize and
crop then map the model's crop back onto the full-size image.

Decoding: every failure a client can cause is an :class:`~.errors.ImageError` with a 4xx status: the
size of the image is checked from its header before any pixel is decoded, and whatever the decoder
raises on broken data becomes a 422 instead of a 500.

Preprocessing follows the model's data config (resize, crop, normalise), split in two. The geometric
steps of timm's evaluation transform (resize, crop) run per image in the preprocessing threads and
yield a uint8 [3, H, W] tensor. Scaling to [0, 1] and normalising run once per batch in the inference
worker, on the model's device. That keeps torch's multi-threaded kernels out of the preprocessing
threads (on a small CPU they would fight the inference thread for cores) and queues a quarter of the
bytes.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform, resolve_model_data_config
from timm.data.transforms import MaybeToTensor
from torch import nn
from torchvision import transforms
from torchvision.transforms.functional import pil_modes_mapping

from .errors import ImageError

log = logging.getLogger(__name__)

# Composited behind transparent pixels: ImageNet photos have no alpha, and white is what a viewer shows.
BACKGROUND = (255, 255, 255)


def decode_image(data: bytes, max_pixels: int, reduce_to: int | None = None) -> Image.Image:
    """Decode ``data`` into an upright RGB image of at most ``max_pixels`` pixels.

    With ``reduce_to``, a JPEG whose shorter side is at least twice that long is decoded at 1/2, 1/4
    or 1/8 scale (libjpeg's DCT scaling: far less work and memory than decoding every pixel), never
    below twice ``reduce_to`` on the shorter side, so that the resize that follows still filters
    most of the reduction itself. The limit on pixels applies to the size the file declares."""
    if not data:
        raise ImageError(422, "the image is empty (0 bytes)")
    image = _open(data, max_pixels)
    if reduce_to and image.format == "JPEG":
        _draft(image, DRAFT_GAP * reduce_to)
    try:
        image.load()
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError...) on bad data
        raise ImageError(422, f"the {image.format or 'image'} data is truncated or corrupt ({exc})") from exc
    drafted_from = image.info.get(DRAFTED_FROM)
    orientation = image.getexif().get(ORIENTATION, 1) if drafted_from else 1
    image = _upright(image)
    if drafted_from:
        image.info[DRAFTED_FROM] = _displayed(drafted_from, orientation)
    return to_rgb(image)


DRAFT_GAP = 2
"""Reduced-scale JPEG decoding keeps the shorter side at least this many times the size asked for."""


DRAFTED_FROM = "tome_drafted_from"
"""``image.info`` key set on an image decoded at 1/scale size: (width, height, scale, x offset,
y offset) of the full-size upright image (see ``_displayed``). A drafted side is
``ceil(side / scale)`` pixels, so one row or column stands for a partial block; resizing maps
positions through the full size to keep the geometry of a full decode."""


def _draft(image: Image.Image, short_side: int) -> None:
    width, height = image.size
    shorter = min(width, height)
    if shorter < 2 * short_side:
        return  # no scale of 1/2 or less keeps the shorter side long enough
    factor = shorter / short_side  # draft keeps both sides at least this size
    try:
        drafted = image.draft(image.mode, (int(width / factor), int(height / factor)))
    except Exception as exc:  # an odd JPEG: decode it at full size, as without the option
        log.info("reduced-scale JPEG decoding unavailable: %s", exc)
        return
    if drafted is not None and image.size != (width, height):
        image.info[DRAFTED_FROM] = (width, height, round(width / drafted[1][2]), 0, 0)


def _displayed(drafted_from: tuple[int, ...], orientation: int) -> tuple[int, ...]:
    """``DRAFTED_FROM`` of the file's pixels -> of the upright image: (width, height, scale, x offset,
    y offset). A side of ``n`` pixels drafts to ``ceil(n / scale)`` pixels whose last one stands for
    a partial block; where the EXIF turn moves that block to the start of an axis, the upright
    image's pixel ``i`` starts at ``i * scale - offset`` of the full-size upright image."""
    width, height, scale = drafted_from[:3]
    pad_x, pad_y = -width % scale, -height % scale
    offsets = {  # which of the file's padded ends comes first on each upright axis
        2: (pad_x, 0),
        3: (pad_x, pad_y),
        4: (0, pad_y),
        5: (0, 0),
        6: (pad_y, 0),
        7: (pad_y, pad_x),
        8: (0, pad_x),
    }
    off_x, off_y = offsets.get(orientation, (0, 0))
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return (width, height, scale, off_x, off_y)


ORIENTATION = 0x0112


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageError(
            415,
            "the upload is not an image in a format this server can read "
            "(JPEG, PNG, WebP, GIF, BMP, TIFF, ...)",
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(413, f"the image has too many pixels ({exc})") from exc
    except Exception as exc:
        raise ImageError(422, f"the image header is corrupt ({exc})") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(422, f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            413,
            f"the image is {width}x{height} = {width * height} pixels, more than the limit of {max_pixels}",
        )
    return image


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, so the model sees the photo the way a viewer shows it."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # a broken EXIF block should not cost the client its answer
        log.info("ignoring unreadable EXIF orientation: %s", exc)
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha over white, 16-bit and float scaled, CMYK converted."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        image = _scale_to_8bit(image)
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(422, f"cannot convert an image in colour mode {image.mode} to RGB") from exc


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale with more than 8 bits (16-bit PNG/TIFF, float TIFF) to 'L'. PIL's own conversion
    clips at 255 instead of scaling, which would turn most 16-bit photos white."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:  # 'I' and 'F' carry no bit depth: infer the range from the data
        peak = float(values.max()) if values.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0 if peak <= 255.0 else 255.0 / 65535.0
    return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8))  # 2-D uint8: mode L


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
