"""``tome-serve`` / ``python -m tome_serve``: read the settings, bind the port, run the app under uvicorn.

The options and ``--help`` come from :class:`~.config.Settings` (pydantic-settings); every option
is also a ``TOME_*`` environment variable, and the command line wins. The port is bound before any
model is loaded, so a busy port fails at once. SIGTERM or Ctrl-C drains: /readyz turns 503, new
requests get 503, queued ones finish, then the process exits.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from pydantic import ValidationError

from tome_runtime.hub import use_offline_hub_if_unreachable

from .config import Settings
from .middleware import RequestIdLogFilter

log = logging.getLogger("tome_serve")

EXIT_OK = 0
EXIT_START_FAILED = 1
"""A model could not be loaded, patched or warmed (the log says why)."""
EXIT_INVALID_SETTINGS = 2
EXIT_PORT_UNAVAILABLE = 3
"""The address and port cannot be bound (in use, or not an address of this machine)."""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a shutdown signal first marks the service as draining."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on (host, port), bound the way uvicorn binds its own."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        print(f"tome-serve: invalid settings\n{exc}", file=sys.stderr)
        return EXIT_INVALID_SETTINGS
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s %(name)s%(request)s: %(message)s"
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdLogFilter())
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        print(
            f"tome-serve: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}. "
            "Stop whatever uses it, or choose another port with --port or TOME_PORT "
            "(another address with --host or TOME_HOST).",
            file=sys.stderr,
        )
        return EXIT_PORT_UNAVAILABLE
    if settings.weights == "pretrained" and use_offline_hub_if_unreachable():
        log.warning("the model hub is unreachable or HF_HUB_OFFLINE is set: only cached weights can be used")

    from .app import create_app  # imports torch and timm, after the hub mode is settled

    failed = False
    server: DrainingServer | None = None

    def on_fatal(message: str) -> None:  # the app has logged the message
        nonlocal failed
        failed = True
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_fatal=on_fatal)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # uvicorn's default (5 s) closed connections that clients were about to reuse (issue 11).
        timeout_keep_alive=settings.keep_alive_s,
        # Queued requests finish within their deadline; do not wait for stragglers much longer.
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )
    server = DrainingServer(config, on_signal=app.state.service.begin_draining)
    host, port = sock.getsockname()[:2]
    log.info("bound to http://%s:%d; loading the models (/readyz turns 200 once they are ready)", host, port)
    server.run(sockets=[sock])
    return EXIT_START_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
