"""What an embeddings answer's encoding costs per image: float JSON against base64, in-process.

    python -m tome_bench.embed_encoding --model vit_small_patch16_224 vit_base_patch16_224 --dtype bfloat16

For each model (loaded and patched as the server loads it), one batch of ``--batch-size`` images is
embedded at ``--r`` and pooled each way of ``--pooling``, as the inference thread does. Then these are
timed interleaved, every round in a new order (``tome_bench.timing``):

- the model's forward pass over the batch: ``forward_features`` + ``forward_head(pre_logits=True)``,
  what an embedding costs before it is answered (the server benchmark's direct baseline);
- per (pooling, encoding), the server's answer for each image of the batch as one request of its own
  (as the server benchmark sends them): the route's item, the ``EmbeddingsResponse``, and FastAPI's
  serialisation of it to the JSON bytes that go out;
- per (pooling, encoding), the client's decoding of those bytes back into a float32 array (``json``,
  then NumPy from the list or from the base64 bytes, as OpenAI's Python client does);
- the server's reading of the request the server benchmark sends (OpenAI's JSON with the 320 px JPEG as
  a data URI): the request model, then the image's bytes from the data URI, per image.

Reports per image: the answer's bytes, server encode and client decode microseconds, the encode time
as a share of the model's time per image, and the request's parse time. Both encodings decode to the
same float32 values (it is checked), so the choice costs time and bytes, not precision.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from fastapi.routing import serialize_response

import tome
from tome_serve import pooling
from tome_serve.config import Settings
from tome_serve.item import Result
from tome_serve.loading import LoadedModel, load_model
from tome_serve.routes import _embedding, router
from tome_serve.schemas import EmbeddingsRequest, EmbeddingsResponse, EmbeddingUsage
from tome_serve.upload import _base64_image

from .serve import EmbeddingsPost, model_settings, test_image
from .speed import describe_machine
from .timing import interleaved_seconds

ENCODINGS = ("float", "base64")


@dataclass
class Row:
    model: str
    pooling: str
    shape: list[int]
    encoding: str
    answer_bytes: int
    encode_us: float
    """Server: the item, the response model and its JSON bytes, per image."""
    decode_us: float
    """Client: JSON bytes to a float32 array, per image."""
    model_ms: float
    """The forward pass per image (batch time / batch size)."""
    encode_share: float
    """encode_us over the model's time per image."""
    request_us: float
    """Server: OpenAI's JSON request of one data-URI JPEG to the image's bytes (the same for every row)."""


def embedded(loaded: LoadedModel, r: int, batch_size: int, poolings: list[str]) -> dict[str, list[Result]]:
    """One Result per image and pooling, as the inference thread builds them (unit length)."""
    image, _ = test_image(None, 320)
    pixels = torch.stack([loaded.preprocessor(image)] * batch_size).to(loaded.device)
    module = loaded.module
    with torch.inference_mode(), tome.merging(r=r, trace_source="patch" in poolings) as info:
        features = module.forward_features(loaded.preprocessor.normalize(pixels, loaded.dtype))
        pre_logits = module.forward_head(features, pre_logits=True)
        pooled = {p: pooling.pool(module, features, p, pre_logits, info.source).cpu() for p in poolings}
    return {
        p: [
            Result(
                model=loaded.name,
                weights=loaded.weights,
                r=r,
                merge="tome",
                target_s=None,
                predictions=[],
                merge_map_png=None,
                embedding=pooling.finish(vectors[i], None, True),
                input_tokens=info.input_tokens,
                token_counts=list(info.token_counts),
                batch_size=batch_size,
                queue_s=0.0,
                inference_s=0.0,
            )
            for i in range(batch_size)
        ]
        for p, vectors in pooled.items()
    }


_FIELD = next(
    route for route in router.routes if getattr(route, "path", "") == "/v1/embeddings"
).response_field


async def answers(results: list[Result], pooling_name: str, encoding: str) -> list[bytes]:
    """The JSON bytes the route sends for each result, each as a one-image request (FastAPI's own
    serialisation of the route's response model)."""
    bodies = []
    for result in results:
        response = EmbeddingsResponse(
            data=[_embedding(0, result, encoding, None)],
            model=result.model,
            weights=result.weights,
            pooling=pooling_name,
            normalize=True,
            usage=EmbeddingUsage(prompt_tokens=result.input_tokens, total_tokens=result.input_tokens),
            request_id="bench",
        )
        bodies.append(await serialize_response(field=_FIELD, response_content=response, dump_json=True))
    return bodies


