"""Start-up: create each model, load its weights, patch it for token merging, describe it.

Weights come from one of three places, and the source is reported with every answer:
``pretrained`` (timm's weights through the model hub, cached under ``HF_HOME``), a local file
(safetensors, or a torch file read with ``weights_only=True``), or ``random`` (only when asked).
Any problem raises :class:`StartupError` with a message that says what to do about it.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

import tome
from tome_runtime import hardware
from tome_runtime import weights as weights_io

from .config import Settings
from .labels import class_labels
from .models import LoadedModel
from .preprocess import Preprocessor

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A model cannot be served; the message tells the operator how to fix it."""


def resolve_device(name: str) -> torch.device:
    """:func:`tome_runtime.hardware.resolve_device`, failing the way every start-up problem fails."""
    try:
        return hardware.resolve_device(name)
    except hardware.DeviceError as exc:
        raise StartupError(str(exc)) from exc


def load_model(name: str, settings: Settings) -> LoadedModel:
    """Create, load, patch and describe one model (not yet warmed: its worker does that)."""
    device = resolve_device(settings.device)
    choice = hardware.resolve_dtype(settings.dtype, device)
    dtype = choice.dtype
    module, weights, notes = _create(name, settings.weights, settings.model_kwargs)
    try:
        tome.patch(module)
    except tome.UnsupportedModelError as exc:
        raise StartupError(f"{name} cannot be served with token merging: {exc}") from exc
    if not module.num_classes:
        notes.append("no classifier head (num_classes=0): /classify is refused, /visualize works")
    module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    r_max, default_r = _r_range(name, tome.largest_useful_r(module), settings, notes)
    for note in notes:
        log.warning("%s: %s", name, note)
    log.info("%s: %s on %s (%s)", name, str(dtype).removeprefix("torch."), device, choice.reason)
    return LoadedModel(
        name=name,
        module=module,
        weights=weights,
        device=device,
        dtype=dtype,
        dtype_reason=choice.reason,
        preprocessor=Preprocessor.for_model(module),
        labels=class_labels(module),
        num_tokens=tome.input_tokens(module),
        r_max=r_max,
        default_r=default_r,
        costs=tome.cost_table(module, range(r_max + 1)),
        notes=notes,
    )


def _r_range(
    name: str, useful: int, settings: Settings, notes: list[str]
) -> tuple[int, int | Literal["auto"]]:
    """The model's r range and default r (an integer, or "auto"). Settings beyond what the model can
    use are capped, with a note (logged, and listed by /models) rather than silently."""
    r_max = useful
    if settings.max_r is not None:
        if settings.max_r > useful:
            notes.append(
                f"--max-r / TOME_MAX_R is {settings.max_r}, above the largest useful r of {name} ({useful}); "
                f"r is capped at {useful}"
            )
        r_max = min(useful, settings.max_r)
    if settings.default_r == "auto":
        return r_max, "auto"
    if settings.default_r > r_max and "default_r" in settings.model_fields_set:
        notes.append(
            f"--default-r / TOME_DEFAULT_R is {settings.default_r}, above the largest r {name} accepts "
            f"({r_max}); its default r is {r_max}"
        )
    return r_max, min(settings.default_r, r_max)


def _create(name: str, weights: str, kwargs: dict) -> tuple[nn.Module, str, list[str]]:
    try:
        built = weights_io.create(name, weights, kwargs)
    except weights_io.WeightsError as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:  # the hub client raises many kinds of network and cache errors
        if weights != "pretrained":
            raise
        raise StartupError(
            f"could not obtain pretrained weights for {name} ({type(exc).__name__}: {exc}).\n"
            "Without network access, either\n"
            f"  - download them once where there is network (they are cached under HF_HOME), or\n"
            "  - point --weights / TOME_WEIGHTS at a local .safetensors (preferred) or .pth file, or\n"
            "  - pass --weights random to try the API with untrained weights (predictions are meaningless)."
        ) from exc
    if not built.missing_head:
        return built.model, built.source, []
    path = built.source
    return (
        built.model,
        f"{path} (no classifier head in the file: head is random)",
        [
            f"{path} has no weights for the classifier head ({', '.join(built.missing_head)}); the head is "
            "random, so /classify predictions are meaningless. Merge maps (/visualize) use the loaded "
            "backbone. Pass --model-kwargs '{\"num_classes\": 0}' to serve the backbone without a head."
        ],
    )
