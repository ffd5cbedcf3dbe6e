"""Keeps a Faust worker's fetch from consuming records that Faust will then throw away.

Faust's fetcher task asks the consumer thread for records with ``getmany``, which calls
aiokafka's ``Fetcher.fetched_records(active_partitions, timeout=1.0)``. Two things in that call
lose a table's changelog records during a rebalance, and with them the table recovery:

- ``active_partitions`` is Faust's *live* set of unpaused partitions; a rebalance empties it
  (every partition is paused until recovery resumes the ones it needs), and aiokafka reads an
  empty set as "every assigned partition" (``if partitions and tp not in partitions``);
- the call does not end at a rebalance: it waits out the group's re-join
  (``wait_for_assignment``) and then goes on fetching for the *new* assignment until its
  timeout.

So a ``getmany`` started before a rebalance drains whatever the new assignment fetched first,
changelog partitions included, and hands it to Faust while the flow is stopped; Faust drops
it ("getmany called while flow not active. Seek back to committed offsets.") and seeks only
the stream partitions back (a changelog has no committed offset). When that drain lands after
recovery has sought a changelog partition to where its reading starts, the consumer's position
is already past the records recovery waits for: recovery never gets them and hangs with a
constant count remaining, while a fresh process (a new consumer) recovers at once.

The replacement below reads the same records the same way, but decides on every pass, in the
consumer thread, right before taking records out of aiokafka's buffer: nothing while Faust's
flow is stopped, a re-join is under way or the generation changed since the call began, and
never with an empty partition set. Records are then only consumed for partitions Faust
currently accepts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka.errors import ConsumerStoppedError
from faust.transport.drivers import aiokafka as faust_aiokafka

# How long a call waits before giving the fetcher task its empty answer while a re-join is
# under way but Faust has not stopped its flow yet (so that the task does not spin).
_REJOIN_PAUSE_S = 0.05


async def _fetch_records(
    self: Any,
    consumer: Any,
    active_partitions: Any,
    timeout: float | None = None,  # noqa: ASYNC109 - Faust's signature, called by keyword
    max_records: int | None = None,
) -> Any:
    flow = self.consumer  # the Faust consumer: flow_active is read in this thread, each pass
    if not flow.flow_active:
        return {}
    fetcher = consumer._fetcher
    if consumer._closed or fetcher._closed:
        raise ConsumerStoppedError()
    subscriptions = fetcher._subscriptions
    generation = self.app.consumer_generation_id
    deadline = time.monotonic() + (timeout or 0.0)
    with subscriptions.fetch_context():
        while True:
            if not flow.flow_active or self.app.consumer_generation_id != generation:
                return {}
            if subscriptions.reassignment_in_progress:
                await asyncio.sleep(max(0.0, min(_REJOIN_PAUSE_S, deadline - time.monotonic())))
                return {}
            # None: a client-only app, which reads every assigned partition (as before).
            partitions = None if active_partitions is None else frozenset(active_partitions)
            if partitions is not None and not partitions:
                return {}
            # timeout=0: one pass over what is buffered, no waiting inside aiokafka (where a
            # rebalance could intervene); the wait is ours, below.
            records = await fetcher.fetched_records(partitions, timeout=0, max_records=max_records)
            if records:
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return {}
            waiter = fetcher._create_fetch_waiter()
            done, pending = await asyncio.wait([waiter], timeout=remaining)
            if not done or fetcher._closed:
                for fut in pending:
                    fut.cancel()
                return {}
            waiter.result()  # raises what the fetch routine failed with


def install() -> None:
    faust_aiokafka.AIOKafkaConsumerThread._fetch_records = _fetch_records  # type: ignore[method-assign]
