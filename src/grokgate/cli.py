"""`grokgate serve | model | config | cassettes | ...`: the command line."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grokgate import __version__

if TYPE_CHECKING:
    from grokgate.core.cassette import Exchange


def _serve(args: argparse.Namespace) -> int:
    from grokgate.settings import Settings

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "grpc_port", "threads", "slots", "ctx_per_slot", "keepalive_seconds", "log_level"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    for flag, name in (("record", "record_dir"), ("replay", "replay_dir"), ("replay_timing", "replay_timing")):
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag)
    if args.record_missing:
        overrides["record_missing"] = True
    if args.model is not None:
        from grokgate.providers.model_files import CATALOG

        if args.model in CATALOG:  # the flag wins over a GROKGATE_MODEL_PATH in the environment
            overrides["local_model"] = args.model
            overrides["model_path"] = None
        else:
            overrides["model_path"] = Path(args.model)
    settings = Settings(**overrides)
    if args.workers is not None and args.workers < 1:
        print("grokgate: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers is not None and args.workers > 1:  # several processes on the port: grokgate/workers.py
        from grokgate.workers import supervise

        return supervise(settings, overrides, args.workers)
    # The app's imports after the settings: a bad setting is refused without ~1 s of importing.
    from grokgate.app import create_app
    from grokgate.drain import serve
    from grokgate.observability.logging import configure
    from grokgate.server import BACKLOG, KEEP_ALIVE_SECONDS, http_protocol

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
    # grokgate.drain: on SIGTERM, /readyz goes 503 for GROKGATE_DRAIN_SECONDS before the server stops accepting.
    return serve(
        app,
        drain_seconds=settings.drain_seconds,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=settings.graceful_timeout_seconds,
        # The peer address is the socket's: X-Forwarded-For from a local proxy must not rewrite it (the
        # /metrics loopback rule and the per-client connection bound read it).
        proxy_headers=False,
        # grokgate.server: bounds on heads, bodies' arrival and connections; no WebSocket (the app has none).
        http=protocol,
        ws="none",
        backlog=BACKLOG,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


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


def _cassette_dir(args: argparse.Namespace) -> Path:
    """--dir, else GROKGATE_REPLAY_DIR, else GROKGATE_RECORD_DIR, else ./cassettes; with --tenant, that tenant's
    directory under it (providers/cassette_store.py)."""
    if args.dir is not None:
        root = Path(args.dir)
    else:
        from grokgate.settings import Settings

        settings = Settings()
        root = settings.replay_dir or settings.record_dir or Path("cassettes")
    from grokgate.providers.cassette_tenants import carry_over

    carry_over(root)  # a token's cassettes from before accounts are its account's now
    if getattr(args, "tenant", None):
        from grokgate.core.cassette import TENANTS, tenant_dir

        return root / TENANTS / tenant_dir(args.tenant)
    return root


def _scan(path: Path) -> Iterator[tuple[int, bytes, Exchange | None]]:
    """Each line of a cassette: (number, raw, exchange or None); a line that cannot be parsed is reported on stderr
    (and kept by prune), a blank one skipped."""
    import os

    from grokgate.providers.cassette_store import scan_lines

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for number, (_, raw, exchange, problem) in enumerate(scan_lines(fd), 1):
            if problem is not None:
                print(f"grokgate: line {number} of {path} cannot be parsed ({problem}): kept as it is",
                      file=sys.stderr)
            if exchange is not None or problem is not None:
                yield number, raw, exchange
    finally:
        os.close(fd)


def _sections(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(whose, directory) of the cassettes `list` shows: the shared ones, then each tenant's (named by its
    `.tenant` label), or one tenant's with --tenant."""
    directory = _cassette_dir(args)
    if getattr(args, "tenant", None):
        return [(args.tenant, directory)]
    from grokgate.core.cassette import TENANTS
    from grokgate.providers.cassette_store import TENANT_LABEL

    sections = [("(shared)", directory)]
    for sub in sorted((directory / TENANTS).glob("t-*")):
        label = sub / TENANT_LABEL
        whose = label.read_text(encoding="utf-8").strip() if label.is_file() else sub.name
        sections.append((whose, sub))
    return sections


