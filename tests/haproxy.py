"""HAProxy in front of grokgate replicas (tests/test_load_balancer.py), from Debian's package: installed by name
when missing and this runs as root (tests/services.py `ensure_package`), else the test is skipped with the reason.

The configuration is the sample of docs/operations.md ("Behind a load balancer"), with faster checks: readiness
(`GET /readyz`) every 200 ms, two failures to take a server out and two successes to bring it back; a request
whose connection failed, or whose connection was closed before any answer, is retried on another replica. Each
answer names the replica that gave it (`x-grokgate-replica`), and a stats listener answers the servers' states.
"""

from __future__ import annotations

import csv
import io
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.services import ensure_package, stop_process, wait_port

REPLICA_HEADER = "x-grokgate-replica"
BACKEND = "grokgate"


def config(port: int, stats_port: int, replicas: Sequence[tuple[str, int]]) -> str:
    servers = "\n".join(f"    server {name} 127.0.0.1:{p} check" for name, p in replicas)
    return f"""global
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout check 2s
    # Requests that never reached a replica (refused, or a kept-alive connection closed under them) go to another.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response

frontend clients
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 200ms fastinter 100ms downinter 200ms fall 2 rise 2
    # A POST is retried only when it never reached a replica: one that died after committing its settlement
    # must not be answered (and billed) again elsewhere (docs/operations.md).
    http-request disable-l7-retry if METH_POST
    http-response set-header {REPLICA_HEADER} %[srv_name]
{servers}

listen stats
    bind 127.0.0.1:{stats_port}
    stats enable
    stats uri /stats
"""


@dataclass
class HAProxy:
    port: int
    stats_port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it: "UP", "DOWN", or a transition ("UP 1/2", "DOWN 1/2")."""
        r = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats;csv", timeout=5)
        r.raise_for_status()
        rows = csv.DictReader(io.StringIO(r.text.lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows
                if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}

    def wait_state(self, name: str, state: str, timeout: float = 30) -> float:
        """Wait until HAProxy reports `name` in `state`; returns when (time.monotonic())."""
        deadline = time.monotonic() + timeout
        seen = ""
        while time.monotonic() < deadline:
            seen = self.states().get(name, "")
            if seen == state:
                return time.monotonic()
            time.sleep(0.02)
        raise AssertionError(f"HAProxy still reports {name} as {seen!r}, not {state!r}, after {timeout:.0f} s:\n"
                             f"{self.log.read_text(errors='replace')[-3000:]}")


@contextmanager
def haproxy(tmp: Path, replicas: Sequence[tuple[str, int]]) -> Iterator[HAProxy]:
    """HAProxy balancing `replicas` ((name, port) each), stopped when the block ends, failed or not; once every
    replica is reported UP."""
    binary = ensure_package("haproxy", "haproxy")
    for attempt in range(3):
        port, stats_port = free_port(), free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(config(port, stats_port, replicas))
        log = tmp / "haproxy.log"
        with log.open("ab") as out:
            # -db: in the foreground, as the test's child.
            process = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_port(port, process, log)
            wait_port(stats_port, process, log)
        except RuntimeError:
            stop_process(process)
            if attempt == 2:
                raise
            continue
        try:
            proxy = HAProxy(port, stats_port, process, log)
            for name, _ in replicas:
                proxy.wait_state(name, "UP")
            yield proxy
        finally:
            stop_process(process)
        return
