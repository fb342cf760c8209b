"""`grokgate serve --workers N`: N serving processes on one port, under one supervisor.

The supervisor (this module's `supervise`, the process `grokgate serve` started) serves nothing itself:

- **sockets**: it binds N listening sockets on the one address, with SO_REUSEPORT, and hands socket k to worker k.
  The kernel spreads new connections over the N sockets evenly (a shared single socket lets whichever worker
  wakes first accept a whole burst). The supervisor keeps every socket open for as long as it runs, so a
  connection hashed to worker k's socket while worker k is being replaced waits in that socket's queue for the
  next worker k instead of being refused. A plain bind of the port is tried first, so a port another server
  holds is refused as without `--workers` (SO_REUSEPORT alone would share it with any process of this user).
- **workers**: each is `python -m grokgate.workers`, a whole grokgate app (create_app) on its socket, with its own
  instance id `<instance>-w<k>` (`.<generation>` after a reload). On PostgreSQL each is a replica of the
  deployment like a server on another host: reservations and heartbeats are shared through the database, which
  keeps them exact across replicas already (store/holds.py, store/instances.py).
- **what one process must hold** is held by the supervisor and served to the workers over Unix sockets: on
  SQLite the store's reservations and its writer (grokgate/workers_sqlite.py); without Redis the rate limiter
  (with Redis, every worker uses it: store/limits_redis.py); the local engine, loaded once
  (grokgate/workers_engine.py).
- **metrics**: prometheus_client's multiprocess mode, in a directory of this run: each worker's counters and
  histograms are files there, and /metrics of any worker adds up every worker's, those of workers already
  replaced included (observability/metrics.py).
- **SIGHUP**: a rolling reload, one worker at a time: the new worker starts and reports ready (its app's
  start-up done, its socket being served) before the old one gets SIGTERM; the old one finishes what it serves.
  The worker serving gRPC (worker 0, one gRPC port) is stopped first instead, since its successor must bind it.
- **SIGTERM / SIGINT**: forwarded to every worker once; each stops as one server does (its requests finish, its
  store settles, store/sql.py close); then the supervisor closes the engine and the store it holds, and exits,
  0 if every worker exited 0.
- a worker that dies unasked is started again (same index and instance id, so it releases what it held).

`--workers` refuses accounts off (stored responses and deferred results would be per process).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grokgate.settings import Settings

# Seconds a worker may take to start (imports, migrations, the first heartbeat) before a reload gives up on it.
START_TIMEOUT_S = 120.0
# A worker a reload replaces (SIGUSR2) keeps serving this long with `Connection: close` on every answer, so clients
# stop reusing its kept-alive connections before it closes them (server.py Guard.closing).
DRAIN_S = 1.0
# A worker that dies unasked is restarted; if it keeps dying at start, at most once per this many seconds.
RESTART_BACKOFF_S = 1.0
_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_SPEC_ENV = "GROKGATE_WORKER_SPEC_"  # not a setting (Settings ignores unknown names)


class WorkersRefused(Exception):
    """The settings cannot be served by several processes; the message says why and what to do."""


def check(settings: Settings) -> None:
    """Refuse settings that several worker processes would serve wrongly (see the module's docstring)."""
    if not settings.accounts:
        raise WorkersRefused("--workers needs accounts on (GROKGATE_ACCOUNTS): without a database, stored "
                             "responses and deferred results would live in one worker's memory")


def uses_local_engine(settings: Settings) -> bool:
    """Whether the routing has the local engine (then the supervisor loads it: grokgate/workers_engine.py)."""
    from grokgate import routing

    if settings.replay_dir is not None and not settings.record_missing:
        return False  # pure replay builds no backend
    config = routing.load(settings.config, settings.environment()) if settings.config else None
    config = config or routing.default_config(settings)
    return config is None or any(b.kind == "local" for b in config.backends.values())


def is_postgres(settings: Settings) -> bool:
    """PostgreSQL (each worker a replica); else SQLite (the supervisor holds the holds: workers_sqlite.py)."""
    return (settings.database_url or "").startswith(("postgres:", "postgresql"))


# -- the supervisor -------------------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    generation: int
    process: subprocess.Popen[bytes]
    ready: int  # the read end of the pipe the worker writes one byte to when it serves
    started: float = field(default_factory=time.monotonic)

    def wait_ready(self, timeout: float) -> bool:
        import select

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            readable, _, _ = select.select([self.ready], [], [], 0.1)
            if readable:
                return os.read(self.ready, 1) == b"r"
        return False


class Supervisor:
    def __init__(self, settings: Settings, overrides: dict[str, Any], count: int) -> None:
        self.settings = settings
        self.overrides = overrides
        self.count = count
        self.sockets: list[socket.socket] = []
        self.workers: list[_Worker | None] = [None] * count
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="grokgate-metrics-"))
        self.signals: list[int] = []
        self.holds: Any = None  # SQLite: the HoldsServer (grokgate/workers_sqlite.py)
        self.engine: Any = None  # the local engine's EngineServer (grokgate/workers_engine.py)
        self.run_dir: Path | None = None  # their sockets

    def start_holds(self) -> None:
        """SQLite: open the store as its one serving process and serve its holds to the workers; without Redis,
        serve them one rate limiter too (on PostgreSQL only that)."""
        from grokgate.app import build_accounts
        from grokgate.store.limits_memory import MemoryRateLimiter
        from grokgate.workers_sqlite import HoldsServer, socket_dir

        # The store one process would serve (its admission unused); PostgreSQL: each worker's own.
        store = None if is_postgres(self.settings) else build_accounts(self.settings)[1]
        self.run_dir = self.run_dir or socket_dir()
        limiter = None if self.settings.redis_url else MemoryRateLimiter()
        self.holds = HoldsServer(store, limiter, self.run_dir / "holds.sock")
        self.holds.start()

    def start_engine(self) -> None:
        """Load the model here, once, and serve it to the workers."""
        from grokgate.app import local_options
        from grokgate.providers.local import LocalEngine
        from grokgate.workers_engine import EngineServer
        from grokgate.workers_sqlite import socket_dir

        self.run_dir = self.run_dir or socket_dir()
        self.engine = EngineServer(LocalEngine(**local_options(self.settings)),  # type: ignore[arg-type]
                                   self.run_dir / "engine.sock")
        self.engine.start()

    # -- sockets and processes ----------------------------------------------------------------------------------

    def bind(self) -> None:
        host, port = self.settings.host, self.settings.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:  # taken by any server: refused, as one process
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]  # port 0: the one the kernel chose, for every worker
        for _ in range(self.count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(2048)  # server.py BACKLOG
            sock.set_inheritable(True)
            self.sockets.append(sock)
        self.settings.port = port

    def instance(self, index: int, generation: int) -> str:
        base = f"{self.settings.instance()}-w{index}"
        return base if generation == 0 else f"{base}.{generation}"

    def spawn(self, index: int, generation: int) -> _Worker:
        read, write = os.pipe()
        sock = self.sockets[index]
        overrides = {**self.overrides, "instance_id": self.instance(index, generation), "port": self.settings.port}
        if index != 0:
            overrides["grpc_port"] = 0  # one gRPC server, on worker 0: its port takes no second bind
        spec = {"fd": sock.fileno(), "ready": write, "index": index, "overrides": overrides,
                "holds": None if self.holds is None else str(self.holds.path),
                "engine": None if self.engine is None else str(self.engine.path)}
        # The spec in the environment, not the arguments: it may hold the run's token, and `ps` shows arguments.
        env = {**os.environ, _MULTIPROC_ENV: str(self.metrics_dir), _SPEC_ENV: json.dumps(spec, default=str)}
        process = subprocess.Popen([sys.executable, "-m", "grokgate.workers"],
                                   pass_fds=(sock.fileno(), write), env=env, process_group=0)
        os.close(write)
        return _Worker(index, generation, process, read)

    @property
    def stop_timeout(self) -> float:
        """How long a stopping worker may take before it is killed: its drain, its requests' graceful end and its
        store's close (app.py), so a stream is never cut short by the supervisor alone."""
        return DRAIN_S + self.settings.drain_seconds + self.settings.graceful_timeout_seconds + 20.0

    def retire(self, worker: _Worker, sig: int | None = signal.SIGTERM, timeout: float | None = None) -> int | None:
        """Stop a worker (SIGTERM: it finishes what it serves; None: already asked) and forget its live gauges."""
        from prometheus_client import multiprocess

        if sig is not None and worker.process.poll() is None:
            worker.process.send_signal(sig)
        try:
            code = worker.process.wait(timeout)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            code = worker.process.wait()
        multiprocess.mark_process_dead(worker.process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
        os.close(worker.ready)
        return code

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self.signals.append(s))
        try:
            self.bind()
            if not is_postgres(self.settings) or not self.settings.redis_url:
                self.start_holds()
            if uses_local_engine(self.settings):
                self.start_engine()
            for k in range(self.count):
                self.workers[k] = self.spawn(k, 0)
            for worker in list(self.workers):
                assert worker is not None
                if not worker.wait_ready(START_TIMEOUT_S):
                    print(f"grokgate: worker {worker.index} did not start", file=sys.stderr, flush=True)
                    self.stop(signal.SIGTERM)
                    return 1
            print(f"grokgate: serving on http://{self.settings.host}:{self.settings.port} with {self.count} "
                  "workers  (docs: /docs)", file=sys.stderr, flush=True)
            return self.loop()
        finally:
            for worker in self.workers:  # only after a failed start: stop() ended them otherwise
                if worker is not None:
                    self.retire(worker, signal.SIGTERM, timeout=30)
            if self.engine is not None:
                self.engine.stop()
            if self.holds is not None:  # after every worker: what they settled is committed, then it closes
                self.holds.stop()
            for sock in self.sockets:
                sock.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            if self.run_dir is not None:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def loop(self) -> int:
        last_restart = 0.0
        while True:
            while self.signals:
                sig = self.signals.pop(0)
                if sig == signal.SIGHUP:
                    self.reload()
                else:
                    return self.stop(sig)
            for k, worker in enumerate(self.workers):
                if worker is not None and worker.process.poll() is not None:
                    code = self.retire(worker, None)
                    wait = last_restart + RESTART_BACKOFF_S - time.monotonic()
                    print(f"grokgate: worker {k} exited ({code}); starting it again", file=sys.stderr, flush=True)
                    if wait > 0:
                        time.sleep(wait)
                    last_restart = time.monotonic()
                    self.workers[k] = self.spawn(k, worker.generation)  # same id: it releases what was held
            time.sleep(0.1)

    def reload(self) -> None:
        """Replace the workers one at a time, each new one serving before its old one stops."""
        print("grokgate: SIGHUP: replacing the workers one at a time", file=sys.stderr, flush=True)
        for k, old in enumerate(self.workers):
            if old is None:
                continue
            grpc_owner = k == 0 and self.settings.grpc_port != 0
            if grpc_owner:
                self.retire(old, signal.SIGUSR2, timeout=self.stop_timeout)
            new = self.spawn(k, old.generation + 1)
            if not new.wait_ready(START_TIMEOUT_S):
                print(f"grokgate: reload: the new worker {k} did not start; keeping the old ones",
                      file=sys.stderr, flush=True)
                self.retire(new, timeout=10)
                if grpc_owner:  # its predecessor is gone: serve again as before the reload
                    self.workers[k] = self.spawn(k, old.generation)
                return
            self.workers[k] = new
            if not grpc_owner:
                self.retire(old, signal.SIGUSR2, timeout=self.stop_timeout)
            if self.signals and self.signals[0] != signal.SIGHUP:
                return  # a stop asked for meanwhile: the loop handles it
        print("grokgate: reload done", file=sys.stderr, flush=True)

    def stop(self, sig: int) -> int:
        forwarded = signal.SIGINT if sig == signal.SIGINT else signal.SIGTERM
        running = [w for w in self.workers if w is not None]
        for worker in running:
            if worker.process.poll() is None:
                worker.process.send_signal(forwarded)
        codes = [self.retire(w, None, timeout=self.stop_timeout) for w in running]
        self.workers = [None] * self.count
        return 0 if all(c == 0 for c in codes) else 1


def supervise(settings: Settings, overrides: dict[str, Any], count: int) -> int:
    """`grokgate serve --workers COUNT`: refuse what several processes cannot serve, then supervise."""
    try:
        check(settings)
    except WorkersRefused as exc:
        print(f"grokgate: {exc}", file=sys.stderr)
        return 2
    if not settings.api_keys:
        import secrets

        token = "gg-" + secrets.token_urlsafe(24)
        overrides = {**overrides, "api_keys": [token]}
        print("grokgate: no GROKGATE_API_KEYS configured; this run accepts the token below (shown once):\n"
              f"\n    Authorization: Bearer {token}\n", flush=True)
    try:
        return Supervisor(settings, overrides, count).run()
    except (OSError, RuntimeError) as exc:  # the port is taken, or the SQLite file is served by another grokgate
        print(f"grokgate: {exc}", file=sys.stderr)
        return 1


# -- a worker -------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies (even by SIGKILL): no worker outlives it."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def worker_main(spec: dict[str, Any]) -> int:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's to handle (a terminal hangs up the group)
    _die_with_parent()
    settings = Settings(**spec["overrides"])
    import uvicorn

    from grokgate.app import create_app
    from grokgate.drain import DrainingServer
    from grokgate.observability.logging import configure
    from grokgate.server import BACKLOG, KEEP_ALIVE_SECONDS, http_protocol

    configure(settings.log_level)
    protocol = http_protocol(settings)
    accounts = None
    if spec["holds"] is not None:
        from grokgate.workers_sqlite import worker_accounts

        accounts = worker_accounts(spec["holds"], holds=not is_postgres(settings))
    models = None
    if spec["engine"] is not None:
        from grokgate.app import build_routing, local_options
        from grokgate.workers_engine import remote_engine

        models = build_routing(settings, remote_engine(spec["engine"], local_options(settings)))
    app = create_app(settings, accounts=accounts, models=models)
    sock = socket.socket(fileno=spec["fd"])
    ready_fd: int = spec["ready"]
    # SIGTERM (the supervisor stopping): this worker drains as one server does (grokgate.drain: /readyz 503, every
    # answer closing its connection, then the graceful stop). SIGUSR2 (a reload replacing it): it leaves quietly,
    # its readiness unchanged (a balancer's health check may reach any worker of the port, and the port stays
    # ready), closing its connections for DRAIN_S before it stops accepting.
    drain = app.state.gateway.drain
    guard = getattr(protocol, "guard", None)
    if guard is not None:
        guard.drain = drain

    class Server(DrainingServer):
        leave_at: float | None = None

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                os.write(ready_fd, b"r")
                os.close(ready_fd)

        def leave(self) -> None:  # a signal handler, as handle_exit: it only sets what the loop's tick reads
            if not self.started:
                self.should_exit = True  # uvicorn stops right after its start-up
            elif self.leave_at is None and not self.should_exit:
                if guard is not None:
                    guard.closing = True
                self.leave_at = time.monotonic() + DRAIN_S

        async def on_tick(self, counter: int) -> bool:
            if self.leave_at is not None and not self.should_exit and time.monotonic() >= self.leave_at:
                self.should_exit = True
            return await super().on_tick(counter)

    # The same options as one process (cli.py _serve); uvicorn's graceful timeout is asyncio.wait_for's (a float).
    options: dict[str, Any] = {"timeout_graceful_shutdown": settings.graceful_timeout_seconds}
    config = uvicorn.Config(app, log_level="warning", access_log=False, proxy_headers=False, http=protocol,
                            ws="none", backlog=BACKLOG, timeout_keep_alive=KEEP_ALIVE_SECONDS, lifespan="on",
                            **options)
    server = Server(config, drain=drain, drain_seconds=settings.drain_seconds)
    signal.signal(signal.SIGUSR2, lambda _s, _f: server.leave())
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # as uvicorn.run: a SIGINT before the handlers were installed
        if server.force_exit:  # or one that forced the stop: not a clean exit
            return 128 + signal.SIGINT
    return 0 if server.started else 3


if __name__ == "__main__":
    sys.exit(worker_main(json.loads(os.environ.pop(_SPEC_ENV))))
