"""Merge rules at equal measured speed: quality against images/s, one curve per rule (tome.MERGE_RULES).

    python ../shared/tools/dinov2_small_weights.py dinov2_vits14.pth   # real DINOv2 ViT-S/14 weights
    python -m tome_bench.merge_rules --weights dinov2_vits14.pth --photos ../shared/data/photos --docs docs

Two models, every rule at every r:

* DINOv2 ViT-S/14 (real weights, 224 px, class-token embedding): cosine of each augmented view's
  embedding with the same view's at r=0, and instance-retrieval recall@1 (each view's nearest photo
  among all photos' r=0 embeddings, see :mod:`tome_eval.retrieval`).
* ViT-S/16 with timm's random weights, average-pooled (so that its prediction depends on the image):
  top-1 agreement of each view with r=0.

Speed is measured, not counted in FLOPs: every (rule, r) of one model is timed in the same rounds, in
turn, in this process, on one batch of views, and only ratios of calls in one round are used (each
r's speed-up over r=0). The rules differ only in their merge steps, by less than the whole model's
timing noise on a shared 2-core machine, so another rule's time is the first rule's plus the extra
time of its merge steps, timed alone at every layer's shapes. A rule is then compared with the first
one at the speeds the first one reached, its per-view scores interpolated linearly between its
points at that r and a neighbouring r; differences are paired over the same views and given with
two standard errors.
Writes ``merge-rules.md``, ``dinov2-curve.md`` and ``img/merge_rules.png`` into --docs; text below
the notes marker of an existing file is kept.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

import tome
import tome_runtime.weights
from tome.merge import bipartite_soft_matching, max_merge
from tome_eval.data import IMAGE_SUFFIXES
from tome_eval.metrics import cosine
from tome_eval.retrieval import augmented_views, nearest_hits
from tome_runtime.hardware import cpu_flags

from .speed import describe_machine
from .timing import interleaved_rounds, median

NOTES_MARKER = "<!-- notes: text below this line is kept when tome_bench.merge_rules rewrites the file -->"
DINOV2 = "vit_small_patch14_dinov2"
CLASSIFIER = "vit_small_patch16_224"
IMG_SIZE = 224

Scorer = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
"""(outputs at some r, outputs at r=0) -> per-view scores by metric name."""


@dataclass
class Point:
    rule: str
    r: int
    images_per_s: float
    """First rule: r=0's median rate times its median speed-up over r=0 in the same round. Other
    rules: the first rule's time per batch at the same r plus their merge steps' extra time."""
    spread: float
    """Interquartile range over median of r=0's calls, or of the first rule's per-round speed-ups."""
    scores: dict[str, torch.Tensor]
    """Per-view score by metric, float32 [views]."""
    time_vs_first: float = 1.0
    """Median over rounds of this variant's time over the first rule's at the same r, same round."""

    def mean(self, metric: str) -> float:
        return float(self.scores[metric].mean())


@dataclass
class Subject:
    title: str
    model: nn.Module
    views: torch.Tensor
    """[V, 3, H, W] the model's input for every view, in the timed dtype."""
    score: Scorer
    metrics: tuple[str, ...]
    r_values: list[int]
    curves: dict[str, list[Point]] = field(default_factory=dict)
    costs: dict[str, list[float]] = field(default_factory=dict)
    """Per rule after the first: its time over the first rule's at the same r and round, every r>0."""
    merge_seconds: dict[str, dict[int, float]] = field(default_factory=dict)
    """Per rule and r > 0: seconds of one forward pass's merge steps (median over rounds)."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tome_bench.merge_rules", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--weights", type=Path, required=True, help="DINOv2 ViT-S/14 timm state_dict file")
    parser.add_argument("--photos", type=Path, required=True, help="folder of photos (at least 2)")
    parser.add_argument("--views", type=int, default=8, help="augmented views per photo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the views")
    parser.add_argument("--r", nargs="+", default=["0,4,8,12,16,20,24"], metavar="R", help="r values")
    parser.add_argument("--batch-size", type=int, default=8, help="timed batch of views")
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per (rule, r)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="folder the reports are written to")
    args = parser.parse_args(argv)
    try:
        args.r = sorted({0, *tome.parse_r_values(args.r)})
    except ValueError as error:
        parser.error(str(error))
    if args.views < 1 or args.batch_size < 1 or args.rounds < 1:
        parser.error("--views, --batch-size and --rounds must be at least 1")
    if not args.weights.is_file():
        parser.error(f"{args.weights} is not a file (make it with the DINOv2 weights tool, see --help)")
    return args


def pick_dtype(choice: str) -> torch.dtype:
    """bfloat16 where the CPU multiplies it natively (avx512_bf16 or amx_bf16), else float32."""
    if choice != "auto":
        return getattr(torch, choice)
    native = {"avx512_bf16", "amx_bf16"} & set(cpu_flags())
    return torch.bfloat16 if native else torch.float32


def load_photos(folder: Path) -> list[Image.Image]:
    if not folder.is_dir():
        raise SystemExit(f"merge_rules: error: {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise SystemExit(
            f"merge_rules: error: {folder} holds {len(files)} photos; retrieval needs at least 2"
        )
    photos = []
    for path in files:
        with Image.open(path) as image:
            photos.append(image.convert("RGB"))
    return photos


def as_input(model: nn.Module, images: Sequence[Image.Image], dtype: torch.dtype) -> torch.Tensor:
    """The model's evaluation transform (resize, centre crop, normalise) of ``images``, stacked."""
    config = resolve_model_data_config(model)
    config["input_size"] = (3, *model.patch_embed.img_size)
    transform = create_transform(**config, is_training=False)
    return torch.stack([transform(image) for image in images]).to(dtype)


