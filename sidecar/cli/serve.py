"""`sidecar serve` (the listeners) and `sidecar fallback` (Traefik's error server)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..runtime.config import Settings, with_overrides
from .parsing import CliError, _positive_int, command_name, config_path


def register(sub) -> None:
    serve = sub.add_parser("serve", help="run the data-plane and admin listeners")
    serve.add_argument("--config", dest="config_sub")
    serve.add_argument("--state-dir", dest="state_dir_sub")
    serve.add_argument("--workers", type=_positive_int)
    serve.add_argument("--worker-process", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(start=_serve)

    fallback = sub.add_parser("fallback", help="serve the JSON errors a proxy shows while "
                                               "the sidecar is down (Traefik)")
    fallback.add_argument("--listen", default="127.0.0.1:8090", help="HOST:PORT")
    fallback.set_defaults(bare=_fallback)   # no settings: it must run where ours don't


def _fallback(args: argparse.Namespace) -> int:
    from ..dataplane import fallback
    from ..runtime.config import parse_hostport
    from ..runtime.server import _run_loop

    host, port = parse_hostport(args.listen, "--listen")
    try:
        _run_loop(fallback.run(host, port))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.listen}: {exc.strerror or exc}") from None
    return 0


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from ..runtime import logs, server

    if args.workers:
        settings = with_overrides(settings, workers=args.workers)
    logs.setup(settings.log_level)
    server.require_grpc(settings)
    if args.worker_process:  # started by a supervising `serve --workers N`
        server._run_loop(server.run(settings, data=True, admin=False, worker=True))
        return 0
    server.prepare_multiprocess_metrics(settings.workers)
    lock = embedded = None
    if settings.embedded_redis:
        from ..runtime.embedded import for_serve
        lock, embedded = for_serve(settings)    # held until this process ends
    # A port held by another process (with SO_REUSEPORT or not) stops us here, before
    # redis-server starts: our own workers are the only ones to share the data plane's.
    server.check_free(settings.listen, "listen")
    server.check_free(settings.admin_listen, "admin_listen")
    if settings.grpc_listen:
        server.check_free(settings.grpc_listen, "grpc_listen")
    if embedded is not None:
        from ..runtime.embedded import start
        settings = start(settings, embedded)
        logs.event("embedded_redis", socket=embedded.url, state_dir=str(embedded.dir),
                   note="no redis_url set: using a private redis-server with AOF on")
    print(first_key_hint(settings, args, embedded is not None), file=sys.stderr, flush=True)
    try:
        return server.serve(settings, embedded, config_path(args))
    finally:
        if lock is not None:
            lock.release()


def first_key_hint(settings: Settings, args: argparse.Namespace, embedded: bool) -> str:
    """What serve prints: two lines to paste as they are into another shell."""
    from ..runtime.config import parse_hostport

    cmd = command_name()
    config = config_path(args) or os.environ.get("SIDECAR_CONFIG")
    if config:
        cmd += f" --config {shlex.quote(str(Path(config).absolute()))}"
    if embedded and settings.state_dir:   # not the default: the other shell needs it
        cmd += f" --state-dir {shlex.quote(settings.state_dir)}"
    host, port = parse_hostport(settings.listen, "listen")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (f"sidecar: serving on http://{where}. Make a first key and try it "
            f"(paste in another shell):\n"
            f"  KEY=$({cmd} keys create --name first --quota 1000 --quiet)\n"
            f"  curl -i -H \"Authorization: Bearer $KEY\" "
            f"-d '{{\"model\":\"gpt-5.5\",\"messages\":[]}}' "
            f"http://{where}/authz/v1/chat/completions")
