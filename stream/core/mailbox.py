"""A latest-wins mailbox of one: a producer that must never block hands work to one consumer task.

`put()` never blocks: an item still waiting is replaced by the newer one (and returned, so
the caller can count and log what it dropped). The consumer takes items with `get()` and
says `task_done()` when it has finished one; meanwhile it can look at `waiting` to stop
early when newer work has arrived. `idle` (and `wait_idle()`) means nothing is waiting
and the consumer is not working on an item.

Used by the trend worker (ticks for the tick hooks) and the explainer (a tick's movers).
asyncio only: one event loop, no threads.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    def __init__(self) -> None:
        self._item: T | None = None
        self._busy = False
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def waiting(self) -> T | None:
        """The item put and not taken yet, if any."""
        return self._item

    @property
    def idle(self) -> bool:
        return self._item is None and not self._busy

    def put(self, item: T) -> T | None:
        """Leave `item` for the consumer; returns the older item it replaced (not taken yet), if any."""
        replaced, self._item = self._item, item
        self._idle.clear()
        self._ready.set()
        return replaced

    def discard(self) -> T | None:
        """Drop the waiting item, if any, and return it."""
        dropped, self._item = self._item, None
        self._settle()
        return dropped

    async def get(self) -> T:
        """Wait for an item and take it; the consumer counts as busy until `task_done()`."""
        while self._item is None:
            self._ready.clear()
            await self._ready.wait()
        item, self._item = self._item, None
        self._busy = True
        return item

    def task_done(self) -> None:
        self._busy = False
        self._settle()

    async def wait_idle(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._idle.wait(), timeout)

    def _settle(self) -> None:
        if self.idle:
            self._idle.set()