def _cassettes_list(args: argparse.Namespace) -> int:
    rows = [(whose, path) for whose, directory in _sections(args) for path in sorted(directory.glob("*.jsonl"))]
    if not rows:
        print(f"no cassettes in {_cassette_dir(args)}")
        return 0
    print(f"{'tenant':<24} {'cassette':<32} {'exchanges':>9} {'requests':>8} {'failures':>8} {'unparsable':>10}  "
          "models")
    for whose, path in rows:
        scanned = list(_scan(path))
        exchanges = [e for _, _, e in scanned if e is not None]
        models = sorted({m for e in exchanges if (m := e.model_name)})
        failures = sum(1 for e in exchanges if e.error is not None)
        print(f"{whose:<24} {path.stem:<32} {len(exchanges):>9} {len({e.key for e in exchanges}):>8} "
              f"{failures:>8} {len(scanned) - len(exchanges):>10}  {', '.join(models)}")
    return 0


def _summary(events: list[dict[str, Any]]) -> tuple[str, str, str]:
    """(text, finish reasons, usage) of a recorded exchange, for `cassettes show`."""
    text = "".join(str(e["delta"].get("content") or "") for e in events if "delta" in e)
    calls = sum(len(e["delta"].get("tool_calls") or ()) for e in events if "delta" in e)
    finishes = ",".join(str(e["finish"]["reason"]) for e in events if "finish" in e)
    usage = next((e["usage"] for e in reversed(events) if "usage" in e), None)
    shown = text if len(text) <= 60 else text[:57] + "..."
    if calls:
        shown += f" [{calls} tool call(s)]"
    used = f"{usage['prompt_tokens']}+{usage['completion_tokens']} tokens" if usage else "no usage"
    return shown, finishes or "-", used


def _named(args: argparse.Namespace, name: str) -> Path | None:
    """The cassette file NAME names (None, reported: a name the header would refuse)."""
    from grokgate.core.cassette import cassette_name
    from grokgate.core.errors import GatewayError

    try:
        return _cassette_dir(args) / f"{cassette_name(name)}.jsonl"
    except GatewayError as exc:
        print(f"grokgate: {exc.message}", file=sys.stderr)
        return None


def _cassettes_show(args: argparse.Namespace) -> int:
    import json

    path = _named(args, args.name)
    if path is None:
        return 2
    if not path.is_file():
        print(f"grokgate: no cassette {args.name!r} ({path})", file=sys.stderr)
        return 1
    for number, _, exchange in _scan(path):
        if exchange is None:
            if not args.json:
                print(f"#{number} cannot be parsed (kept as it is)")
            continue
        if args.json:
            print(json.dumps(exchange.to_json(), ensure_ascii=False, indent=2))
            continue
        text, finishes, used = _summary(exchange.events)
        outcome = (f"error {exchange.error.get('status')} {exchange.error.get('code')}" if exchange.error
                   else f"finish {finishes}")
        print(f"#{number} {exchange.key[:12]} {exchange.model_name or '?'} via {exchange.backend} "
              f"at {exchange.recorded_at or '?'}: {outcome}, {used}")
        if text:
            print(f"    {text!r}")
    return 0


def _pruned(path: Path, keep: int | None) -> tuple[list[bytes], int]:
    """The lines a cassette keeps (every line that cannot be parsed among them, as it is) and how many go."""
    import json

    lines: list[tuple[bytes, Exchange | None]] = [(raw, e) for _, raw, e in _scan(path)]
    seen: set[str] = set()
    kept: list[tuple[bytes, Exchange | None]] = []
    for raw, exchange in lines:
        if exchange is not None:
            fingerprint = json.dumps([exchange.key, exchange.answer()], sort_keys=True)
            if fingerprint in seen:
                continue
            seen.add(fingerprint)
        kept.append((raw, exchange))
    if keep is not None:
        counts: dict[str, int] = {}
        last = []
        for raw, exchange in reversed(kept):  # the newest recordings of a request are the ones kept
            if exchange is not None:
                counts[exchange.key] = counts.get(exchange.key, 0) + 1
                if counts[exchange.key] > keep:
                    continue
            last.append((raw, exchange))
        kept = last[::-1]
    return [raw for raw, _ in kept], len(lines) - len(kept)


