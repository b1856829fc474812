"""A LitServe server for the same ToMe-patched model: the peer in the server benchmark (optional).

    pip install litserve
    python -m tome_bench.litserve_peer --port 8001 --dtype bfloat16 --r 16 --batch-size 8 \\
        [--workers 1] [--torch-threads 0]
    python -m tome_bench.serve --peer --url http://127.0.0.1:8001 --server-pid <pid> --multipart \\
        --dtype bfloat16 --r 16 --batch-size 8

LitServe takes uploads as multipart forms (field ``file``), so the benchmark posts multipart to
both servers with ``--multipart``. Loading, decoding and preprocessing are this project's own
(``tome_serve.loading``, ``decode``, ``preprocess``), so the two servers compute the same thing and
differ in their serving machinery: LitServe runs the model in ``--workers`` separate processes
fed through queues, with its own dynamic batching (``--batch-timeout-ms``, default 5). r is fixed
per server (``--r``). Answers: the top-1 class index and its probability.
"""

# No `from __future__ import annotations`: LitServe compares decode_request's annotation with
# fastapi.Request itself, and reads a multipart form only when it is the class, not a string.

import argparse
import os
import sys

import torch

from .extras import exit_for_missing

try:  # optional: the peer exists only where LitServe is installed
    import litserve as ls
except ImportError:  # pragma: no cover - depends on the environment
    ls = None


if ls is not None:
    from fastapi import Request

    class ToMeAPI(ls.LitAPI):
        """Defined at module level: LitServe pickles the API into its worker processes."""

        def __init__(self, args: argparse.Namespace) -> None:
            super().__init__(
                max_batch_size=args.batch_size,
                batch_timeout=args.batch_timeout_ms / 1000,
                api_path="/classify",
            )
            self.args = args

        def setup(self, device: str) -> None:
            from tome_serve.config import Settings
            from tome_serve.loading import load_model

            if self.args.torch_threads:
                torch.set_num_threads(self.args.torch_threads)
            settings = Settings(
                model=self.args.model,
                weights=self.args.weights,
                model_kwargs=self.args.model_kwargs,
                device="cpu",
                dtype=self.args.dtype,
                max_batch_size=self.args.batch_size,
            )
            self.loaded = load_model(settings.model_names[0], settings)
            self.reduce_to = self.loaded.preprocessor.resize_short_side
            self.max_pixels = settings.max_pixels

        def decode_request(self, request: Request) -> torch.Tensor:
            from tome_serve.images import decode_image

            data = request["file"].file.read()
            return self.loaded.preprocessor(decode_image(data, self.max_pixels, reduce_to=self.reduce_to))

        def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(inputs)

        def predict(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            import tome

            batch = self.loaded.preprocessor.normalize(pixels, self.loaded.dtype)
            with torch.inference_mode(), tome.merging(r=self.args.r):
                logits = self.loaded.module(batch)
            return logits.float().softmax(-1).max(-1)

        def unbatch(self, output: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[float, int]]:
            scores, indices = output
            return [(float(s), int(i)) for s, i in zip(scores, indices, strict=True)]

        def encode_response(self, output: tuple[float, int]) -> dict:
            score, index = output
            return {"predictions": [{"index": index, "score": round(score, 6)}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--model-kwargs", default="{}", help="JSON, as the server's --model-kwargs")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=1, help="LitServe workers_per_device")
    parser.add_argument("--torch-threads", type=int, default=0, help="per worker; 0 = torch's default")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args(argv)
    if ls is None:
        print("the LitServe peer needs `pip install litserve`", file=sys.stderr)
        return 2
    try:  # the workers load the model with the server's own code
        import tome_serve.loading  # noqa: F401
    except ModuleNotFoundError as missing:
        exit_for_missing(missing)
    api = ToMeAPI(args)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=args.workers)
    print(f"LitServe {ls.__version__} peer on port {args.port}, pid {os.getpid()}", flush=True)
    server.run(port=args.port, generate_client_file=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
