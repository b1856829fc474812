"""Package lines: ``tome`` works with torch and timm alone, ``tome-eval`` and ``tome-bench`` without the
web stack, and nothing named ``server`` is installed."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

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
    "openapi_ui_bundles",
    "matplotlib",
    "httpx",
    "tome_runtime",
    "tome_serve",
    "tome_eval",
    "tome_bench",
]
WEB_STACK = ["fastapi", "starlette", "uvicorn"]

HIDE = """
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

    def exec_module(self, module):  # never reached: create_module refuses first
        raise AssertionError(module)

sys.meta_path.insert(0, Hide())
for name in list(sys.modules):
    if name.split(".")[0] in HIDDEN:
        del sys.modules[name]
"""

SCRIPT = (
    HIDE
    + """
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
)


# The tools and what they share, with the web stack and the server package hidden: importing their
# command modules must not reach for either, and a model must build through tome_runtime.
TOOLS_SCRIPT = (
    HIDE
    + """
import tome_bench.goals, tome_bench.speed, tome_eval.cli, tome_eval.commands, tome_runtime.hub
from tome_runtime.hardware import resolve_device, resolve_dtype
from tome_runtime.weights import create

built = create(
    "vit_tiny_patch16_224", "random", {{"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32}}
)
assert built.source == "random" and resolve_device("cpu").type == "cpu"
assert resolve_dtype("float32", "cpu").name == "float32"
assert not attempts, attempts
print("the tools work without the web stack")
"""
)


def run_hidden(script: str, hidden: list[str]) -> subprocess.CompletedProcess:
    """``script`` in a fresh interpreter where the ``hidden`` packages cannot be imported."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script.format(hidden=hidden))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tome_works_with_only_torch_and_timm():
    """tome, run in a fresh interpreter where the web, eval and bench stacks cannot be imported."""
    result = run_hidden(SCRIPT, HIDDEN)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tome works alone" in result.stdout


def test_eval_bench_and_runtime_work_without_the_web_stack():
    """tome-eval, tome-bench and tome_runtime with FastAPI, Starlette, uvicorn and tome_serve hidden."""
    result = run_hidden(TOOLS_SCRIPT, [*WEB_STACK, "tome_serve"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "the tools work without the web stack" in result.stdout


# ``python -m MODULE --help`` where some packages cannot be imported.
RUN_MODULE = (
    HIDE
    + """
import runpy
sys.argv = [{module!r}, "--help"]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""
)


@pytest.mark.parametrize(
    ("module", "hidden"),
    [
        ("tome_bench.serve", ["aiohttp", "httpx"]),  # only [serve] installed
        ("tome_bench.serve", WEB_STACK),  # only [bench] installed
        ("tome_bench.auto", ["httpx"]),
        ("tome_bench.shadow", ["prometheus_client"]),
        ("tome_bench.soak", ["aiohttp"]),
    ],
)
def test_server_benchmarks_name_the_missing_extras_in_one_line(module: str, hidden: list[str]):
    script = RUN_MODULE.replace("{module!r}", repr(module))
    result = run_hidden(script, hidden)
    assert result.returncode != 0 and not result.stdout, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "install the [bench] and [serve] extras" in line and "which is not installed" in line, line


REQUIREMENT = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?")
"""A requirement's distribution name and its extras, e.g. ``tome-serve[serve,eval]>=1``."""


def resolve_extra(extra: str) -> set[str]:
    """Every distribution ``pip install ".[extra]"`` asks for, following ``tome-serve[...]`` references."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {REQUIREMENT.match(requirement)[1].lower() for requirement in project["dependencies"]}
    wanted, seen = [extra], set()
    while wanted:
        name = wanted.pop()
        if name not in seen:
            seen.add(name)
            for requirement in project["optional-dependencies"][name]:
                distribution, extras = REQUIREMENT.match(requirement).groups()
                if distribution.lower() == project["name"]:
                    wanted += [part.strip() for part in extras.split(",")]
                else:
                    names.add(distribution.lower())
    return names


def test_eval_and_bench_extras_install_no_web_server():
    """`pip install ".[eval]"` (or [bench]) brings what the tools import, not FastAPI or uvicorn."""
    assert {"fastapi", "uvicorn"} <= resolve_extra("serve")  # the resolver sees what is there
    assert {"fastapi", "uvicorn", "selenium"} <= resolve_extra("dev")  # and follows references
    for extra in ("eval", "bench"):
        names = resolve_extra(extra)
        assert not names & {"fastapi", "uvicorn", "starlette"}, (extra, sorted(names))
    assert {"pillow", "tqdm", "matplotlib"} <= resolve_extra("eval")


def test_the_installed_distribution_has_no_package_named_server():
    """What `pip install -e .` recorded: the five packages, under their import names."""
    top_level = importlib.metadata.distribution("tome-serve").read_text("top_level.txt")
    assert top_level is not None
    assert set(top_level.split()) == {"tome", "tome_runtime", "tome_serve", "tome_eval", "tome_bench"}
    assert "tome-serve" not in importlib.metadata.packages_distributions().get("server", [])


def test_the_test_log_states_the_reason_of_every_skip():
    """CI runs pytest with pyproject's addopts: a -r option that reports skips ('s', or 'a' for all)."""
    addopts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    report = [option[2:] for option in addopts.split() if option.startswith("-r")]
    assert any(set(chars) & {"s", "a", "A"} for chars in report), addopts