def dinov2(weights: Path, dtype: torch.dtype) -> nn.Module:
    kwargs = {"num_classes": 0, "img_size": IMG_SIZE}
    built = tome_runtime.weights.create(DINOV2, str(weights), kwargs)
    return tome.patch(built.model.eval()).to(dtype)


def random_classifier(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """ViT-S/16 with timm's random initialisation (the server's ``weights=random``), pooling the
    average of its patch tokens: through the class token, timm's initialisation gives every image the
    same top class, which would make top-1 agreement with r=0 trivially 1."""
    model = tome_runtime.weights.create(CLASSIFIER, "random", {"global_pool": "avg"}, seed).model.eval()
    return tome.patch(model).to(dtype)


def forward(model: nn.Module, x: torch.Tensor, r: int, rule: str, batch: int) -> torch.Tensor:
    """The model's float32 outputs for ``x``, ``batch`` images at a time."""
    with torch.inference_mode(), tome.merging(r=r, merge=rule):
        return torch.cat([model(chunk).float() for chunk in x.split(batch)])


def retrieval_scorer(gallery: torch.Tensor, owners: torch.Tensor) -> Scorer:
    def score(out: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"cosine": cosine(out, reference), "recall@1": nearest_hits(out, owners, gallery).float()}

    return score


def agreement_scorer(out: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"agreement": (out.argmax(dim=-1) == reference.argmax(dim=-1)).float()}


def _spread(seconds: list[float]) -> float:
    ordered = sorted(seconds)
    quarter = len(ordered) // 4
    return (ordered[-1 - quarter] - ordered[quarter]) / median(ordered)


def measure(subject: Subject, rules: Sequence[str], batch: int, rounds: int) -> None:
    """Fill ``subject.curves``: every rule's quality and speed at every r (r=0 is one variant)."""
    model, views = subject.model, subject.views
    reference = forward(model, views, 0, rules[0], batch)
    cells = [(rule, r) for rule in rules for r in subject.r_values if r > 0]

    def timed(r: int, rule: str) -> Callable[[], object]:
        sample = views[:batch]

        def call() -> object:
            with tome.merging(r=r, merge=rule):
                return model(sample)

        return call

    variants = {"r=0": timed(0, rules[0])} | {f"{rule} r={r}": timed(r, rule) for rule, r in cells}
    print(f"{subject.title}: timing {len(variants)} variants x {rounds} rounds", file=sys.stderr)
    seconds = interleaved_rounds(variants, rounds, warmup=2)
    base_rate, base = batch / median(seconds["r=0"]), subject.score(reference, reference)
    for rule in rules:
        subject.curves[rule] = [Point(rule, 0, base_rate, _spread(seconds["r=0"]), base)]
    # Only ratios of calls in the same round are used: the load of other processes, which drifts
    # over seconds, mostly cancels in them.
    first: dict[int, float] = {}
    positive = [r for r in subject.r_values if r > 0]
    for r in positive:
        speedups = _ratios(seconds["r=0"], seconds[f"{rules[0]} r={r}"])
        first[r] = base_rate * median(speedups)
        scores = subject.score(forward(model, views, r, rules[0], batch), reference)
        subject.curves[rules[0]].append(Point(rules[0], r, first[r], _spread(speedups), scores))
    _time_merge_steps(subject, rules, batch, rounds)
    for rule in rules[1:]:
        # The rules differ only in their merge steps, by less than the whole model's timing noise
        # here (the whole-model ratios stay in the report as a check): the difference is timed on
        # the merge steps alone, where it is resolvable, and added to the first rule's time.
        ratios = {r: _ratios(seconds[f"{rule} r={r}"], seconds[f"{rules[0]} r={r}"]) for r in positive}
        subject.costs[rule] = [ratio for values in ratios.values() for ratio in values]
        for i, r in enumerate(positive, start=1):
            extra = subject.merge_seconds[rule][r] - subject.merge_seconds[rules[0]][r]
            rate = batch / (batch / first[r] + extra)
            scores = subject.score(forward(model, views, r, rule, batch), reference)
            spread = subject.curves[rules[0]][i].spread
            subject.curves[rule].append(Point(rule, r, rate, spread, scores, median(ratios[r])))


def merge_steps(model: nn.Module, batch: int, r: int, rule: str) -> Callable[[], object]:
    """One forward pass's merges at ``r``, each layer at its shapes, on random features: the only
    work in which the rules differ. The matching is done beforehand; it is the same for every rule."""
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    num_tokens, prefix = tome.input_tokens(model), model.num_prefix_tokens
    steps = []
    for layer_r in tome.parse_r(r, len(model.blocks)):
        if min(layer_r, max_merge(num_tokens, prefix)) == 0:
            continue  # a block with nothing to merge calls no merge
        metric = torch.randn(batch, num_tokens, model.blocks[0].attn.head_dim, generator=generator)
        x = torch.randn(batch, num_tokens, model.embed_dim, generator=generator).to(param.dtype)
        size = torch.randint(1, 4, (batch, num_tokens, 1), generator=generator).float()
        match = bipartite_soft_matching(metric, layer_r, prefix)
        steps.append((match, x, size))
        num_tokens = match.num_out

    def call() -> object:
        return [match.merge_weighted(x, size, rule) for match, x, size in steps]

    return call


def _time_merge_steps(subject: Subject, rules: Sequence[str], batch: int, rounds: int) -> None:
    cells = [(rule, r) for rule in rules for r in subject.r_values if r > 0]
    variants = {f"{rule} r={r}": merge_steps(subject.model, batch, r, rule) for rule, r in cells}
    # A forward pass's merges take milliseconds: ten times the model's rounds cost seconds.
    seconds = interleaved_rounds(variants, 10 * rounds, warmup=5)
    for rule, r in cells:
        subject.merge_seconds.setdefault(rule, {})[r] = median(seconds[f"{rule} r={r}"])


def _ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    return [a / b for a, b in zip(numerators, denominators, strict=True)]


# ---- comparison at equal speed ----


@dataclass(frozen=True)
class Comparison:
    speed: float
    r: int
    """The first rule's r at this speed."""
    base: float
    other: float
    diff: float
    two_se: float


def scores_at_speed(curve: list[Point], r: int, speed: float, metric: str) -> torch.Tensor | None:
    """Per-view scores at ``speed``, linear between two points of ``curve`` at neighbouring r, one of
    them at ``r``: the rules differ little in cost, so equal speed lies next to equal r, and looking
    only there keeps a noisy, non-monotonic speed curve from pairing far-apart r. None outside."""
    index = next(i for i, point in enumerate(curve) if point.r == r)
    at_r = curve[index]
    if at_r.images_per_s == speed:
        return at_r.scores[metric]
    for neighbour in [curve[i] for i in (index - 1, index + 1) if 0 <= i < len(curve)]:
        slow, fast = sorted((at_r, neighbour), key=lambda p: p.images_per_s)
        if slow.images_per_s <= speed <= fast.images_per_s and fast.images_per_s > slow.images_per_s:
            t = (speed - slow.images_per_s) / (fast.images_per_s - slow.images_per_s)
            return (1 - t) * slow.scores[metric] + t * fast.scores[metric]
    return None


def compare(base: list[Point], other: list[Point], metric: str) -> list[Comparison]:
    """``other`` against ``base`` at each merging speed ``base`` reached, paired over the views."""
    rows = []
    for point in base:
        if point.r == 0:
            continue
        scores = scores_at_speed(other, point.r, point.images_per_s, metric)
        if scores is None:
            continue
        diff = scores - point.scores[metric]
        two_se = 2 * float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        rows.append(
            Comparison(
                point.images_per_s,
                point.r,
                point.mean(metric),
                float(scores.mean()),
                float(diff.mean()),
                two_se,
            )
        )
    return rows


def verdict(rule: str, base_rule: str, metric: str, rows: list[Comparison]) -> str:
    better = [row for row in rows if row.diff - row.two_se > 0]
    worse = [row for row in rows if row.diff + row.two_se < 0]
    if not rows:
        return f"{metric}: no speed where both curves were measured"
    tied = len(rows) - len(better) - len(worse)
    counts = f"better at {len(better)}, worse at {len(worse)}, within noise at {tied}"
    largest = max(rows, key=lambda row: abs(row.diff))
    return (
        f"{metric}: {rule} against {base_rule} at equal speed is {counts} of {len(rows)} speeds; "
        f"largest difference {largest.diff:+.4f} (±{largest.two_se:.4f}) at {largest.speed:.1f} img/s "
        f"({base_rule} r={largest.r})"
    )


# ---- reports ----


@dataclass(frozen=True)
class Setup:
    machine: str
    command: str
    date: str
    dtype: str
    batch: int
    rounds: int
    photos: int
    views: int
    seed: int

    def lines(self) -> list[str]:
        return [
            f"- Machine: {self.machine}.",
            f"- Date: {self.date}. Command, from the repository root: `{self.command}`.",
            f"- Timing: {self.dtype}, batch {self.batch}, {self.rounds} interleaved rounds (median kept), "
            "every rule and r of one model in the same rounds.",
            f"- Quality: {self.photos} photos x {self.views} augmented views (seed {self.seed}), "
            f"computed in {self.dtype} like the timing; r=0 is the reference.",
        ]


def _curve_table(subject: Subject, rules: Sequence[str]) -> list[str]:
    header = ["r"] + [f"{rule} img/s" for rule in rules]
    header += [f"{rule} time / {rules[0]} time" for rule in rules[1:]]
    header += [f"{rule} {metric}" for metric in subject.metrics for rule in rules]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for i, r in enumerate(subject.r_values):
        points = [subject.curves[rule][i] for rule in rules]
        cells = [str(r)] + [f"{p.images_per_s:.1f} (±{p.spread * 50:.0f}%)" for p in points]
        cells += ["" if r == 0 else f"{p.time_vs_first:.3f}" for p in points[1:]]
        cells += [f"{p.mean(metric):.4f}" for metric in subject.metrics for p in points]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _costs(subject: Subject, rules: Sequence[str]) -> list[str]:
    merges = subject.merge_seconds
    steps = "; ".join(
        f"r={r}: " + ", ".join(f"{rule} {merges[rule][r] * 1e3:.2f}" for rule in rules)
        for r in merges[rules[0]]
    )
    lines = ["", f"Merge steps of one forward pass of the batch, ms: {steps}."]
    for rule in rules[1:]:
        ratios = sorted(subject.costs[rule])
        quarter = len(ratios) // 4
        lines += [
            "",
            f"Whole model, {rule} time / {rules[0]} time pooled over every r > 0 and round (a check): "
            f"{median(ratios):.3f} (quartiles {ratios[quarter]:.3f} to {ratios[-1 - quarter]:.3f}, "
            f"{len(ratios)} ratios).",
        ]
    return lines


def _monotony(subject: Subject, rules: Sequence[str]) -> list[str]:
    """A warning where a rule's measured speed does not grow with r: the comparison at equal speed
    then reads the other curve at the wrong place, and the run should be repeated on a quieter machine."""
    lines = []
    for rule in rules:
        speeds = [p.images_per_s for p in subject.curves[rule]]
        if any(later <= earlier for earlier, later in zip(speeds, speeds[1:], strict=False)):
            lines += [
                "",
                f"Warning: {rule}'s measured img/s does not grow with r here (timing noise, or merging "
                "that costs more than it saves).",
            ]
    return lines


def _comparison_table(subject: Subject, rules: Sequence[str]) -> list[str]:
    base = rules[0]
    lines = []
    for rule in rules[1:]:
        for metric in subject.metrics:
            rows = compare(subject.curves[base], subject.curves[rule], metric)
            lines += [
                "",
                f"{metric}, {rule} at the speeds {base} reached:",
                "",
                f"| img/s | {base} r | {base} | {rule} at that speed | difference (± 2 SE) |",
                "|---:|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {c.speed:.1f} | {c.r} | {c.base:.4f} | {c.other:.4f} | {c.diff:+.4f} (±{c.two_se:.4f}) |"
                for c in rows
            ]
            lines += ["", "Computed verdict: " + verdict(rule, base, metric, rows) + "."]
    return lines


def merge_rules_report(
    subjects: list[Subject], rules: Sequence[str], setup: Setup, floor: float | None
) -> str:
    lines = [
        "# Merge rules at equal measured speed",
        "",
        "Generated by `python -m tome_bench.merge_rules` (bench/merge_rules.py); see its docstring for the",
        "method. `tome` is ToMe's size-weighted mean, `mlerp` Token Fusion's norm-preserving merge",
        "(the mean rescaled to the largest norm of the merged tokens); both use the same matching.",
        "",
        *setup.lines(),
        f"- img/s: at r=0 the median of its timed calls. {rules[0]} above r=0: that times the median over",
        "  rounds of its speed-up over r=0 in the same round (ratios within a round: the load of other",
        "  processes, which drifts over seconds, mostly cancels). Other rules: the first rule's time per",
        "  batch at the same r plus the extra time of their merge steps, timed alone (one forward",
        "  pass's merges at that r, interleaved, 10x the rounds; below each table), because the rules",
        "  differ only there and by less than the whole model's timing noise on this machine.",
        "  `time / time`: the whole model's time ratio at one r (median over rounds), a check.",
        "  (±x%): half the interquartile range of r=0's calls, or of the per-round speed-ups, relative",
        "  to their median.",
    ]
    if floor is not None:
        lines.append(
            f"- bfloat16 itself: DINOv2 cosine of bfloat16 with float32 at r=0, mean over views: {floor:.4f}."
        )
    lines += ["", "![quality against images/s, one curve per rule](img/merge_rules.png)"]
    for subject in subjects:
        lines += [
            "",
            f"## {subject.title}",
            "",
            *_curve_table(subject, rules),
            *_costs(subject, rules),
            *_monotony(subject, rules),
            *_comparison_table(subject, rules),
        ]
    return "\n".join(lines) + "\n"


def dinov2_curve_report(subject: Subject, rule: str, setup: Setup) -> str:
    model = subject.model
    tokens = tome.input_tokens(model)
    depth, prefix = len(model.blocks), model.num_prefix_tokens
    base = subject.curves[rule][0].images_per_s
    lines = [
        f"# DINOv2 ViT-S/14: quality against speed for the {rule} merge rule",
        "",
        "Real DINOv2 ViT-S/14 weights (timm `vit_small_patch14_dinov2`, 224 px, class-token embedding),",
        f"{tokens} tokens in. From the same run as [merge-rules.md](merge-rules.md) (the method is there).",
        "cosine: embedding of each augmented view against the same view's at r=0 (mean and worst view).",
        "recall@1: share of views whose nearest photo among all photos' r=0 embeddings is their own.",
        "",
        *setup.lines(),
        "",
        "| r | tokens out | GMACs | img/s | speed-up | cosine mean | cosine min | recall@1 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in subject.curves[rule]:
        out = tome.token_counts(tokens, depth, point.r, prefix)[-1]
        cos = point.scores["cosine"]
        lines.append(
            f"| {point.r} | {out} | {tome.gmacs(model, point.r):.2f} | {point.images_per_s:.1f} | "
            f"{point.images_per_s / base:.2f}x | {cos.mean():.4f} | {cos.min():.4f} | "
            f"{point.mean('recall@1'):.3f} |"
        )
    return "\n".join(lines) + "\n"


def write_keeping_notes(path: Path, text: str) -> None:
    """Write ``text``, followed by the notes marker and whatever an existing file had below it."""
    notes = ""
    if path.is_file():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1].lstrip("\n")
    path.write_text(f"{text}\n{NOTES_MARKER}\n\n{notes}".rstrip("\n") + "\n")


def plot(subjects: list[Subject], rules: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(subject, metric) for subject in subjects for metric in subject.metrics]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (subject, metric) in zip(axes[0], panels, strict=True):
        for rule in rules:
            curve = subject.curves[rule]
            ax.plot([p.images_per_s for p in curve], [p.mean(metric) for p in curve], marker="o", label=rule)
        for point in subject.curves[rules[0]]:
            ax.annotate(
                f"r={point.r}",
                (point.images_per_s, point.mean(metric)),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 4),
            )
        ax.set(xlabel="images/s (measured)", ylabel=metric, title=f"{subject.title}: {metric}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main ----


def _subjects(args: argparse.Namespace, dtype: torch.dtype) -> tuple[list[Subject], float | None]:
    photos = load_photos(args.photos)
    views, owners = augmented_views(photos, args.views, IMG_SIZE, args.seed)
    backbone = dinov2(args.weights, dtype)
    gallery = forward(backbone, as_input(backbone, photos, dtype), 0, "tome", args.batch_size)
    classifier = random_classifier(dtype)
    subjects = []
    for title, model, score, metrics in [
        ("DINOv2 ViT-S/14", backbone, retrieval_scorer(gallery, owners), ("cosine", "recall@1")),
        ("ViT-S/16, random weights, avg pool", classifier, agreement_scorer, ("agreement",)),
    ]:
        r_values = [r for r in args.r if r <= tome.largest_useful_r(model)]
        subjects.append(Subject(title, model, as_input(model, views, dtype), score, metrics, r_values))
    floor = None
    if dtype != torch.float32:
        exact = dinov2(args.weights, torch.float32)
        inputs = subjects[0].views.float()
        floor = float(
            cosine(
                forward(backbone, subjects[0].views, 0, "tome", args.batch_size),
                forward(exact, inputs, 0, "tome", args.batch_size),
            ).mean()
        )
    return subjects, floor


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = pick_dtype(args.dtype)
    rules = tome.MERGE_RULES
    subjects, floor = _subjects(args, dtype)
    for subject in subjects:
        measure(subject, rules, args.batch_size, args.rounds)
    given = sys.argv[1:] if argv is None else argv
    setup = Setup(
        machine=describe_machine("cpu"),
        command=shlex.join(["python", "-m", "tome_bench.merge_rules", *given]),
        date=datetime.date.today().isoformat(),
        dtype=str(dtype).removeprefix("torch."),
        batch=args.batch_size,
        rounds=args.rounds,
        photos=len(subjects[0].views) // args.views,
        views=args.views,
        seed=args.seed,
    )
    args.docs.mkdir(parents=True, exist_ok=True)
    report = merge_rules_report(subjects, rules, setup, floor)
    write_keeping_notes(args.docs / "merge-rules.md", report)
    write_keeping_notes(args.docs / "dinov2-curve.md", dinov2_curve_report(subjects[0], rules[0], setup))
    plot(
        subjects,
        rules,
        args.docs / "img" / "merge_rules.png",
        f"{setup.machine}, {setup.dtype}, {setup.date}",
    )
    print(report)


if __name__ == "__main__":
    main()
