"""Start-up: create each model, load its weights, patch it for token merging, describe it.

Weights come from one of three places, and the source is reported with every answer:
``pretrained`` (timm's weights through the model hub, cached under ``HF_HOME``), a local file
(safetensors, or a torch file read with ``weights_only=True``), or ``random`` (only when asked).
Any problem raises :class:`StartupError` with a message that says what to do about it.
"""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

import timm
import torch
from torch import nn

import tome

from .config import Settings
from .labels import class_labels
from .models import LoadedModel, input_tokens, largest_useful_r, r_costs
from .preprocess import Preprocessor

log = logging.getLogger(__name__)

RANDOM_SEED = 0
"""``--weights random`` is seeded, so every process serves the same random model."""


class StartupError(RuntimeError):
    """A model cannot be served; the message tells the operator how to fix it."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StartupError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def load_model(name: str, settings: Settings) -> LoadedModel:
    """Create, load, patch and describe one model (not yet warmed: its worker does that)."""
    device, dtype = resolve_device(settings.device), resolve_dtype(settings.dtype)
    if not timm.is_model(name):
        raise StartupError(f"timm has no model named {name!r} (see timm.list_models())")
    module, weights, notes = _create(name, settings.weights, settings.model_kwargs)
    try:
        tome.patch(module)
    except tome.UnsupportedModelError as exc:
        raise StartupError(f"{name} cannot be served with token merging: {exc}") from exc
    if not module.num_classes:
        notes.append("no classifier head (num_classes=0): /classify is refused, /visualize works")
    module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    r_max = largest_useful_r(module)
    if settings.max_r is not None:
        r_max = min(r_max, settings.max_r)
    for note in notes:
        log.warning("%s: %s", name, note)
    return LoadedModel(
        name=name,
        module=module,
        weights=weights,
        device=device,
        dtype=dtype,
        preprocessor=Preprocessor.for_model(module),
        labels=class_labels(module),
        num_tokens=input_tokens(module),
        r_max=r_max,
        default_r=min(settings.default_r, r_max),
        costs=r_costs(module, r_max),
        notes=notes,
    )


def _create(name: str, weights: str, kwargs: dict) -> tuple[nn.Module, str, list[str]]:
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return _timm_model(name, False, kwargs), "random", []
    if weights == "pretrained":
        return _pretrained(name, kwargs), "pretrained", []
    return _from_file(name, Path(weights).expanduser(), kwargs)


def _timm_model(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise StartupError(f"TOME_MODEL_KWARGS {kwargs} do not fit {name}: {exc}") from exc


def _pretrained(name: str, kwargs: dict) -> nn.Module:
    try:
        return _timm_model(name, True, kwargs)
    except StartupError:
        raise
    except Exception as exc:  # the hub client raises many kinds of network and cache errors
        raise StartupError(
            f"could not obtain pretrained weights for {name} ({type(exc).__name__}: {exc}).\n"
            "Without network access, either\n"
            f"  - download them once where there is network (they are cached under HF_HOME), or\n"
            "  - point --weights / TOME_WEIGHTS at a local .safetensors (preferred) or .pth file, or\n"
            "  - pass --weights random to try the API with untrained weights (predictions are meaningless)."
        ) from exc


def _from_file(name: str, path: Path, kwargs: dict) -> tuple[nn.Module, str, list[str]]:
    if not path.is_file():
        raise StartupError(
            f"--weights {path}: no such file. Use 'pretrained', 'random' or the path of a weights file."
        )
    state = read_state_dict(path)
    module = _timm_model(name, False, kwargs)
    state = _fit_to_model(module, state)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise StartupError(f"{path} does not fit {name} {kwargs or ''}: {exc}") from exc
    head = _classifier_prefixes(module)
    body_missing = [key for key in missing if not key.startswith(head)]
    if unexpected or body_missing:
        raise StartupError(
            f"{path} does not fit {name} {kwargs or ''}: "
            f"missing {body_missing[:8]}, unexpected {unexpected[:8]}"
        )
    if missing:
        return module, f"{path} (no classifier head in the file: head is random)", [
            f"{path} has no weights for the classifier head ({', '.join(missing)}); the head is random, so "
            "/classify predictions are meaningless. Merge maps (/visualize) use the loaded backbone. "
            "Pass --model-kwargs '{\"num_classes\": 0}' to serve the backbone without a head."
        ]
    return module, str(path), []


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain state_dict from a safetensors file, or a torch file that holds only tensors."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise StartupError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise StartupError(
            f"{path} holds Python objects besides tensors, which this server refuses to unpickle "
            "(weights_only=True). Save a plain state_dict, or better, a safetensors file. "
            f"({str(exc).splitlines()[0]})"
        ) from exc
    except Exception as exc:
        raise StartupError(f"{path} is not a readable torch file: {exc}") from exc
    return _unwrap(state, path)


def _unwrap(state: object, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints wrap the weights; DataParallel prefixes every key with 'module.'.
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StartupError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return {key.removeprefix("module."): value for key, value in state.items()}


def _fit_to_model(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply the model family's own checkpoint filter (key renames, position-embedding resampling
    to the model's image size), as timm does for pretrained weights."""
    family = sys.modules.get(type(module).__module__)
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    return filter_fn(state, module) if filter_fn is not None else state


def _classifier_prefixes(module: nn.Module) -> tuple[str, ...]:
    names = module.pretrained_cfg.get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)
