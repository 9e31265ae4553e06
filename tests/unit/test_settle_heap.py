"""Engine processes freeze what start-up built, so full collections stop walking it."""

from __future__ import annotations

import gc

from streamflow.cli import _settle_heap


def test_settling_the_heap_freezes_every_object_alive() -> None:
    gc.unfreeze()
    try:
        alive = len(gc.get_objects())
        _settle_heap()
        assert gc.get_freeze_count() >= alive * 0.9
        assert len(gc.get_objects()) < alive * 0.1  # what is left for the collector
    finally:
        gc.unfreeze()
