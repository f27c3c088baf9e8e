"""TRAIL's Kafka topics: names, partition counts and settings, and an idempotent `ensure_topics`.

The values come from the environment through `stream.settings` (TRAIL_*_TOPIC, TRAIL_PARTITIONS,
TRAIL_*_RETENTION_MS, ...). The events' retention must exceed the trend span (3 x the longest
window + lateness = 84 d): a worker that lost its state rebuilds it by re-reading the topic.

The partition count of trail.events fixes which worker owns which item (the key is the
item id); `ensure_topics` therefore never changes the partition count of an existing
topic, it reports the mismatch instead.

Kafka applies retention to record timestamps: a replay of a 2010 log must let the
producer stamp records with the current time (the event time lives in the value), or
the broker deletes the records as soon as their segment rolls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import structlog

from stream.kafka import KafkaSecurity

log = structlog.get_logger(__name__)

DAY_MS = 86_400_000
TOPIC_ALREADY_EXISTS = 36  # Kafka error code


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    replication: int
    config: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Topics:
    events: str = "trail.events"
    items: str = "trail.items"
    dlq: str = "trail.events.dlq"
    predictions: str = "trail.predictions"
    explanations: str = "trail.explanations"
    partitions: int = 4
    items_partitions: int = 1
    replication: int = 1
    events_retention_ms: int = 90 * DAY_MS
    dlq_retention_ms: int = 30 * DAY_MS
    output_retention_ms: int = 7 * DAY_MS

    def specs(self) -> list[TopicSpec]:
        delete = "delete"
        return [
            TopicSpec(self.events, self.partitions, self.replication,
                      {"cleanup.policy": delete, "retention.ms": str(self.events_retention_ms)}),
            TopicSpec(self.items, self.items_partitions, self.replication,
                      {"cleanup.policy": "compact", "retention.ms": "-1"}),
            TopicSpec(self.dlq, self.partitions, self.replication,
                      {"cleanup.policy": delete, "retention.ms": str(self.dlq_retention_ms)}),
            TopicSpec(self.predictions, self.partitions, self.replication,
                      {"cleanup.policy": delete, "retention.ms": str(self.output_retention_ms)}),
            TopicSpec(self.explanations, self.partitions, self.replication,
                      {"cleanup.policy": delete, "retention.ms": str(self.output_retention_ms)}),
        ]


@dataclass(frozen=True, slots=True)
class EnsureResult:
    created: list[str]
    existing: list[str]
    # name -> (partitions found, partitions wanted); left as they are, see the module doc
    partition_mismatch: dict[str, tuple[int, int]]


async def ensure_topics(bootstrap: str, topics: Topics | None = None,
                        specs: list[TopicSpec] | None = None,
                        request_timeout_ms: int = 10_000, kafka: KafkaSecurity | None = None) -> EnsureResult:
    """Create whichever of the topics are missing; safe to call again and from several processes."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    specs = (topics or Topics()).specs() if specs is None else specs
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=request_timeout_ms,
                                **(kafka.client_kwargs() if kafka else {}))
    await admin.start()
    try:
        present = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in present]
        created: list[str] = []
        raced: list[str] = []
        if missing:
            resp = await admin.create_topics(
                [NewTopic(s.name, s.partitions, s.replication, topic_configs=dict(s.config)) for s in missing])
            errors = []
            for err in resp.topic_errors:
                name, code = err[0], err[1]
                message = err[2] if len(err) > 2 else None
                if code == 0:
                    created.append(name)
                elif code == TOPIC_ALREADY_EXISTS:
                    raced.append(name)
                else:
                    errors.append(f"{name}: error {code} {message or ''}".strip())
            if errors:
                raise RuntimeError(f"creating topics on {bootstrap} failed: {'; '.join(errors)}")
        existing = [s.name for s in specs if s.name not in created]
        mismatch: dict[str, tuple[int, int]] = {}
        if existing:
            wanted = {s.name: s.partitions for s in specs}
            for t in await admin.describe_topics(existing):
                have = len(t["partitions"])
                if have != wanted[t["topic"]]:
                    mismatch[t["topic"]] = (have, wanted[t["topic"]])
        if created:
            log.info("topics.created", bootstrap=bootstrap, topics=created)
        for name, (have, want) in mismatch.items():
            log.warning("topics.partition_mismatch", topic=name, partitions=have, wanted=want)
        return EnsureResult(created, existing, mismatch)
    finally:
        await admin.close()
