"""Run variants of one model (several r, or optimisations x r) over a folder and over a timing batch."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm import tqdm

import tome
import tome_bench.timing
from tome_runtime import fidelity

from .data import Batch, ImageFiles, batches
from .metrics import Outputs, Tally, cosine

Variant = Callable[[torch.Tensor], Outputs]
"""One way of running the model: images [B, 3, H, W] on the device -> outputs."""


Heads = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
"""images -> (pre-logits features, logits or None): what :func:`outputs_at` runs, maybe compiled."""


def heads(model: nn.Module) -> Heads:
    """The model's pre-logits features and logits from one ``forward_features`` pass.

    The second head call (pooling and one Linear) costs well under 1% of a ViT's forward pass.
    """
    has_classifier = bool(getattr(model, "num_classes", 0))

    def run(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = model.forward_features(images)
        pre_logits = model.forward_head(features, pre_logits=True)
        return pre_logits, model.forward_head(features) if has_classifier else None

    return run


def outputs_at(
    forward: Heads, r: int, autocast: Callable[[], AbstractContextManager] = nullcontext
) -> Variant:
    """``forward`` at merge schedule ``r`` as a :data:`Variant`.

    The merging context is entered outside ``forward``: torch.compile cannot trace
    ``ContextVar.set``, so entering it inside a compiled ``forward`` would only add a graph break.
    Dynamo guards on the r that the patched model reads, so it keeps graphs per r and input shape.
    """

    def run(images: torch.Tensor) -> Outputs:
        with autocast(), tome.merging(r=r):
            pre_logits, logits = forward(images)
        return Outputs(pre_logits.float(), None if logits is None else logits.float())

    return run


@dataclass
class PerImage:
    """Per-image results in listing order, for the per-image CSV."""

    indices: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    top1: dict[Hashable, list[int]] = field(default_factory=dict)
    cosine: dict[Hashable, list[float]] = field(default_factory=dict)
    top5_overlap: dict[Hashable, list[float]] = field(default_factory=dict)
    """Share of the reference's top-5 classes also in this top-5 (the server's fidelity comparison)."""

    def add(self, key: Hashable, out: Outputs, reference: Outputs) -> None:
        if out.top1 is not None:
            self.top1.setdefault(key, []).extend(out.top1.tolist())
        self.cosine.setdefault(key, []).extend(cosine(out.features, reference.features).tolist())
        if out.logits is not None and reference.logits is not None:
            compared = fidelity.Comparison.of(
                fidelity.Outputs(reference.logits, reference.features),
                fidelity.Outputs(out.logits, out.features),
            )
            self.top5_overlap.setdefault(key, []).extend(compared.top5_overlap or [])


@dataclass
class FolderRun:
    tallies: dict[Hashable, Tally]
    unreadable: list[int]
    """Listing positions of the files that failed to decode."""
    per_image: PerImage
    cosine_between_images: float | None = None
    """Mean cosine between the reference features of different images (up to :data:`SCALE_SAMPLE`
    spread evenly over the listing): the scale against which a cosine to r=0 is small or large."""


SCALE_SAMPLE = 256


def mean_cosine_between(features: torch.Tensor) -> float | None:
    """Mean cosine over all pairs of different rows of ``features`` [N, C]; None for fewer than 2."""
    if features.shape[0] < 2:
        return None
    unit = torch.nn.functional.normalize(features, dim=-1)
    similarity = unit @ unit.T
    off_diagonal = ~torch.eye(len(unit), dtype=torch.bool, device=unit.device)
    return float(similarity[off_diagonal].mean())


def evaluate(
    variants: Mapping[Hashable, Variant],
    reference: Hashable,
    dataset: ImageFiles,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool = True,
) -> FolderRun:
    """Run every variant over every image; each is compared with ``reference`` on the same batch."""
    if reference not in variants:
        raise ValueError(f"the reference {reference!r} must be one of the variants")
    tallies = {key: Tally() for key in variants}
    per_image = PerImage()
    unreadable: list[int] = []
    sample: list[torch.Tensor] = []
    # Spread over the listing, so sorted class folders do not make the pairs mostly same-class ones.
    step = max(1, -(-len(dataset) // SCALE_SAMPLE))
    with (
        tqdm(total=len(dataset), unit="img", disable=not progress, desc="evaluating") as bar,
        torch.inference_mode(),
    ):
        for batch in batches(dataset, batch_size, workers):
            unreadable += batch.unreadable
            if len(batch.images):
                ref = _run_batch(variants, reference, batch, device, tallies, per_image)
                sample.append(ref.features[(batch.indices % step == 0).to(ref.features.device)])
            bar.update(len(batch.images) + len(batch.unreadable))
            if batch.unreadable:
                bar.set_postfix(unreadable=len(unreadable))
    scale = mean_cosine_between(torch.cat(sample)[:SCALE_SAMPLE]) if sample else None
    return FolderRun(tallies, unreadable, per_image, scale)


def _run_batch(
    variants: Mapping[Hashable, Variant],
    reference: Hashable,
    batch: Batch,
    device: torch.device,
    tallies: dict[Hashable, Tally],
    per_image: PerImage,
) -> Outputs:
    images = batch.images.to(device, non_blocking=True)
    ref = variants[reference](images)
    per_image.indices += batch.indices.tolist()
    per_image.labels += batch.labels.tolist()
    for key, variant in variants.items():
        out = ref if key == reference else variant(images)
        tallies[key].add(out, ref, batch.labels.to(out.features.device))
        per_image.add(key, out, ref)
    return ref


def timing_batch(
    images: torch.Tensor | None, batch_size: int, image_shape: tuple[int, int, int]
) -> torch.Tensor:
    """``batch_size`` images for timing: real ones repeated if given, else noise (speed does not depend
    on content: the token counts are fixed by r)."""
    if images is None or not len(images):
        return torch.randn(batch_size, *image_shape)
    repeats = -(-batch_size // len(images))
    return images.repeat(repeats, 1, 1, 1)[:batch_size]


@dataclass(frozen=True)
class Timing:
    """Seconds per batch of every variant in every interleaved round (index i: round i)."""

    rounds: dict[Hashable, list[float]]

    @property
    def seconds(self) -> dict[Hashable, float]:
        """Median seconds per batch of each variant."""
        return {key: tome_bench.timing.median(values) for key, values in self.rounds.items()}

    def speedups(self, reference: Hashable, key: Hashable) -> list[float]:
        """``key``'s speed relative to ``reference`` in each round: paired, so a slow round of the
        machine slows both and cancels out; how much the ratios still vary shows the noise."""
        return [ref / t for ref, t in zip(self.rounds[reference], self.rounds[key], strict=True)]


def seconds_per_batch(
    variants: Mapping[Hashable, Variant],
    images: torch.Tensor,
    rounds: int,
    device: torch.device,
    warmup: int = 1,
    progress: bool = True,
) -> Timing:
    """Every variant timed in turn in every round (tome_bench.timing), on one batch."""
    images = images.to(device)
    calls = {key: (lambda fn=fn: fn(images)) for key, fn in variants.items()}
    with tqdm(total=rounds, unit="round", disable=not progress, desc="timing") as bar:
        timed = tome_bench.timing.interleaved_rounds(
            {str(i): fn for i, fn in enumerate(calls.values())},
            rounds,
            warmup=warmup,
            device=device,
            on_round=lambda _: bar.update(1),
        )
    return Timing({key: timed[str(i)] for i, key in enumerate(calls)})
