"""Services the scale-out tests start and stop themselves, from Debian's packages: a 3-node Redis Cluster
(tests/test_redis_cluster.py) and PgBouncer in transaction mode (tests/test_pgbouncer.py).

Each runs on free ports in the test's own directory, as a child of the test process, and is stopped (SIGTERM,
then SIGKILL) when its `with` block ends, failed or not. A package that is missing and cannot be installed skips
the test with the reason.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import PG_ADMIN_URL, _pg_execute, free_port


def ensure_package(command: str, package: str) -> str:
    """The path of `command`, installing Debian's `package` first when it is missing and this runs as root (as
    `make test` installs chromium: see the Makefile); skips the test with the reason otherwise."""
    found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
        done = subprocess.run(install, env=env, capture_output=True, timeout=600)
        if done.returncode != 0:  # the package lists may be missing or stale: once more after an update
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
            subprocess.run(install, env=env, capture_output=True, timeout=600)
        found = shutil.which(command) or shutil.which(command, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if found:
            return found
    pytest.skip(f"{command} (Debian package {package}) is not installed and could not be installed here")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_port(port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f} s:\n{log.read_text(errors='replace')}")


# -- Redis Cluster ---------------------------------------------------------------------------------------------


@dataclass
class RedisNode:
    port: int
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class RedisClusterNodes:
    nodes: list[RedisNode]

    @property
    def url(self) -> str:
        """grokgate's URL of the cluster (store/redis_client.py): every node listed, any one would do."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def restart(self, node: RedisNode) -> None:
        """A stopped node again, on its port with its nodes.conf (its identity and slots); the cluster's
        clean-up stops it."""
        stop_process(node.process)
        with node.log.open("ab") as out:
            node.process = subprocess.Popen(node.process.args, stdout=out, stderr=subprocess.STDOUT)
        wait_port(node.port, node.process, node.log)


def _cli(port: int, *args: str, timeout: float = 30) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


def _cluster_port() -> int:
    """A free port whose cluster bus port (10,000 higher, so the port is at most 55535) is free too."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20_000, 55_535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10_000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _start_redis(tmp: Path, server: str, port: int) -> RedisNode:
    home = tmp / f"redis-{port}"
    home.mkdir(parents=True)
    log = home / "redis.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(home / "nodes.conf"), "--cluster-node-timeout", "2000",
             "--save", "", "--appendonly", "no", "--dir", str(home), "--daemonize", "no"],
            stdout=out, stderr=subprocess.STDOUT)
    return RedisNode(port, process, log)


@contextmanager
def redis_cluster(tmp: Path, nodes: int = 3) -> Iterator[RedisClusterNodes]:
    """A Redis Cluster of `nodes` primaries and no replicas (the slots split evenly), stopped at the end.
    cluster-node-timeout is 2 s, so a stopped node is marked failed (and the cluster down) quickly."""
    server = ensure_package("redis-server", "redis-server")
    ensure_package("redis-cli", "redis-tools")
    with ExitStack() as stack:
        started: list[RedisNode] = []
        for _ in range(nodes):
            for attempt in range(3):
                node = _start_redis(tmp / uuid.uuid4().hex[:6], server, _cluster_port())
                stack.callback(lambda n=node: stop_process(n.process))  # the process `restart` made, if any
                try:
                    wait_port(node.port, node.process, node.log)
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise  # not only a port taken between free_port() and the bind
            started.append(node)
        _cli(started[0].port, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in started),
             "--cluster-replicas", "0", "--cluster-yes", timeout=60)
        deadline = time.monotonic() + 30
        while any("cluster_state:ok" not in _cli(n.port, "cluster", "info") for n in started):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok in 30 s")
            time.sleep(0.1)
        yield RedisClusterNodes(started)


# -- PgBouncer -------------------------------------------------------------------------------------------------


@dataclass
class PgBouncer:
    port: int
    database: str  # the fresh database it serves, under the same name
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"postgresql://{_pg_user()}@127.0.0.1:{self.port}/{self.database}"

    @property
    def direct_url(self) -> str:
        """The same database without PgBouncer (for the test's own checks)."""
        return f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{self.database}"


def _pg_user() -> str:
    from urllib.parse import urlsplit

    return urlsplit(PG_ADMIN_URL).username or "postgres"


@contextmanager
def pgbouncer(*, pool_size: int = 10) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of a fresh database of PostgreSQL at 127.0.0.1:5432 (as
    conftest's `pg_url`), trusting the test's user. Server connections are reset with DEALLOCATE ALL after every
    transaction (docs/operations.md says why); at most `pool_size` of them per database. Skipped when
    PostgreSQL is absent or PgBouncer cannot be installed."""
    from urllib.parse import urlsplit

    binary = ensure_package("pgbouncer", "pgbouncer")
    name = f"grokgate_test_{uuid.uuid4().hex[:12]}"
    try:
        _pg_execute(f'CREATE DATABASE "{name}"')
    except (OSError, TimeoutError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}: {exc}")
    with ExitStack() as stack:
        stack.callback(_pg_execute, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        # Not under pytest's tmp_path (its folders are private to the test's user): PgBouncer started as root
        # switches to `postgres`, which must reach its files.
        home = Path(tempfile.mkdtemp(prefix="grokgate-pgbouncer-"))
        stack.callback(shutil.rmtree, home, True)
        home.chmod(0o755)
        user = _pg_user()
        server = urlsplit(PG_ADMIN_URL)
        (home / "userlist.txt").write_text(f'"{user}" ""\n')
        for attempt in range(3):
            port = free_port()
            ini = home / "pgbouncer.ini"
            ini.write_text(f"""[databases]
{name} = host={server.hostname or '127.0.0.1'} port={server.port or 5432} dbname={name} user={user}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home / 'userlist.txt'}
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 1000
server_reset_query = DEALLOCATE ALL
server_reset_query_always = 1
ignore_startup_parameters = extra_float_digits
logfile = {home / 'pgbouncer.log'}
""")
            (home / "pgbouncer.log").touch()
            for path in home.iterdir():
                path.chmod(0o666)
            log = home / "stdout.log"
            # PgBouncer refuses to run as root: -u names the user it switches to.
            run_as = ["-u", "postgres"] if os.geteuid() == 0 else []
            with log.open("wb") as out:
                process = subprocess.Popen([binary, *run_as, str(ini)], stdout=out, stderr=subprocess.STDOUT)
            stack.callback(stop_process, process)
            try:
                wait_port(port, process, log)
            except RuntimeError:
                stop_process(process)
                if attempt == 2:
                    raise
                continue
            yield PgBouncer(port, name, process, home / "pgbouncer.log")
            return
