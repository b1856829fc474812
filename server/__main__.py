"""``tome-serve`` / ``python -m tome_serve``: parse options, then run the app under uvicorn.

Every option can also be set as a ``TOME_*`` environment variable (command-line values win).
SIGTERM or Ctrl-C drains: /readyz turns 503, new requests get 503, queued ones finish, then exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from pydantic import ValidationError

from .config import Settings
from .hub import use_offline_hub_if_unreachable

log = logging.getLogger("server")

_OPTIONS: list[tuple[str, type, str]] = [
    ("--model", str, "timm model name; comma-separated for several (the first is the default)"),
    ("--weights", str, "'pretrained' (default), 'random', or a local .safetensors/.pth file"),
    ("--device", str, "auto (default), cpu or cuda"),
    ("--dtype", str, "float32 (default), float16 or bfloat16"),
    ("--host", str, "address to listen on (default 127.0.0.1)"),
    ("--port", int, "port to listen on (default 8000)"),
    ("--model-kwargs", str, "JSON object of extra timm.create_model kwargs, e.g. '{\"img_size\": 224}'"),
    ("--max-batch-size", int, "largest batch (default 8)"),
    ("--max-delay-ms", float, "longest wait for a batch to fill (default 5)"),
    ("--max-queue", int, "capacity of each (model, r) queue (default 64)"),
    ("--request-timeout-ms", float, "deadline of a request (default 10000)"),
    ("--instances", int, "inference threads per model (default 1); 2 on a CPU trades latency for throughput"),
    ("--default-r", int, "r when a request names none (default 16, capped at the model's maximum)"),
    ("--max-r", int, "cap on r (default: each model's own maximum)"),
    ("--log-level", str, "critical, error, warning, info (default) or debug"),
]


def parse_args(argv: list[str] | None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        prog="tome-serve",
        description="Serve timm Vision Transformers accelerated with Token Merging (ToMe) over HTTP. "
        "Every option falls back to the environment variable TOME_<OPTION> (e.g. TOME_MAX_BATCH_SIZE).",
    )
    choices = {
        "--device": ["auto", "cpu", "cuda"],
        "--dtype": ["float32", "float16", "bfloat16"],
        "--log-level": ["critical", "error", "warning", "info", "debug"],
    }
    for flag, kind, text in _OPTIONS:
        parser.add_argument(flag, type=kind, help=text, choices=choices.get(flag))
    parser.add_argument("--access-log", action="store_true", default=None, help="log every request")
    args = vars(parser.parse_args(argv))
    return {name: value for name, value in args.items() if value is not None}


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a shutdown signal first marks the service as draining."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(**parse_args(argv))
    except ValidationError as exc:
        print(f"tome-serve: invalid settings\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if settings.weights == "pretrained" and use_offline_hub_if_unreachable():
        log.warning("the model hub is unreachable or HF_HUB_OFFLINE is set: only cached weights can be used")

    from .app import create_app  # imports torch and timm, after the hub mode is settled

    fatal: list[str] = []
    server: DrainingServer | None = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # Queued requests finish within their deadline; do not wait for stragglers much longer.
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = DrainingServer(config, on_signal=app.state.service.begin_draining)
    server.run()
    if fatal:
        print(f"tome-serve: start-up failed: {fatal[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
