"""Process-level tuning for a long-running server."""

from __future__ import annotations

import gc

# Collect the youngest generation after this many net allocations of tracked objects (CPython's default is
# 700). Requests in flight hold a few hundred short-lived objects each; at the default, every collection
# finds them still alive and promotes them, so the older generations grow and get scanned over and over.
# At 10,000 most of them have died by reference counting before a collection runs.
GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Once startup is done: move everything that exists now (modules, classes, the app, caches, compiled
    statements) out of the collector's reach with `gc.freeze()`, and raise the young generation's threshold.

    Measured with ../shared/bench/loadgen.py at 64 connections (docs/benchmarks.md): with CPython's defaults
    the collector took about a quarter of the serving thread, full collections over ~150k startup objects
    most of it.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
