"""Upload bytes -> RGB image: every colour mode converted, EXIF applied, bad data a clear 4xx."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from serverutil import encode

from tome_serve.images import ImageError, decode_image

LIMIT = 10_000_000


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))


def test_rgb_jpeg_round_trip() -> None:
    image = decode_image(encode(Image.new("RGB", (40, 30), (200, 20, 20)), "JPEG", quality=95), LIMIT)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.abs(np.asarray(image, dtype=int)[5, 5] - [200, 20, 20]).max() < 8


@pytest.mark.parametrize(
    ("image", "fmt", "expected"),
    [
        (Image.new("L", (8, 8), 77), "PNG", (77, 77, 77)),
        (Image.new("1", (8, 8), 1), "BMP", (255, 255, 255)),
        (Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4), "GIF", (10, 200, 30)),
        (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
        (Image.new("RGBA", (8, 8), (0, 0, 255, 255)), "PNG", (0, 0, 255)),
        (Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG", (255, 255, 255)),  # transparent: over white
        (Image.new("LA", (8, 8), (0, 0)), "PNG", (255, 255, 255)),
    ],
    ids=["greyscale", "1-bit", "palette", "cmyk", "opaque-alpha", "transparent", "grey-alpha"],
)
def test_colour_modes_become_rgb(image: Image.Image, fmt: str, expected: tuple[int, int, int]) -> None:
    decoded = decode_image(encode(image, fmt), LIMIT)
    assert decoded.mode == "RGB"
    assert decoded.getpixel((4, 4)) == expected


def test_transparent_palette_image_is_composited() -> None:
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    decoded = decode_image(encode(palette, "PNG", transparency=0), LIMIT)
    assert decoded.getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_is_scaled_not_clipped() -> None:
    values = np.full((6, 6), 32768, dtype=np.uint16)  # mid grey in 16 bits
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert decode_image(data, LIMIT).getpixel((2, 2)) == (128, 128, 128)


def test_float_image_is_scaled() -> None:
    data = encode(Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), "TIFF")
    assert decode_image(data, LIMIT).getpixel((1, 1)) == (128, 128, 128)


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95), LIMIT)
    assert decoded.size == (20, 40)
    assert sum(decoded.getpixel((10, 5))) > 600  # the white half is now on top
    assert sum(decoded.getpixel((10, 35))) < 100


def test_empty_upload_is_422() -> None:
    with pytest.raises(ImageError) as error:
        decode_image(b"", LIMIT)
    assert error.value.status_code == 422 and "empty" in error.value.detail


def test_non_image_is_415() -> None:
    with pytest.raises(ImageError) as error:
        decode_image(b"%PDF-1.7 certainly not an image " * 10, LIMIT)
    assert error.value.status_code == 415


def test_truncated_image_is_422() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(ImageError) as error:
        decode_image(data[: len(data) // 2], LIMIT)
    assert error.value.status_code == 422 and "truncated" in error.value.detail


def test_too_many_pixels_is_refused_from_the_header() -> None:
    # 50000 x 50000 declared, a few bytes of data: decoding would fail differently (truncated),
    # so a 413 proves the size was checked before decoding.
    with pytest.raises(ImageError) as error:
        decode_image(png_header_only(50_000, 50_000), LIMIT)
    assert error.value.status_code == 413 and "2500000000 pixels" in error.value.detail


def test_pixel_limit_is_the_configured_one() -> None:
    data = encode(Image.new("RGB", (101, 100)), "PNG")
    assert decode_image(data, 101 * 100).size == (101, 100)
    with pytest.raises(ImageError) as error:
        decode_image(data, 100 * 100)
    assert error.value.status_code == 413
