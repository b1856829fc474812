"""Bytes from a client -> a validated RGB PIL image, or an :class:`ImageError` that says what is wrong.

Every failure a client can cause is an :class:`~.errors.ImageError` with a 4xx status: the size of
the image is checked from its header before any pixel is decoded, and whatever the decoder raises
on broken data becomes a 422 instead of a 500.
"""

from __future__ import annotations

import io
import logging
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

log = logging.getLogger(__name__)

# Composited behind transparent pixels: ImageNet photos have no alpha, and white is what a viewer shows.
BACKGROUND = (255, 255, 255)


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an upright RGB image of at most ``max_pixels`` pixels."""
    if not data:
        raise ImageError(422, "the image is empty (0 bytes)")
    image = _open(data, max_pixels)
    try:
        image.load()
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, ValueError...) on bad data
        raise ImageError(422, f"the {image.format or 'image'} data is truncated or corrupt ({exc})") from exc
    image = _upright(image)
    return to_rgb(image)


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
