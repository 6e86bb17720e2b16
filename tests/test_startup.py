"""startup.py: the collector is paused while the training stack loads, and what it made is frozen."""

from __future__ import annotations

import gc

from lunatrain.startup import collector_paused, import_training_stack


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector could ever free it


def test_collector_paused_freezes_what_was_made_and_restores_the_collector():
    gc.enable()
    before = gc.get_freeze_count()
    with collector_paused():
        assert not gc.isenabled()
        made = [Node() for _ in range(1000)]
    assert gc.isenabled()
    assert gc.get_freeze_count() >= before + 1000  # the nodes (and their dicts) left the generations
    del made
    gc.collect()
    assert gc.get_freeze_count() >= before + 1000  # frozen: a full collection neither walks nor frees them


def test_a_collector_that_was_off_stays_off():
    gc.disable()
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_importing_the_stack_again_is_free(monkeypatch):
    import peft  # noqa: F401 - loaded: what a job forked from the warm worker finds

    from lunatrain import startup

    def pause_again():
        raise AssertionError("the collector was paused (and everything frozen) again")

    monkeypatch.setattr(startup, "collector_paused", pause_again)
    before = gc.get_freeze_count()
    import_training_stack()
    # A second freeze would add every object made since the first. (The count can drop meanwhile: frozen
    # objects are still freed when their last reference goes, e.g. by another test's thread.)
    assert gc.get_freeze_count() <= before
