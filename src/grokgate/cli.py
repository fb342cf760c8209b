"""`grokgate serve | model`: the command line."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grokgate import __version__


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from grokgate.app import create_app
    from grokgate.observability.logging import configure
    from grokgate.server import BACKLOG, KEEP_ALIVE_SECONDS, http_protocol
    from grokgate.settings import Settings

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "threads", "slots", "ctx_per_slot", "keepalive_seconds", "log_level"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.model is not None:
        from grokgate.providers.model_files import CATALOG

        if args.model in CATALOG:  # the flag wins over a GROKGATE_MODEL_PATH in the environment
            overrides["local_model"] = args.model
            overrides["model_path"] = None
        else:
            overrides["model_path"] = Path(args.model)
    settings = Settings(**overrides)
    configure(settings.log_level)
    # Before the app opens anything: this raises the descriptor limit the app's pools and files share.
    protocol = http_protocol(settings)
    if not settings.api_keys:
        token = "gg-" + secrets.token_urlsafe(24)
        settings.api_keys = [token]
        print(
            "grokgate: no GROKGATE_API_KEYS configured; this run accepts the token below (shown once):\n"
            f"\n    Authorization: Bearer {token}\n",
            flush=True,
        )
    app = create_app(settings)
    print(f"grokgate: serving on http://{settings.host}:{settings.port}  (docs: /docs)", file=sys.stderr, flush=True)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        # The peer address is the socket's: X-Forwarded-For from a local proxy must not rewrite it (the
        # /metrics loopback rule and the per-client connection bound read it).
        proxy_headers=False,
        # grokgate.server: bounds on heads, bodies' arrival and connections; no WebSocket (the app has none).
        http=protocol,
        ws="none",
        backlog=BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )
    return 0


def progress_printer(label: str) -> Callable[[int, int], None]:
    """A progress callback (providers/model_files.py `Progress`) printing a line per 10% on stderr."""
    last = [-1]

    def show(done: int, total: int) -> None:
        pct = done * 100 // max(total, 1)
        if pct // 10 != last[0] // 10 or done == total:
            last[0] = pct
            print(f"grokgate: {label}: {pct}% ({done >> 20} / {total >> 20} MiB)", file=sys.stderr, flush=True)

    return show


def _model(args: argparse.Namespace) -> int:
    from grokgate.providers.model_files import CATALOG, ModelFileError, ensure_model
    from grokgate.settings import Settings

    settings = Settings(**({"local_model": args.name} if args.name else {}))
    model = CATALOG[settings.local_model]
    try:
        path = ensure_model(model, settings.cache_dir, progress=progress_printer(f"assembling {model.name}"))
    except ModelFileError as exc:
        print(f"grokgate: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from grokgate import routing
    from grokgate.settings import Settings

    settings = Settings()
    path = Path(args.config) if args.config else settings.config
    try:
        if path is None:
            parsed = routing.default_config(settings)
            where = "no routing file: " + ("xAI (XAI_API_KEY is set)" if parsed else "the local engine")
        else:
            parsed = routing.load(path, settings.environment())
            where = str(path)
    except routing.ConfigError as exc:
        print(f"grokgate: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {where}")
    if parsed is not None:
        for name, backend in parsed.backends.items():
            keys = f", {len(backend.api_keys)} key(s)" if backend.kind != "local" else ""
            print(f"  backend {name}: {backend.kind} {backend.base_url or ''}{keys}")
        for model, routes in parsed.models.items():
            chain = " -> ".join(f"{r.backend}:{r.model or model} (priority {r.priority})" for r in routes)
            print(f"  model {model}: {chain}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grokgate", description="Self-hosted Grok Chat Completions gateway.")
    parser.add_argument("--version", action="version", version=f"grokgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--model", metavar="NAME|PATH.gguf",
                       help="a catalog model (qwen2.5-coder-0.5b, the default, or qwen2.5-coder-1.5b) or any GGUF file")
    serve.add_argument("--threads", type=int, help="engine threads (default 1)")
    serve.add_argument("--slots", type=int, help="parallel generation slots (default 4)")
    serve.add_argument("--ctx-per-slot", type=int, help="context tokens per slot (default 4096)")
    serve.add_argument("--keepalive-seconds", type=float, help="SSE keep-alive interval (default 10)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    serve.set_defaults(func=_serve)

    model = sub.add_parser("model", help="assemble and verify a catalog model, print its path")
    model.add_argument("name", nargs="?",
                       help="qwen2.5-coder-0.5b or qwen2.5-coder-1.5b (default: GROKGATE_LOCAL_MODEL)")
    model.set_defaults(func=_model)

    config = sub.add_parser("config", help="the routing file").add_subparsers(dest="command", required=True)
    check = config.add_parser("check", help="validate the routing file (GROKGATE_CONFIG or --config)")
    check.add_argument("--config", metavar="PATH", help="grokgate.yaml to check")
    check.set_defaults(func=_config_check)

    from grokgate.cli_admin import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ValidationError as exc:
        if exc.title != "Settings":
            raise
        # A setting out of range is the operator's to fix: name it, without a traceback. The input is not
        # echoed: it may be a URL with a password in it.
        # A rule across settings (a model validator) has no location: its message names the variables.
        problems = "\n".join(f"  GROKGATE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" if e["loc"]
                             else f"  {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors(include_url=False))
        print(f"grokgate: invalid settings:\n{problems}", file=sys.stderr)
        return 2
    return result