def _cassettes_prune(args: argparse.Namespace) -> int:
    """Drop duplicate recordings (same request, same answer), and with --keep N all but a request's last N, under
    the lock a recording server's appends take (so none is lost); a line that cannot be parsed is kept."""
    import os

    from grokgate.providers.cassette_store import cassette_lock

    if args.keep is not None and args.keep < 1:
        print("grokgate: --keep must be at least 1", file=sys.stderr)
        return 2
    if args.name:
        named = _named(args, args.name)
        if named is None:
            return 2
        paths = [named]
    else:
        paths = sorted(_cassette_dir(args).glob("*.jsonl"))
    for path in paths:
        if not path.is_file():
            print(f"grokgate: no cassette {path.stem!r} ({path})", file=sys.stderr)
            return 1
        with cassette_lock(path):
            kept, removed = _pruned(path, args.keep)
            if removed and not args.dry_run:
                tmp = path.with_name(path.name + ".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.writelines(kept)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
        print(f"{path.stem}: {len(kept)} kept, {removed} {'would be ' if args.dry_run else ''}removed")
    return 0


def add_cassette_commands(sub: Any) -> None:
    cassettes = sub.add_parser("cassettes", help="recorded exchanges (serve --record / --replay)").add_subparsers(
        dest="command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", metavar="DIR",
                       help="the cassettes' directory (default: GROKGATE_REPLAY_DIR, GROKGATE_RECORD_DIR, ./cassettes)")
    where.add_argument("--tenant", metavar="TENANT",
                       help="a tenant's own cassettes (account:<id>, or key:<key id> for a static key; docs/replay.md)"
                            " rather than the shared ones")
    listing = cassettes.add_parser("list", parents=[where],
                                   help="each cassette (the shared ones, then each tenant's): exchanges, requests, "
                                        "models")
    listing.set_defaults(func=_cassettes_list)
    show = cassettes.add_parser("show", parents=[where], help="one cassette's exchanges")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="the exchanges as recorded (indented JSON)")
    show.set_defaults(func=_cassettes_show)
    prune = cassettes.add_parser("prune", parents=[where],
                                 help="drop duplicate recordings (same request and answer); --keep N per request")
    prune.add_argument("name", nargs="?", help="one cassette (default: all of the directory)")
    prune.add_argument("--keep", type=int, metavar="N", help="keep only each request's last N recordings")
    prune.add_argument("--dry-run", action="store_true", help="say what would be removed, change nothing")
    prune.set_defaults(func=_cassettes_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grokgate", description="Self-hosted Grok Chat Completions gateway.")
    parser.add_argument("--version", action="version", version=f"grokgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--grpc-port", type=int,
                       help="port of xAI's native gRPC API, for xai-sdk (default 50051; 0: off)")
    serve.add_argument("--model", metavar="NAME|PATH.gguf",
                       help="a catalog model (qwen2.5-coder-0.5b, the default, or qwen2.5-coder-1.5b) or any GGUF file")
    serve.add_argument("--threads", type=int, help="engine threads (default 1)")
    serve.add_argument("--slots", type=int, help="parallel generation slots (default 4)")
    serve.add_argument("--ctx-per-slot", type=int, help="context tokens per slot (default 4096)")
    serve.add_argument("--keepalive-seconds", type=float, help="SSE keep-alive interval (default 10)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    serve.add_argument("--workers", type=int, metavar="N",
                       help="serve from N processes on the one port (SQLite or PostgreSQL, the local model loaded "
                            "once; SIGHUP reloads them one at a time; docs/operations.md)")
    serve.add_argument("--record", type=Path, metavar="DIR",
                       help="record every request that reaches a backend into cassettes in DIR (docs/replay.md)")
    serve.add_argument("--replay", type=Path, metavar="DIR",
                       help="answer from the cassettes in DIR: no model, no upstream (a miss is a replay_miss error)")
    serve.add_argument("--record-missing", action="store_true",
                       help="with --replay: a miss goes to the configured backends and is appended to its cassette")
    serve.add_argument("--replay-timing", choices=("instant", "recorded"),
                       help="replay events at once (default) or with their recorded gaps")
    serve.set_defaults(func=_serve)

    model = sub.add_parser("model", help="assemble and verify a catalog model, print its path")
    model.add_argument("name", nargs="?",
                       help="qwen2.5-coder-0.5b or qwen2.5-coder-1.5b (default: GROKGATE_LOCAL_MODEL)")
    model.set_defaults(func=_model)

    config = sub.add_parser("config", help="the routing file").add_subparsers(dest="command", required=True)
    check = config.add_parser("check", help="validate the routing file (GROKGATE_CONFIG or --config)")
    check.add_argument("--config", metavar="PATH", help="grokgate.yaml to check")
    check.set_defaults(func=_config_check)

    add_cassette_commands(sub)

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
