"""/v1/embeddings against /classify and the direct model, in interleaved rounds on one server.

    python -m tome_bench.embed_pairs --model vit_small_patch16_224 --dtype bfloat16 --r 16 --rounds 6

On a shared machine the direct model's speed drifts between two runs of ``tome_bench.serve`` by more
than the difference to be measured. Here one server and one loaded direct model serve every round, and
each round measures, in a new order (seeded):

- ``direct``: the model's ``forward_features`` + ``forward_head(pre_logits=True)`` on a ready batch of
  ``--batch-size`` images for ``--direct-seconds`` (``tome_bench.serve``'s embeddings baseline);
- ``classify``, ``embeddings base64``, ``embeddings float``: ``tome_bench.serve``'s saturation phase,
  ``3 x batch size`` closed-loop clients for ``--seconds`` after ``--warmup``, posting the JPEG to
  /classify, or OpenAI's JSON request of it as one data URI to /v1/embeddings in that encoding.

Per round and variant: images/s, CPU ms per image (the server's, or the direct model's) and how busy the
machine was; per round the ratios, and in the verdict their medians over the rounds: embeddings
(base64) / direct, as the server benchmark's goal, embeddings / classify, and float / base64.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import torch

import tome
from tome_serve.loading import load_model

from .serve import (
    EmbeddingsPost,
    PhaseMeter,
    add_server_model_arguments,
    closed_loop,
    cpu_report,
    model_settings,
    start_server,
    summarize,
    test_image,
)
from .speed import describe_machine
from .stats import CpuMeter
from .timing import interleaved_seconds

SERVED = {
    "classify": None,
    "embeddings base64": EmbeddingsPost("base64"),
    "embeddings float": EmbeddingsPost("float"),
}
RATIOS = {
    "embeddings_over_direct": ("embeddings base64", "direct"),
    "classify_over_direct": ("classify", "direct"),
    "embeddings_over_classify": ("embeddings base64", "classify"),
    "float_over_base64": ("embeddings float", "embeddings base64"),
}


def direct_forward(args: argparse.Namespace) -> Callable[[], object]:
    """The embeddings forward pass of the served model, loaded as the server loads it, on a ready batch."""
    settings = model_settings(args)
    loaded = load_model(settings.model_names[0], settings)
    pixels = torch.stack([loaded.preprocessor(test_image(None, args.image_size)[0])] * args.batch_size)
    batch = loaded.preprocessor.normalize(pixels.to(loaded.device), loaded.dtype)
    module = loaded.module

    def forward() -> object:
        with tome.merging(r=args.r):
            return module.forward_head(module.forward_features(batch), pre_logits=True)

    return forward


def time_direct(forward: Callable[[], object], args: argparse.Namespace) -> dict:
    probe = interleaved_seconds({"direct": forward}, rounds=1, warmup=1, device=args.device)["direct"]
    rounds = max(3, int(args.direct_seconds / max(probe, 1e-4)))
    with CpuMeter(None) as meter:
        per_batch = interleaved_seconds({"direct": forward}, rounds=rounds, warmup=0, device=args.device)[
            "direct"
        ]
    assert meter.sample is not None
    return {
        "images_per_s": round(args.batch_size / per_batch, 2),
        "cpu_ms_per_image": round(1000 * meter.sample.client_s / (rounds * args.batch_size), 2),
        "machine_busy_share": meter.sample.shares(os.cpu_count() or 1)["machine_busy_share"],
    }


def time_served(name: str, url: str, payload: bytes, pid: int | None, args: argparse.Namespace) -> dict:
    meter = PhaseMeter(pid)
    clients = 3 * args.batch_size
    load = closed_loop(
        url, payload, args.r, clients, args.warmup, args.seconds, {}, meter=meter, embeddings=SERVED[name]
    )
    phase = summarize(name, asyncio.run(load), args.seconds, None)
    cpu = cpu_report(meter)
    return {
        "images_per_s": phase.throughput_ips,
        "cpu_ms_per_image": cpu.get("server_cpu_ms_per_image"),
        "machine_busy_share": cpu.get("machine_busy_share"),
        "p50_ms": phase.p50_ms,
        "failed": phase.sent - phase.answered,
    }


def run_rounds(args: argparse.Namespace, url: str, pid: int | None) -> list[dict]:
    _, payload = test_image(None, args.image_size)
    forward = direct_forward(args)
    order = random.Random(0)
    rounds = []
    for index in range(args.rounds):
        measured = {}
        for name in order.sample(["direct", *SERVED], len(SERVED) + 1):
            measured[name] = (
                time_direct(forward, args) if name == "direct" else time_served(name, url, payload, pid, args)
            )
        ratios = {
            key: round(measured[a]["images_per_s"] / measured[b]["images_per_s"], 3)
            for key, (a, b) in RATIOS.items()
        }
        rounds.append({"round": index + 1, "measured": measured, "ratios": ratios})
        print(json.dumps(rounds[-1]), flush=True)
    return rounds


def verdict(rounds: list[dict]) -> dict:
    medians = {key: round(statistics.median(r["ratios"][key] for r in rounds), 3) for key in RATIOS}
    failed = sum(m.get("failed", 0) for r in rounds for m in r["measured"].values())
    return {
        **{f"median_{key}": value for key, value in medians.items()},
        "meets_90_percent": medians["embeddings_over_direct"] >= 0.9,
        "failed_requests": failed,
    }


def table(rounds: list[dict]) -> str:
    names = ["direct", *SERVED]
    head = (
        "| round | "
        + " | ".join(f"{name} img/s (CPU ms/img)" for name in names)
        + " | machine busy | "
        + " | ".join(RATIOS)
        + " |"
    )
    lines = [head, "|" + "---|" * (2 + len(names) + len(RATIOS))]
    for r in rounds:
        m = r["measured"]
        cells = [f"{m[n]['images_per_s']} ({m[n]['cpu_ms_per_image']})" for n in names]
        busy = min(m[n]["machine_busy_share"] or 0 for n in names)
        lines.append(
            f"| {r['round']} | "
            + " | ".join(cells)
            + f" | {busy:.0%} | "
            + " | ".join(str(r["ratios"][k]) for k in RATIOS)
            + " |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_server_model_arguments(parser)
    parser.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="server TOME_MAX_BATCH_SIZE and direct batch"
    )
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--instances", default="auto")
    parser.add_argument("--request-timeout-ms", type=float, default=10_000)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds of each served variant")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each")
    parser.add_argument("--direct-seconds", type=float, default=5.0)
    parser.add_argument("--image-size", type=int, default=320, help="side of the synthetic JPEG")
    parser.add_argument(
        "--url", default=None, help="use this running server (same model) instead of starting one"
    )
    parser.add_argument("--out", default="artifacts/embed_pairs.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    process, url = (None, args.url) if args.url else start_server(args)
    try:
        model = httpx.get(f"{url}/models").json()["models"][0]
        print(f"server {url}: {model['name']} ({model['weights']}, {model['dtype']}), r={args.r}", flush=True)
        rounds = run_rounds(args, url, process.pid if process is not None else None)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    result = {
        "machine": describe_machine(args.device),
        "config": vars(args),
        "rounds": rounds,
        "verdict": verdict(rounds),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(rounds))
    print(json.dumps(result["verdict"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
