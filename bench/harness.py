"""What the bench scripts that start processes share: free ports, waiting for a listener, the CPU time of a process
tree (/proc), and stopping what was started. Imported by its siblings (bench/ is on sys.path when one runs)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterable
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def cpu_seconds(root: int) -> float:
    """CPU time (user + system) of a process and its live descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        stats[pid] = (int(fields[11]) + int(fields[12])) / TICK
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def stop(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGINT each (last started first), as a terminal's Ctrl-C would; killed after 20 s."""
    for proc in reversed(list(procs)):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
