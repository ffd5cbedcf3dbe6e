"""Keeps Faust from moving an input's offsets past records its agent never took.

Two places in Faust did, and a gate partition kept across a rebalance lost one executor report
to them (docs/design.md, "An agent's input never skips a record"):

- **The seek at the end of a recovery.** Faust resumes a worker's stream partitions, then seeks
  them to their committed offsets, then empties the agents' queues. The consumer's flow is on
  all along (it was turned on to read the changelogs), so records fetched meanwhile reach an
  agent's queue and are thrown away with it, while the consumer's position has moved past them.
  A seek now stops the flow first; the recovery turns it on again once the queues are empty.
- **The commit.** ``Consumer._new_offset`` lets the first acknowledged offset be one past the
  committed one, so a record the agent never took, sitting at the committed offset, is committed
  past for good; and it counts offsets missing from the fetched sequence ("gaps") as
  acknowledged. For topics whose offsets have no holes (``streams.gapless.CONTIGUOUS``: no
  compaction, no transactions) a missing offset is a dropped record, so a commit now stops
  before the first offset not acknowledged. Compacted topics keep Faust's rule.

:mod:`streams.gapless` reads what was dropped anyway; these make sure nothing is committed past
it meanwhile, and that a record lost with its worker is read again by the next one.
"""

from __future__ import annotations

from typing import Any

from faust.transport.consumer import Consumer
from faust.utils.functional import consecutive_numbers

from streams.gapless import CONTIGUOUS

_seek = Consumer.perform_seek
_new_offset = Consumer._new_offset


async def _perform_seek(self: Any) -> None:
    self.stop_flow()  # nothing is handed over from where the partitions were before the seek
    await _seek(self)


def _committable(self: Any, tp: Any) -> int | None:
    if tp.topic not in CONTIGUOUS:
        return _new_offset(self, tp)
    self._gap.pop(tp, None)  # a hole here is a dropped record, not one to count as done
    acked = self._acked[tp]
    if not acked:
        return None
    acked.sort()
    committed = self._committed_offset[tp]
    if committed is not None and acked[0] > committed:
        return None  # the record at the committed offset was not acknowledged
    done = next(consecutive_numbers(acked))
    acked[: len(done)] = []
    self._acked_index[tp].difference_update(done)
    return int(done[-1]) + 1


def install() -> None:
    Consumer.perform_seek = _perform_seek  # type: ignore[method-assign]
    Consumer._new_offset = _committable  # type: ignore[method-assign]
