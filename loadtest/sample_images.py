"""Images for the load test: real photos from a folder, or synthetic pictures of several sizes.

Uploads of different sizes exercise the server's decode and resize path as real clients would: a
thumbnail, a model-sized crop, camera-sized photos in both orientations.
"""

from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from PIL import Image, ImageDraw

CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}

# (width, height, format): small PNG, model-sized JPEG, and larger JPEG photos in both orientations.
SYNTHETIC_SPECS: tuple[tuple[int, int, str], ...] = (
    (96, 96, "PNG"),
    (224, 224, "JPEG"),
    (640, 480, "JPEG"),
    (480, 640, "JPEG"),
    (1280, 960, "JPEG"),
)

MAX_FOLDER_IMAGES = 64
"""Bound on how many files a folder contributes: every Locust process keeps them all in memory."""


@dataclass(frozen=True)
class SampleImage:
    name: str
    data: bytes
    content_type: str

    @property
    def multipart(self) -> tuple[str, bytes, str]:
        """The ``files={"file": ...}`` tuple for a multipart upload."""
        return (self.name, self.data, self.content_type)

    @cached_property  # every embeddings request sends some: encode each image once
    def data_uri(self) -> str:
        """The image as a base64 ``data:`` URI, as an embeddings request's ``input`` holds it."""
        return f"data:{self.content_type};base64,{base64.b64encode(self.data).decode('ascii')}"


def synthetic_image(width: int, height: int, fmt: str, seed: int) -> SampleImage:
    """A picture with a colour gradient and random shapes, so JPEG sizes look like a photo's, not noise."""
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    tint = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    image = Image.blend(image, tint, 0.5)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1, y1 = x0 + rng.randrange(8, width // 2 + 9), y0 + rng.randrange(8, height // 2 + 9)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=90)
    suffix = ".png" if fmt == "PNG" else ".jpg"
    return SampleImage(f"synthetic-{width}x{height}{suffix}", buffer.getvalue(), CONTENT_TYPES[suffix])


def synthetic_images(seed: int = 0) -> list[SampleImage]:
    return [synthetic_image(w, h, fmt, seed + i) for i, (w, h, fmt) in enumerate(SYNTHETIC_SPECS)]


def folder_images(folder: Path, limit: int = MAX_FOLDER_IMAGES) -> list[SampleImage]:
    """Up to ``limit`` image files from ``folder`` (sorted by name, so runs are repeatable)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"LOADTEST_IMAGES={folder} is not a directory")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in CONTENT_TYPES and p.is_file())
    if not files:
        raise FileNotFoundError(f"LOADTEST_IMAGES={folder} has no {'/'.join(CONTENT_TYPES)} files")
    return [SampleImage(p.name, p.read_bytes(), CONTENT_TYPES[p.suffix.lower()]) for p in files[:limit]]


def load_sample_images(folder: str | None) -> list[SampleImage]:
    """Images from ``folder`` when given (``LOADTEST_IMAGES``), synthetic ones otherwise."""
    return folder_images(Path(folder)) if folder else synthetic_images()
