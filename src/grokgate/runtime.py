"""Process-level tuning for a long-running server."""

from __future__ import annotations

import gc
from collections.abc import Callable

# Collect the youngest generation after this many net allocations of tracked objects (CPython's default is
# 700). Requests in flight hold a few hundred short-lived objects each; at the default, every collection
# finds them still alive and promotes them, so the older generations grow and get scanned over and over.
# At 10,000 most of them have died by reference counting before a collection runs.
GEN0_THRESHOLD = 10_000


def tune_gc() -> Callable[[], None]:
    """Once startup is done: move everything that exists now (modules, classes, the app, caches, compiled
    statements) out of the collector's reach with `gc.freeze()`, and raise the young generation's threshold.

    Measured with ../shared/bench/loadgen.py at 64 connections (docs/benchmarks.md): with CPython's defaults
    the collector took about a quarter of the serving thread, full collections over ~150k startup objects
    most of it.

    Returns what undoes it, for the app's shutdown: an app embedded in a longer-lived process (tests, another
    server) must not leave its objects frozen or the thresholds changed.
    """
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, before[1], before[2])

    def undo() -> None:
        gc.set_threshold(*before)
        gc.unfreeze()

    return undo
