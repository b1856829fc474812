"""Package lines: ``tome`` works with torch and timm alone, and nothing named ``server`` is installed."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What the [serve], [eval] and [bench] extras bring, plus the project's other packages. torch and timm
# stay importable, with what they depend on themselves (torchvision, Pillow, numpy, huggingface_hub,
# safetensors, pyyaml, and huggingface_hub's tqdm are timm's or torchvision's own requirements).
HIDDEN = [
    "fastapi",
    "starlette",
    "uvicorn",
    "prometheus_client",
    "pydantic",
    "pydantic_settings",
    "multipart",
    "python_multipart",
    "matplotlib",
    "httpx",
    "tome_serve",
    "tome_eval",
    "tome_bench",
]

SCRIPT = """
import importlib.abc, importlib.util, sys

HIDDEN = set({hidden!r})
attempts = []

class Hide(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # Finds the hidden packages (so probes like torch's find_spec see them) but fails to load them.

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        attempts.append(spec.name)
        raise ModuleNotFoundError(f"hidden by the test: {{spec.name}}", name=spec.name)

sys.meta_path.insert(0, Hide())
for name in list(sys.modules):
    if name.split(".")[0] in HIDDEN:
        del sys.modules[name]

import timm, torch
from PIL import Image
import tome

torch.manual_seed(0)
model = tome.patch(timm.create_model(
    "vit_tiny_patch16_224", pretrained=False, embed_dim=64, depth=4, num_heads=2, img_size=64,
).eval())
with torch.no_grad(), tome.merging(r=4, trace_source=True) as info:
    logits = model(torch.randn(1, 3, 64, 64))
assert logits.shape == (1, 1000), logits.shape
assert info.token_counts == tome.token_counts(17, 4, 4) == [13, 9, 5, 3], info.token_counts
assert 0 < tome.gmacs(model, 4) < tome.gmacs(model, 0)
assert [row.r for row in tome.cost_table(model)] == list(range(tome.largest_useful_r(model) + 1))
picture = tome.visualize(Image.new("RGB", (64, 64), "teal"), info.source[0], patch_size=16)
assert picture.size == (64, 64), picture.size
assert not attempts, attempts
print("tome works alone")
"""


def test_tome_works_with_only_torch_and_timm():
    """tome, run in a fresh interpreter where the web, eval and bench stacks cannot be imported."""
    script = textwrap.dedent(SCRIPT.format(hidden=HIDDEN))
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tome works alone" in result.stdout


def test_the_installed_distribution_has_no_package_named_server():
    """What `pip install -e .` recorded: the four packages, under their import names."""
    top_level = importlib.metadata.distribution("tome-serve").read_text("top_level.txt")
    assert top_level is not None
    assert set(top_level.split()) == {"tome", "tome_serve", "tome_eval", "tome_bench"}
    assert "tome-serve" not in importlib.metadata.packages_distributions().get("server", [])
