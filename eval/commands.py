"""What ``tome-eval`` does once :mod:`tome_eval.cli` has parsed its options: the r sweep, or the
``--combos`` matrix of ToMe stacked with torch.compile, autocast and int8."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import timm.data
import torch
import torch._dynamo
import torch.nn as nn

import tome
from tome_runtime import hardware

from . import combine, profile, report, sweep
from .cli import DEFAULT_R
from .data import ImageFiles, LabelSpace, Listing, list_images
from .errors import EvalInputError
from .runner import SCALE_SAMPLE, FolderRun, Timing, evaluate, seconds_per_batch, timing_batch
from .weights import LoadedModel, build_model


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    device = _device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = build_model(args.model, args.weights, args.model_kwargs, args.seed)
    model = loaded.model.to(device)
    if loaded.missing_head_keys:
        missing = ", ".join(loaded.missing_head_keys)
        say(f"note: {args.weights} has no classifier head ({missing}): the head is random")
    requested = args.r or [r for r in DEFAULT_R if r <= tome.largest_useful_r(model)]
    r_values = sweep.check_r_values(requested, model, args.model)
    listing = _listing(args, model) if args.folder else None
    dataset = ImageFiles(listing.samples, _transform(model)) if listing else None
    args.out.mkdir(parents=True, exist_ok=True)
    if args.opts is not None and not args.combos:
        raise EvalInputError("--opts needs --combos")
    if args.profile is not None and (args.combos or listing is None):
        raise EvalInputError("--profile needs an image folder and the r sweep (not --combos)")
    if args.combos:
        return _run_combos(args, loaded, model, device, r_values, listing, dataset)
    return _run_sweep(args, loaded, model, device, r_values, listing, dataset)


def _device(name: str) -> torch.device:
    try:
        return hardware.resolve_device(name)
    except hardware.DeviceError as error:
        raise EvalInputError(str(error)) from None


def _transform(model: nn.Module) -> Any:
    # The model's own eval preprocessing, at the input size it was built with (which --model-kwargs
    # may have changed from the pretrained config's).
    size = (3, *model.patch_embed.img_size)
    config = timm.data.resolve_data_config({"input_size": size}, model=model)
    return timm.data.create_transform(**config)


def _listing(args: argparse.Namespace, model: nn.Module) -> Listing:
    subset = timm.data.infer_imagenet_subset(model)
    wordnet_ids = timm.data.ImageNetInfo(subset).label_names() if subset else None
    listing = list_images(args.folder, LabelSpace(model.num_classes, wordnet_ids), args.unlabelled)
    if args.limit:
        listing = Listing(listing.samples[: args.limit], listing.layout, listing.ignored)
    ignored = f"; {listing.ignored} non-image files ignored" if listing.ignored else ""
    say(f"{len(listing.samples)} images in {args.folder} ({listing.layout}{ignored})")
    if listing.labelled and not model.num_classes:
        say("note: the model has no classifier (num_classes=0): labels are not used; cosine is the measure")
    return listing


def _sample_images(dataset: ImageFiles | None, count: int) -> torch.Tensor | None:
    """Up to ``count`` decoded images from the folder, for the timing batch."""
    if dataset is None:
        return None
    images = []
    for i in range(len(dataset)):
        image = dataset[i][0]
        if image is not None:
            images.append(image)
        if len(images) == count:
            break
    return torch.stack(images) if images else None


def _timing_images(args: argparse.Namespace, model: nn.Module, dataset: ImageFiles | None) -> torch.Tensor:
    shape = (3, *model.patch_embed.img_size)
    return timing_batch(_sample_images(dataset, args.batch_size), args.batch_size, shape)


def _unreadable_paths(listing: Listing | None, positions: list[int]) -> list[str]:
    if listing is None:
        return []
    paths = [str(listing.samples[i].path) for i in positions]
    if paths:
        shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
        say(f"skipped {len(paths)} unreadable file(s): {shown}")
    return paths


def _check_any_readable(listing: Listing | None, unreadable: list[str]) -> None:
    if listing is not None and len(unreadable) == len(listing.samples):
        raise EvalInputError(f"none of the {len(unreadable)} images could be decoded")


def _measure(
    args: argparse.Namespace,
    variants: dict,
    baseline: object,
    device: torch.device,
    listing: Listing | None,
    dataset: ImageFiles | None,
    timing_images: Callable[[], torch.Tensor],
) -> tuple[FolderRun | None, list[str], Timing | None]:
    """Quality of every variant over the folder (if one was given) and their speed (if timed)."""
    progress = not args.no_progress
    folder = None
    if dataset is not None:
        folder = evaluate(
            variants, baseline, dataset, args.batch_size, args.workers, device, progress=progress
        )
    unreadable = _unreadable_paths(listing, folder.unreadable if folder else [])
    _check_any_readable(listing, unreadable)
    timing = None
    if args.timing_rounds:
        timing = seconds_per_batch(variants, timing_images(), args.timing_rounds, device, progress=progress)
    return folder, unreadable, timing


def _run_sweep(
    args: argparse.Namespace,
    loaded: LoadedModel,
    model: nn.Module,
    device: torch.device,
    r_values: list[int],
    listing: Listing | None,
    dataset: ImageFiles | None,
) -> int:
    variants = sweep.sweep_variants(model, r_values)
    timing_images = partial(_timing_images, args, model, dataset)  # built only if timing is asked for
    folder, unreadable, timing = _measure(args, variants, 0, device, listing, dataset, timing_images)
    rows = sweep.rows_for(model, r_values, timing, args.batch_size, folder)
    warnings = sweep.speed_warnings(rows) + _quality_warnings(loaded, folder)
    info = sweep.run_info(
        args.model,
        loaded.weights,
        loaded.head_is_random,
        device,
        listing,
        unreadable,
        batch_size=args.batch_size,
        timing_rounds=args.timing_rounds,
        has_classifier=bool(model.num_classes),
        cosine_between_images=folder.cosine_between_images if folder else None,
        warnings=warnings,
    )
    print(f"{args.model} ({loaded.weights} weights) on {info['machine']}, batch {args.batch_size}:")
    print(report.sweep_table(rows))
    if timing is not None:
        print(
            f"speedup: the median of {args.timing_rounds} interleaved rounds' ratios to r=0; speedup IQR: "
            "the middle half of those ratios, the machine's noise."
        )
    _print_scale(folder)
    for warning in warnings:
        say(f"warning: {warning}")
    records = [row.flat() for row in rows]
    report.write_csv(args.out / "sweep.csv", records)
    report.write_json(args.out / "sweep.json", {"info": info, "rows": records})
    written = ["sweep.csv", "sweep.json"]
    if folder is not None:
        report.write_per_image(
            args.out / "sweep_images.csv", folder.per_image, listing.samples, lambda r: f"r={r}"
        )
        written.append("sweep_images.csv")
    if not args.no_plot:
        title = f"{args.model}, {info['images']} images" if listing else args.model
        if report.plot_sweep(args.out / "sweep.png", rows, title) is None:
            say("note: matplotlib is not installed (pip install 'tome-serve[eval]'): no plot written")
        else:
            written.append("sweep.png")
    say(f"wrote {', '.join(str(args.out / name) for name in written)}")
    if args.profile is not None and folder is not None:
        size = [3, *model.patch_embed.img_size]
        about = {
            "weights": loaded.weights,
            "input_size": size,
            "images": info["images"],
            "layout": info["layout"],
        }
        profile.write_profile(args.profile, profile.fidelity_table(args.model, r_values, folder, rows), about)
        say(f"wrote the fidelity profile {args.profile} (tome-serve: TOME_FIDELITY_PROFILE={args.profile})")
    return 0


def _quality_warnings(loaded: LoadedModel, folder: FolderRun | None) -> list[str]:
    """What the quality columns cannot say, when they were measured with random weights or head."""
    if folder is None:
        return []
    if loaded.weights == "random":
        return [sweep.RANDOM_WEIGHTS]
    has_classifier = bool(loaded.model.num_classes)
    return [sweep.RANDOM_HEAD] if loaded.missing_head_keys and has_classifier else []


def _print_scale(folder: FolderRun | None) -> None:
    if folder is not None and folder.cosine_between_images is not None:
        print(
            f"For scale: two different images have mean cosine {folder.cosine_between_images:.4f} at r=0 "
            f"(pairs among up to {SCALE_SAMPLE} images spread over the folder)."
        )


def _run_combos(
    args: argparse.Namespace,
    loaded: LoadedModel,
    model: nn.Module,
    device: torch.device,
    r_values: list[int],
    listing: Listing | None,
    dataset: ImageFiles | None,
) -> int:
    rows = combine.parse_optimisations(args.opts or combine.default_optimisations(device), device)
    images = _timing_images(args, model, dataset).to(device)
    limits = combine.recompile_limits(len(model.blocks), r_values, rows)
    with torch._dynamo.config.patch(**limits):
        variants, cells = combine.build_variants(model, rows, r_values, device, args.batch_size)
        say(f"first call of {len(variants)} variants (compiling the compiled ones; this can take minutes)")
        variants = combine.warm_up(variants, cells, images, device)
        if (combine.BASELINE, 0) not in variants:
            raise EvalInputError(f"the plain fp32 model failed: {cells[combine.BASELINE, 0].error}")
        baseline = (combine.BASELINE, 0)
        folder, unreadable, timing = _measure(
            args, variants, baseline, device, listing, dataset, lambda: images
        )
    classifier = bool(model.num_classes)
    quality = {key: t.summary(classifier) for key, t in folder.tallies.items()} if folder else None
    combine.fill_cells(cells, timing.seconds if timing else None, quality, args.batch_size)
    info = sweep.run_info(
        args.model,
        loaded.weights,
        loaded.head_is_random,
        device,
        listing,
        unreadable,
        batch_size=args.batch_size,
        timing_rounds=args.timing_rounds,
        has_classifier=classifier,
        r=r_values,
        optimisations=[row.name for row in rows],
        cosine_between_images=folder.cosine_between_images if folder else None,
        warnings=_quality_warnings(loaded, folder),
    )
    print(f"{args.model} ({loaded.weights} weights) on {info['machine']}, batch {args.batch_size}:")
    print(report.combo_tables(cells, r_values, bool(listing and listing.labelled), classifier))
    _print_scale(folder)
    for warning in info["warnings"]:
        say(f"warning: {warning}")
    records = [report.cell_record(cell) for cell in cells.values()]
    report.write_csv(args.out / "combos.csv", records)
    report.write_json(args.out / "combos.json", {"info": info, "cells": records})
    written = ["combos.csv", "combos.json"]
    if folder is not None:
        report.write_per_image(
            args.out / "combos_images.csv",
            folder.per_image,
            listing.samples,
            lambda key: f"{key[0]} r={key[1]}",
        )
        written.append("combos_images.csv")
    say(f"wrote {', '.join(str(args.out / name) for name in written)}")
    return 0
