"""Start-up: create each model, load its weights, patch it for token merging, describe it.

The description (:class:`LoadedModel`) takes its ToMe facts (input tokens, largest useful r, cost
table) from the library (``tome.input_tokens``, ``tome.largest_useful_r``, ``tome.cost_table``), so
the server, tome-eval and tome-bench agree.

Weights come from one of three places, and the source is reported with every answer:
``pretrained`` (timm's weights through the model hub, cached under ``HF_HOME``), a local file
(safetensors, or a torch file read with ``weights_only=True``), or ``random`` (only when asked).
Any problem raises :class:`StartupError` with a message that says what to do about it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from timm.data import ImageNetInfo, infer_imagenet_subset
from torch import nn

import tome
from tome_runtime import hardware
from tome_runtime import weights as weights_io

from .config import Settings
from .images import Preprocessor
from .params import RLimits

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """A model cannot be served; the message tells the operator how to fix it."""


@dataclass(frozen=True)
class LoadedModel:
    """A patched model and its description. Only its inference worker's thread calls ``module``."""

    name: str
    module: nn.Module
    weights: str
    device: torch.device
    dtype: torch.dtype
    preprocessor: Preprocessor
    labels: list[str]
    num_tokens: int
    """Tokens entering the first block, prefix tokens included."""
    limits: RLimits
    """The r it accepts, its default r and what r=auto may choose (params.py)."""
    costs: list[tome.RCost]
    """Analytical GMACs of every r up to its ceiling (``tome.cost_table``)."""
    notes: list[str] = field(default_factory=list)
    dtype_reason: str = "set explicitly"
    """Why the model runs in ``dtype`` (``--dtype auto`` names the hardware feature)."""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def depth(self) -> int:
        return len(self.module.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.module.num_prefix_tokens)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.module.patch_embed.patch_size)

    def token_counts(self, r: int) -> list[int]:
        return tome.token_counts(self.num_tokens, self.depth, r, self.num_prefix_tokens)


def class_labels(model: nn.Module) -> list[str]:
    """One label per output class; ``"class <i>"`` where the model's label set is unknown."""
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    subset = infer_imagenet_subset(model) if num_classes else None
    if subset is not None:
        info = ImageNetInfo(subset)
        if info.num_classes() == num_classes:
            return [info.index_to_description(i) for i in range(num_classes)]
    return [f"class {i}" for i in range(num_classes)]


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
        module.merge_rule = settings.default_merge  # the rule of requests that name none
    except tome.UnsupportedModelError as exc:
        raise StartupError(f"{name} cannot be served with token merging: {exc}") from exc
    if not module.num_classes:
        notes.append("no classifier head (num_classes=0): /classify is refused, /visualize works")
    module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    limits = RLimits.for_model(
        name,
        tome.largest_useful_r(module),
        max_r=settings.max_r,
        auto_max_r=settings.auto_max_r,
        default=settings.default_r,
        default_is_explicit="default_r" in settings.model_fields_set,
    )
    notes += limits.notes
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
        limits=limits,
        costs=tome.cost_table(module, range(limits.ceiling + 1)),
        notes=notes,
    )


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
