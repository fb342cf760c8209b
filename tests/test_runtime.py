"""Process tuning: what `grokgate serve` changes in the garbage collector, and that an app's shutdown undoes it."""

from __future__ import annotations

import gc

from grokgate.runtime import GEN0_THRESHOLD, tune_gc


def test_tune_gc_freezes_startup_objects_and_undoes_it() -> None:
    before = gc.get_threshold()
    undo = tune_gc()
    try:
        assert gc.get_threshold() == (GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() > 1000  # the modules, classes and objects alive now
    finally:
        undo()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
