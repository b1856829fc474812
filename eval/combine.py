"""ToMe stacked with other optimisations: torch.compile, fp16/bf16 autocast, dynamic int8 Linear layers.

Every cell (optimisation x r) is timed in the same interleaved run as the plain fp32 model at r=0,
so the speedup matrix compares like with like. With a folder, each cell's top-1 agreement and feature
cosine against plain fp32 at r=0 (and its accuracy, when labelled) show what the speed costs.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch._dynamo.utils
import torch.nn as nn

import tome_bench.timing

from .errors import EvalInputError
from .metrics import Outputs, Quality
from .runner import Heads, Variant, heads, outputs_at

BASELINE = "fp32"
_PARTS = ("compile", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class Optimisation:
    """One row of the matrix: a '+'-joined set of parts, e.g. 'compile+bf16'; 'fp32' is none."""

    name: str
    compile: bool = False
    autocast: torch.dtype | None = None
    int8: bool = False


def default_optimisations(device: torch.device) -> str:
    if device.type == "cuda":
        return "compile,fp16,bf16,compile+fp16"
    return "compile,bf16,int8"


def parse_optimisations(text: str, device: torch.device) -> list[Optimisation]:
    """'compile,bf16,int8' -> the fp32 baseline plus those rows, checked against the device."""
    rows = [Optimisation(BASELINE)]
    for name in (n.strip() for n in text.split(",")):
        if not name or name == BASELINE:
            continue
        parts = name.split("+")
        unknown = [p for p in parts if p not in _PARTS]
        if unknown:
            raise EvalInputError(
                f"unknown optimisation {unknown[0]!r} in {name!r}; combine "
                f"{', '.join(_PARTS)} with '+', e.g. compile+bf16"
            )
        rows.append(_checked(name, set(parts), device))
    return list({row.name: row for row in rows}.values())


def _checked(name: str, parts: set[str], device: torch.device) -> Optimisation:
    if {"bf16", "fp16"} <= parts:
        raise EvalInputError(f"{name}: choose one of bf16 and fp16")
    if "int8" in parts and parts & {"bf16", "fp16"}:
        raise EvalInputError(
            f"{name}: dynamic int8 Linear layers run on float32 activations; do not stack them with autocast"
        )
    if "int8" in parts and device.type != "cpu":
        raise EvalInputError(f"{name}: dynamic int8 quantisation runs on the CPU only")
    dtype = torch.bfloat16 if "bf16" in parts else torch.float16 if "fp16" in parts else None
    if dtype is not None and not autocast_supported(device, dtype):
        raise EvalInputError(f"{name}: {device.type} autocast to {dtype} is not supported on this machine")
    return Optimisation(name, compile="compile" in parts, autocast=dtype, int8="int8" in parts)


def autocast_supported(device: torch.device, dtype: torch.dtype) -> bool:
    if not torch.amp.is_autocast_available(device.type):
        return False
    return not (device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported())


def quantise_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linear layers hold int8 weights and quantise activations per call.

    torch.ao.quantization is deprecated in favour of the separate torchao package, but still ships
    with torch and runs on fbgemm's CPU kernels; using it avoids a dependency.
    """
    quantization = getattr(torch.ao, "quantization", None)
    if quantization is None or not hasattr(quantization, "quantize_dynamic"):
        raise EvalInputError("this torch has no torch.ao.quantization.quantize_dynamic: int8 is unavailable")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        return quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Callable[[], AbstractContextManager]:
    if dtype is None:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=dtype)


def _padded(variant: Variant, batch_size: int) -> Variant:
    """Pads a short last batch by repeating its last image, so compiled graphs see one batch size."""

    def run(images: torch.Tensor) -> Outputs:
        count = images.shape[0]
        if count >= batch_size:
            return variant(images)
        fill = images[-1:].expand(batch_size - count, *images.shape[1:])
        out = variant(torch.cat([images, fill]))
        return Outputs(out.features[:count], None if out.logits is None else out.logits[:count])

    return run


