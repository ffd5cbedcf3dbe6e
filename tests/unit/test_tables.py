"""The write-behind mapping the gate keeps its state in: a decision's state changes reach the
table only after its events were published."""

from __future__ import annotations

import faust

from streams.tables import Utf8Keys, WriteBehind


def test_writes_wait_for_flush_and_reads_see_them_meanwhile() -> None:
    table = {"a": b"1", "b": b"2"}
    state = WriteBehind(table)
    state["a"] = b"10"
    state["c"] = b"3"
    del state["b"]
    assert table == {"a": b"1", "b": b"2"}  # nothing reached the table yet
    assert state["a"] == b"10" and "b" not in state and state.get("c") == b"3"
    assert dict(state.items()) == {"a": b"10", "c": b"3"} and len(state) == 2
    state.flush()
    assert table == {"a": b"10", "c": b"3"}


def test_a_discarded_decision_leaves_the_table_as_it_was() -> None:
    table = {"a": b"1"}
    state = WriteBehind(table)
    state["a"] = b"2"
    assert state.pop("a") == b"2"
    state.discard()
    assert state["a"] == b"1" and table == {"a": b"1"}


def test_writes_reach_the_store_and_queue_as_changelog_records() -> None:
    app = faust.App("test-tables", store="memory://")
    table = app.Table("gate", default=None, key_type=bytes, value_type=bytes)
    keys = Utf8Keys(table)
    state = WriteBehind(keys)
    state["R:1"] = b"claimed"
    state["R:2"] = b"pending"
    state.flush()
    del state["R:1"]
    state["R:2"] = b"claimed"
    state.flush()

    assert dict(table.data.items()) == {b"R:2": b"claimed"}
    assert keys.changes == [
        (b"R:1", b"claimed"),
        (b"R:2", b"pending"),
        (b"R:1", None),
        (b"R:2", b"claimed"),
    ]
