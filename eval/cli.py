"""``tome-eval``: accuracy, agreement and feature drift against speed for a list of r, on an image folder.

``tome-eval --combos`` stacks ToMe with torch.compile, autocast and int8 and prints speedup matrices.

This module parses the options and decides whether the model hub can be reached before anything
imports the hub client (timm does, and the client reads ``HF_HUB_OFFLINE`` once, when imported):
offline, ``--weights pretrained`` then fails in seconds with one line instead of retrying for a
minute. :mod:`tome_eval.commands` does the work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tome_runtime.hub import use_offline_hub_if_unreachable

from .errors import EvalInputError

DEFAULT_R = (0, 4, 8, 12, 16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tome-eval",
        description="Evaluate a timm ViT with Token Merging for several r: accuracy (labelled folder), "
        "top-1 agreement and feature cosine against r=0 (any folder), speed and GMACs.",
    )
    p.add_argument(
        "folder",
        nargs="?",
        type=Path,
        help="image folder: WordNet-id or class-index subfolders, a labels.tsv (file<TAB>class), "
        "or just images (unlabelled). Without it only speed and GMACs are measured.",
    )
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (default: %(default)s)")
    p.add_argument(
        "--weights",
        default="pretrained",
        help="'pretrained' (model hub), 'random', or a .safetensors / torch state_dict file",
    )
    p.add_argument(
        "--model-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help="extra timm.create_model arguments, e.g. '{\"img_size\": 224}'",
    )
    p.add_argument(
        "--r",
        nargs="+",
        default=None,
        metavar="R",
        help=f"r values, e.g. --r 0,4,8 (spaces work too: --r 0 4 8); r=0 is always added "
        f"(default: {_join(DEFAULT_R)}, those the model allows: 0 to tome.largest_useful_r)",
    )
    p.add_argument("--batch-size", type=_positive, default=32)
    p.add_argument(
        "--workers",
        type=_non_negative,
        default=2,
        help="decoding processes; 0 decodes in a background thread (default: %(default)s)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="CPU threads for inference (torch.set_num_threads; default: torch's choice)",
    )
    p.add_argument("--limit", type=_positive, default=None, help="evaluate only the first N images")
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="ignore labels: take every image below the folder (agreement and cosine only)",
    )
    p.add_argument(
        "--timing-rounds",
        type=_non_negative,
        default=10,
        help="interleaved timing rounds of one batch per r; 0 skips timing (default: %(default)s)",
    )
    p.add_argument(
        "--combos",
        action="store_true",
        help="benchmark ToMe stacked with the --opts optimisations instead of the r sweep",
    )
    p.add_argument(
        "--opts",
        default=None,
        metavar="LIST",
        help="rows of the --combos matrix: comma-separated, each a '+'-joined set of compile, "
        "bf16, fp16, int8 (default: compile,bf16,int8 on CPU; compile,fp16,bf16,compile+fp16 "
        "on CUDA)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("tome-eval-out"), help="output folder (default: %(default)s)"
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="JSON",
        help="also write a fidelity profile for tome-serve (TOME_FIDELITY_PROFILE): per r, top-1 agreement, "
        "top-5 overlap and cosine with r=0 with 95%% lower bounds; accuracy drop on a labelled folder",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights (default: %(default)s)")
    return p


def _join(values: tuple[int, ...]) -> str:
    return ",".join(map(str, values))


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"depth\": 4}'")
    return value


def _parse_r(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--r`` takes one or more words, so in ``--r 0,4 photos`` it also takes the folder: give that
    word back to the folder argument when the folder is missing and the word is not an r list."""
    words = args.r
    if words is None:
        return
    if args.folder is None and len(words) > 1 and not words[-1].replace(",", "").strip().isdigit():
        args.folder = Path(words.pop())
    import tome  # imports timm: only after main has settled the hub mode

    try:
        args.r = tome.parse_r_values(words)
    except ValueError as error:
        parser.error(f"argument --r: {error}")


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.weights == "pretrained":
        use_offline_hub_if_unreachable()  # offline: only cached weights, and a quick error otherwise
    from . import commands  # imports torch, timm and the hub client, after the hub mode is settled

    _parse_r(parser, args)
    try:
        return commands.run(args)
    except EvalInputError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    return 2  # unreachable: parser.exit raises SystemExit
