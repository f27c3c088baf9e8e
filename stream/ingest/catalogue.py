"""The item table (`trail.items`, compacted) read whole into memory: item_id -> title, category, description.

Prompts name the item by its title and category. Every scoring process reads the whole
topic from the beginning (no consumer group: each process needs every item), then keeps
following it; a record with no value (a tombstone) removes the item. An item the
catalogue does not know yet is named by its id in the prompt (render_prompt does that).
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import structlog

from stream.core.records import ItemInfo
from stream.kafka import KafkaSecurity

log = structlog.get_logger(__name__)


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and v.strip() else None


class ItemCatalogue:
    def __init__(self, bootstrap: str, topic: str, *, kafka: KafkaSecurity | None = None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.kafka = kafka
        self.items: dict[str, ItemInfo] = {}
        self.bad_records = 0
        self._consumer: Any = None
        self._task: asyncio.Task | None = None
        self._end: dict[Any, int] = {}
        self._caught_up = asyncio.Event()

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="earliest",
                                          **(self.kafka.client_kwargs() if self.kafka else {}))
        await self._consumer.start()
        parts = self._consumer.partitions_for_topic(self.topic)
        if not parts:
            await self._consumer.topics()  # refresh metadata
            parts = self._consumer.partitions_for_topic(self.topic) or set()
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._end = {tp: o for tp, o in (await self._consumer.end_offsets(tps)).items() if o > 0}
        if not self._end:
            self._caught_up.set()
        self._task = asyncio.create_task(self._run(), name="trail-catalogue")

    async def wait_caught_up(self, timeout: float) -> bool:
        """True once everything published before start() is in; False after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._caught_up.wait(), timeout)
            return True
        except TimeoutError:
            log.warning("catalogue.not_caught_up", topic=self.topic, items=len(self.items), waited_s=timeout)
            return False

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        if value is None:
            if key is not None:
                self.items.pop(key.decode("utf-8", "replace"), None)
            return
        try:
            rec = orjson.loads(value)
            item_id = str(rec["item_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.bad_records += 1
            return
        self.items[item_id] = ItemInfo(_text(rec.get("title")), _text(rec.get("category")),
                                       _text(rec.get("description")))

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=500, max_records=10_000)
            for msgs in batches.values():
                for m in msgs:
                    self.apply(m.key, m.value)
            if not self._caught_up.is_set():
                positions = {tp: await self._consumer.position(tp) for tp in self._end}
                if all(positions[tp] >= end for tp, end in self._end.items()):
                    log.info("catalogue.caught_up", topic=self.topic, items=len(self.items))
                    self._caught_up.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
