"""``tome-serve`` / ``python -m tome_serve``: read the settings, bind the port, run the app under uvicorn.

The options and ``--help`` come from :class:`~.config.Settings` (pydantic-settings); every option
is also a ``TOME_*`` environment variable, and the command line wins. The port is bound before any
model is loaded, so a busy port fails at once. SIGTERM or Ctrl-C drains: /readyz turns 503, new
requests get 503, queued ones finish, then the process exits with 0; with 4 when the drain could not
finish (requests still running after the grace period, or a second Ctrl-C).
"""

from __future__ import annotations

import logging
import signal
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
EXIT_DRAIN_INCOMPLETE = 4
"""Stopped before every request was answered: the grace period ran out, or Ctrl-C came twice."""
EXIT_INTERRUPTED = 130
"""Ctrl-C before the server was running (while importing or binding): the shell's 128 + SIGINT."""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, but a shutdown signal first marks the service as draining, and a drain that
    finished is a normal exit.

    uvicorn records each signal it handles and raises it again once it has shut down, so the process
    ends killed by SIGTERM (status 143) or with a KeyboardInterrupt traceback (Ctrl-C) even when every
    request was answered. This server handles the signals itself and does not record them: whether the
    drain finished (:attr:`drained`) decides the exit status instead.
    """

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal
        self.drained = False
        """Every connection closed and task done before the grace period ran out, without force."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for requests
        else:
            self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.lifespan.should_exit:  # the app's own shutdown failed (uvicorn logged it)
            self.drained = False

    async def _wait_tasks_to_complete(self) -> None:
        # uvicorn's wait for open connections and tasks, which it cancels (interrupting this call)
        # when timeout_graceful_shutdown runs out, and cuts short on force_exit.
        await super()._wait_tasks_to_complete()
        self.drained = not self.force_exit


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
        return _serve(argv)
    except KeyboardInterrupt:  # before uvicorn handles Ctrl-C itself
        print("tome-serve: interrupted before the server was running", file=sys.stderr)
        return EXIT_INTERRUPTED


def _serve(argv: list[str] | None) -> int:
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
    if failed:
        return EXIT_START_FAILED
    if not server.drained:
        log.error("stopped before every request was answered (grace period over, or Ctrl-C twice)")
        return EXIT_DRAIN_INCOMPLETE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
