"""The launcher: `lbapp` (and `python -m lbapp`) runs uvicorn with lbapp's production defaults.

    lbapp [--host H] [--port P] [--workers N] [--fd FD | --uds PATH]
    lbapp --check

`uvicorn lbapp:app` needs five flags to be right (uvloop and httptools, no access log of its own,
no `server`/`date` headers of its own, no `X-Forwarded-For` rewriting, a graceful shutdown
timeout) and has no client header timeout nor head limits. The launcher sets them all and serves
with lbapp's hardened protocol (lbapp/server.py). `--check` builds the whole app (settings,
routes, policies) without serving, so a bad configuration fails before a deploy does.

Flags win over the settings of the same name (`LB_HOST`, `LB_PORT`, `LB_WORKERS`). Logging is
configured here, by the entry point, not by the app factory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

from . import __version__
from .application import create_app
from .logs import configure_logging
from .reload import forward_sighup
from .server import HardenedHttpToolsProtocol, HeadLimits, ServerConfig
from .settings import Settings, SettingsError, load_settings
from .wsserver import GracefulWebSocketProtocol

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def setup_logging(settings: Settings) -> None:
    configure_logging(settings.debug, settings.access_log, settings.log_format)


def worker_app() -> Any:
    """The app factory each worker of `--workers N` calls: settings, logging, app."""
    settings = load_settings()
    setup_logging(settings)
    return create_app(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbapp",
        description="lbapp, an HTTP load balancer, served by uvicorn with production defaults. "
        "Settings are LB_* variables (see settings.env.example); flags win over LB_HOST, LB_PORT "
        "and LB_WORKERS.",
    )
    parser.add_argument("--host", help="address to listen on (LB_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (LB_PORT, default 8080)")
    parser.add_argument("--workers", type=int, help="worker processes (LB_WORKERS, default 1)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--fd", type=int, help="serve on this inherited, listening socket instead")
    where.add_argument("--uds", help="serve on this Unix domain socket instead")
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration, print one line, exit 0 or 1"
    )
    parser.add_argument("--version", action="version", version=f"lbapp {__version__}")
    return parser


def resolve(args: argparse.Namespace) -> Settings:
    """The settings, with the flags given on the command line in place of their LB_* values."""
    overrides = {
        name: value for name in ("host", "port", "workers") if (value := getattr(args, name)) is not None
    }
    # Passed as init values, the strongest source: a bad flag reads like a bad LB_* value.
    return load_settings(**overrides)


@contextlib.contextmanager
def without_multiproc_dir() -> Iterator[None]:
    """Build an app in this process without registering it as a metrics worker (it serves nothing)."""
    saved = os.environ.pop(MULTIPROC_ENV, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[MULTIPROC_ENV] = saved


def server_config(settings: Settings, args: argparse.Namespace, app: Any) -> ServerConfig:
    workers = settings.workers
    return ServerConfig(
        app,
        head_limits=HeadLimits.from_settings(settings),
        host=settings.host,
        port=settings.port,
        fd=args.fd,
        uds=args.uds,
        workers=workers,
        factory=workers > 1,
        loop="uvloop",
        http=HardenedHttpToolsProtocol,
        ws=GracefulWebSocketProtocol,  # open sessions get 1001 at the end of the graceful time
        ws_max_size=settings.websocket_max_message,  # the relay's limit, on the client side too
        server_header=False,
        date_header=False,
        proxy_headers=False,
        access_log=False,
        timeout_keep_alive=settings.client_keepalive_timeout,
        timeout_graceful_shutdown=math.ceil(settings.graceful_timeout),
    )


class Supervisor(Multiprocess):
    """uvicorn's supervisor of several workers; SIGHUP makes each worker reload its configuration
    in place (reload.py), where uvicorn's would replace them all and lose their state."""

    def handle_hup(self) -> None:
        forward_sighup(self.processes)


class Server(uvicorn.Server):
    """uvicorn's Server, removing its `--uds` socket file once shut down: uvicorn re-raises the
    SIGTERM it caught right after, which ends the process before any code after `run()`."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.config.uds:  # once, at shutdown: a blocking unlink does not matter here
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.uds)


def serve(settings: Settings, args: argparse.Namespace) -> int:
    if settings.workers == 1:
        setup_logging(settings)
        config = server_config(settings, args, create_app(settings))
        # uvicorn's Config applied its logging config, which closes every handler there was,
        # lbapp's log writer included: set lbapp's logging up again, over it.
        setup_logging(settings)
        server = Server(config)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: shut down, as `uvicorn` does
            server.run()
        return 0 if server.started else 3  # 3: uvicorn's own start-up failure code
    # Several workers: each builds its own app (worker_app); this process only supervises. The
    # configuration is proved here first, so a bad one fails once, with its one line.
    with without_multiproc_dir():
        create_app(settings)
    own_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        # Each scrape must see every worker: give them a shared metrics directory of their own.
        own_dir = os.environ[MULTIPROC_ENV] = tempfile.mkdtemp(prefix="lbapp-metrics-")
    try:
        config = server_config(settings, args, "lbapp.cli:worker_app")
        with contextlib.suppress(KeyboardInterrupt):
            Supervisor(config, sockets=[config.bind_socket()]).run()
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
        remove_socket_file(args)
    return 0


def remove_socket_file(args: argparse.Namespace) -> None:
    if args.uds and os.path.exists(args.uds):
        os.remove(args.uds)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = resolve(args)
        if args.check:
            with without_multiproc_dir():
                create_app(settings)
            routes = len(settings.routes)
            print(
                f"lbapp: configuration OK: {len(settings.backends)} backends ({settings.algorithm}), "
                f"{routes} routes; would listen on {where(settings, args)}"
            )
            return 0
        return serve(settings, args)
    except SettingsError as exc:
        print(f"lbapp: {exc}", file=sys.stderr)
        return 1


def where(settings: Settings, args: argparse.Namespace) -> str:
    if args.fd is not None:
        return f"fd {args.fd}"
    if args.uds:
        return str(args.uds)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"{host}:{settings.port} with {settings.workers} worker(s)"