def decode(body: bytes) -> np.ndarray:
    """A client's reading of a one-image answer: the float32 embedding in its shape."""
    item = json.loads(body)["data"][0]
    vector = item["embedding"]
    if isinstance(vector, str):
        return np.frombuffer(base64.b64decode(vector), dtype="<f4").reshape(item["shape"])
    return np.asarray(vector, dtype=np.float32)


def measure(name: str, args: argparse.Namespace) -> list[Row]:
    settings = model_settings(args, model=name)
    loaded = load_model(name, settings)
    results = embedded(loaded, args.r, args.batch_size, args.pooling)
    loop = asyncio.new_event_loop()
    try:
        bodies = {
            (p, encoding): loop.run_until_complete(answers(results[p], p, encoding))
            for p in args.pooling
            for encoding in ENCODINGS
        }
        for p in args.pooling:
            pairs = zip(bodies[p, "float"], bodies[p, "base64"], strict=True)
            if not all(np.array_equal(decode(a), decode(b)) for a, b in pairs):
                raise AssertionError(f"{name} {p}: float and base64 answers decode to different values")
        variants = {"forward": _forward(loaded, args.r, args.batch_size), "request": _request_reader()}
        for (p, encoding), answered in bodies.items():
            variants[f"encode {p} {encoding}"] = _encoder(loop, results[p], p, encoding)
            variants[f"decode {p} {encoding}"] = _decoder(answered)
        seconds = interleaved_seconds(variants, rounds=args.rounds, warmup=1, device=loaded.device)
    finally:
        loop.close()
    per_image = {variant: value / args.batch_size for variant, value in seconds.items()}
    return [
        Row(
            model=name,
            pooling=p,
            shape=list(results[p][0].embedding.shape),
            encoding=encoding,
            answer_bytes=len(answered[0]),
            encode_us=round(1e6 * per_image[f"encode {p} {encoding}"], 1),
            decode_us=round(1e6 * per_image[f"decode {p} {encoding}"], 1),
            request_us=round(1e6 * seconds["request"], 1),
            model_ms=round(1e3 * per_image["forward"], 2),
            encode_share=round(per_image[f"encode {p} {encoding}"] / per_image["forward"], 4),
        )
        for (p, encoding), answered in bodies.items()
    ]


def _forward(loaded: LoadedModel, r: int, batch_size: int) -> Callable[[], object]:
    """The forward pass an embedding needs, over a ready batch (the server benchmark's direct one)."""
    pixels = torch.stack([loaded.preprocessor(test_image(None, 320)[0])] * batch_size).to(loaded.device)
    batch = loaded.preprocessor.normalize(pixels, loaded.dtype)
    module = loaded.module

    def forward() -> object:
        with tome.merging(r=r):
            return module.forward_head(module.forward_features(batch), pre_logits=True)

    return forward


def _request_reader() -> Callable[[], object]:
    """The route's reading of the server benchmark's request: the request model, then the image."""
    body = EmbeddingsPost("base64").body(test_image(None, 320)[1], 16)
    limit = Settings().max_upload_bytes

    def read() -> bytes:
        request = EmbeddingsRequest.model_validate_json(body)
        return _base64_image(request.input[0], limit)

    return read


def _encoder(
    loop: asyncio.AbstractEventLoop, results: list[Result], pooling_name: str, encoding: str
) -> Callable[[], object]:
    return lambda: loop.run_until_complete(answers(results, pooling_name, encoding))


def _decoder(bodies: list[bytes]) -> Callable[[], object]:
    return lambda: [decode(body) for body in bodies]


def table(rows: list[Row]) -> str:
    lines = [
        "| model | pooling (shape) | encoding | answer bytes | server encode µs/img | client decode µs/img "
        "| model ms/img | encode / model | request parse µs/img |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        shape = "x".join(map(str, row.shape))
        lines.append(
            f"| {row.model} | {row.pooling} ({shape}) | {row.encoding} | {row.answer_bytes:,} | "
            f"{row.encode_us:,.1f} | {row.decode_us:,.1f} | {row.model_ms:.2f} | "
            f"{100 * row.encode_share:.2f} % | {row.request_us:,.1f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--weights", default="random", help="as the server's --weights")
    parser.add_argument("--model-kwargs", default="{}", help="JSON, as the server's --model-kwargs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pooling", nargs="+", default=["model", "patch"], choices=list(pooling.POOLINGS))
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--out", default="artifacts/embed_encoding.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [row for name in args.model for row in measure(name, args)]
    machine = describe_machine(args.device)
    print(f"{machine}, {args.dtype}, r={args.r}, batch {args.batch_size}, {args.rounds} rounds")
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine, "config": vars(args), "rows": [asdict(row) for row in rows]}
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
