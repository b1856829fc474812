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
