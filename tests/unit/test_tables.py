"""The write-behind mapping the gate keeps its state in: a decision's state changes reach the
table only after its events were published."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import faust
import pytest
from faust.types import TP

from streams.app import Streams
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


async def test_keys_written_for_a_partition_go_when_it_moves_to_another_worker() -> None:
    # Faust's memory store drops, when a recovery ends, the keys of partitions this worker no
    # longer has, if it knows their partition: left behind, they would come back as live work
    # if the partition came back after their tombstones were compacted away.
    app = faust.App("test-tables-moved", store="memory://")
    table = app.Table("gate", default=None, key_type=bytes, value_type=bytes, partitions=4)
    keys = Utf8Keys(table)
    keys["R:kept"] = b"pending"
    keys.sent(2, keys.take())
    keys["R:moved"] = b"claimed"
    keys["R:ended"] = b"claimed"
    del keys["R:ended"]
    keys.sent(3, keys.take())
    assert keys.changes == []

    changelog = table.changelog_topic.get_topic_name()
    await table.on_recovery_completed({TP(changelog, 2)}, set())
    assert dict(table.data.items()) == {b"R:kept": b"pending"}


async def test_changelog_records_whose_send_failed_part_way_are_sent_again() -> None:
    # The chains and commands agents retry a decision when the broker is away; the state is in
    # the store already, so a retry may write nothing new, and the records must still go.
    app = faust.App("test-tables-retry", store="memory://")
    table = app.Table("chains", default=None, key_type=bytes, value_type=bytes, partitions=4)
    keys = Utf8Keys(table)
    landed: list[bytes] = []
    failures = [TimeoutError("the broker is away")]  # for the first send of b

    async def send(topic: str, key: bytes, value: bytes | None, partition: int, *_: Any) -> Any:
        if key == b"b" and failures:
            raise failures.pop()
        landed.append(key)
        return None

    streams = object.__new__(Streams)  # the producer is the only part it needs
    streams.app = cast(Any, SimpleNamespace(producer=SimpleNamespace(send=send)))
    keys["a"] = b"1"
    keys["b"] = b"2"
    with pytest.raises(TimeoutError):
        await streams.send_changelog(1, keys)
    assert keys.changes == [(b"a", b"1"), (b"b", b"2")]

    await streams.send_changelog(1, keys)
    assert landed == [b"a", b"a", b"b"] and keys.changes == []