@dataclass
class Cell:
    optimisation: str
    r: int
    first_call_seconds: float | None = None
    """The first call: for compiled rows this is the compile time (plus one forward pass)."""
    graphs: int | None = None
    """Graphs dynamo compiled in the first call (compiled rows): each graph break adds one."""
    seconds: float | None = None
    images_per_second: float | None = None
    speedup: float | None = None
    quality: Quality | None = None
    top1_drop: float | None = None
    error: str | None = None


def build_variants(
    model: nn.Module, rows: list[Optimisation], r_values: list[int], device: torch.device, batch_size: int
) -> tuple[dict[tuple[str, int], Variant], dict[tuple[str, int], Cell]]:
    """One variant per (row, r); a row that cannot be built gets an error cell instead of a crash."""
    variants: dict[tuple[str, int], Variant] = {}
    cells: dict[tuple[str, int], Cell] = {}
    for row in rows:
        try:
            forward = _forward_for(model, row)
        except Exception as error:  # e.g. a quantisation backend missing from this torch build
            for r in r_values:
                cells[row.name, r] = Cell(row.name, r, error=f"{type(error).__name__}: {error}")
            continue
        for r in r_values:
            variant = outputs_at(forward, r, _autocast(device, row.autocast))
            variants[row.name, r] = _padded(variant, batch_size) if row.compile else variant
            cells[row.name, r] = Cell(row.name, r)
    return variants, cells


def _forward_for(model: nn.Module, row: Optimisation) -> Heads:
    target = quantise_int8(model) if row.int8 else model
    forward = heads(target)
    # dynamic=False: one static graph per r and batch size, which lets inductor specialise shapes.
    return torch.compile(forward, dynamic=False) if row.compile else forward


def warm_up(
    variants: dict[tuple[str, int], Variant],
    cells: dict[tuple[str, int], Cell],
    images: torch.Tensor,
    device: torch.device,
) -> dict[tuple[str, int], Variant]:
    """Call every variant once (compiling the compiled ones); returns the variants that worked."""
    working = {}
    with torch.inference_mode():
        for key, variant in variants.items():
            graphs_before = _graphs_compiled()
            start = time.perf_counter()
            try:
                variant(images)
                tome_bench.timing.synchronize(device)
            except Exception as error:  # a compile or kernel failure marks this cell, not the whole run
                cells[key].error = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                continue
            cells[key].first_call_seconds = time.perf_counter() - start
            if "compile" in key[0]:
                cells[key].graphs = _graphs_compiled() - graphs_before
            working[key] = variant
    return working


def _graphs_compiled() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def recompile_limits(depth: int, r_values: list[int], rows: list[Optimisation]) -> dict[str, int]:
    """Dynamo limits big enough for a graph per r, batch size and compiled row. Past its default of 8
    entries per code object dynamo silently runs the rest eagerly, which would corrupt the timing."""
    compiled = sum(1 for row in rows if row.compile) or 1
    limit = max(8, 4 * depth * len(r_values) * compiled)
    return {"recompile_limit": limit, "accumulated_recompile_limit": max(256, 16 * limit)}


def fill_cells(
    cells: dict[tuple[str, int], Cell],
    seconds: dict[Hashable, float] | None,
    quality: dict[Hashable, Quality] | None,
    batch_size: int,
) -> None:
    base_seconds = seconds.get((BASELINE, 0)) if seconds else None
    base_top1 = quality[(BASELINE, 0)].top1 if quality and (BASELINE, 0) in quality else None
    for key, cell in cells.items():
        if seconds and key in seconds:
            cell.seconds = seconds[key]
            cell.images_per_second = batch_size / seconds[key]
            cell.speedup = base_seconds / seconds[key] if base_seconds else None
        if quality and key in quality:
            cell.quality = quality[key]
            top1 = quality[key].top1
            cell.top1_drop = None if base_top1 is None or top1 is None else base_top1 - top1
