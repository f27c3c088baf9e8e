"""stream.core.mailbox: latest wins, put never blocks, idle means nothing waiting and nothing in hand."""

from __future__ import annotations

import asyncio

from stream.core.mailbox import Mailbox


def test_latest_wins_and_idle_follows_the_consumer():
    async def main() -> list:
        box: Mailbox[int] = Mailbox()
        assert box.idle and box.put(1) is None and not box.idle
        assert box.put(2) == 1 and box.waiting == 2  # the older item comes back to be counted
        got = await box.get()
        assert got == 2 and box.waiting is None and not box.idle  # in hand until task_done
        assert box.put(3) is None
        box.task_done()
        assert not box.idle  # 3 is waiting
        assert box.discard() == 3 and box.idle and box.discard() is None
        await box.wait_idle(1)

        seen = []

        async def consumer() -> None:
            while True:
                item = await box.get()
                try:
                    await asyncio.sleep(0.01)
                    seen.append(item)
                finally:
                    box.task_done()

        task = asyncio.create_task(consumer())
        for i in range(10):
            box.put(i)  # faster than the consumer: only the newest survive
        await box.wait_idle(5)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return seen

    assert asyncio.run(main()) == [9]
