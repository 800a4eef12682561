"""The model registry on its own, with stand-in entries (the FLUX-backed checks live in test_fill_engine.py)."""

from __future__ import annotations

from atelier.registry import ModelRegistry


class Entry:
    def __init__(self, name: str):
        self.name, self.closed = name, 0

    def close(self) -> None:
        self.closed += 1


def test_build_once_per_key():
    reg, built = ModelRegistry(), []

    def build():
        built.append(Entry("a"))
        return built[-1]

    a = reg.get_or_build("a", build)
    assert reg.get_or_build("a", build) is a
    assert len(built) == 1 and reg.loads == 1
    assert reg.get("a") is a and reg.keys() == ["a"]


def test_a_group_holds_one_entry_and_other_groups_are_left_alone():
    reg = ModelRegistry()
    a = reg.get_or_build("a", lambda: Entry("a"), group="fill")
    other = reg.get_or_build("x", lambda: Entry("x"), group="caption")
    free = reg.get_or_build("y", lambda: Entry("y"))
    b = reg.get_or_build("b", lambda: Entry("b"), group="fill")
    assert reg.get("a") is None and a.closed == 1
    assert reg.get("b") is b and b.closed == 0
    assert reg.get("x") is other and reg.get("y") is free
    assert other.closed == 0 and free.closed == 0
    assert sorted(reg.keys()) == ["b", "x", "y"]
    assert reg.loads == 4


def test_the_previous_entry_is_released_before_the_next_is_built():
    reg, seen = ModelRegistry(), []
    a = reg.get_or_build("a", lambda: Entry("a"), group="g")

    def build_b():
        seen.append(a.closed)  # the old pipeline is gone before the new one takes memory
        return Entry("b")

    reg.get_or_build("b", build_b, group="g")
    assert seen == [1]


def test_release_closes_once_and_reports():
    reg = ModelRegistry()
    a = reg.get_or_build("a", lambda: Entry("a"))
    assert reg.release("a") is True
    assert reg.release("a") is False
    assert a.closed == 1
    assert reg.release("never") is False


def test_release_all_counts():
    reg = ModelRegistry()
    entries = [reg.get_or_build(k, lambda k=k: Entry(k)) for k in "abc"]
    assert reg.release_all() == 3
    assert reg.keys() == [] and all(e.closed == 1 for e in entries)
    assert reg.release_all() == 0


def test_hooks_see_builds_and_releases():
    reg, events = ModelRegistry(), []
    reg.on_built = lambda key, entry: events.append(("built", key, entry.name))
    reg.on_released = lambda key: events.append(("released", key))
    reg.get_or_build("a", lambda: Entry("a"), group="g")
    reg.get_or_build("a", lambda: Entry("a"), group="g")  # cached: no event
    reg.get_or_build("b", lambda: Entry("b"), group="g")
    reg.release("b")
    assert events == [("built", "a", "a"), ("released", "a"), ("built", "b", "b"), ("released", "b")]


def test_a_failed_build_leaves_nothing_behind():
    reg = ModelRegistry()

    def boom():
        raise RuntimeError("out of memory")

    try:
        reg.get_or_build("a", boom)
    except RuntimeError:
        pass
    assert reg.get("a") is None and reg.keys() == [] and reg.loads == 0
    assert reg.get_or_build("a", lambda: Entry("a")).name == "a"
