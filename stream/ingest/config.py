"""The trend worker's configuration (stream.settings fills it from the environment; each default is
written here once and the settings' table reads it from here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stream.core.events import ValidationConfig
from stream.core.trends import TrendConfig
from stream.kafka import KafkaSecurity
from stream.topics import TopicSpec, Topics

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"


@dataclass(frozen=True)
class WorkerConfig:
    bootstrap: str = DEFAULT_BOOTSTRAP
    topics: Topics = field(default_factory=Topics)
    snapshots_topic: str = "trail.snapshots"
    trend: TrendConfig = field(default_factory=TrendConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tick_s: float = 5.0
    checkpoint_s: float = 0.0
    state_dir: Path = Path("var/state")
    group_id: str = "trail-trends"
    app_id: str = "trail"
    max_poll_records: int = 5000
    session_timeout_s: float = 10.0
    publish_snapshots: bool = True
    tick_hooks: tuple[str, ...] = ()
    web_port: int | None = None
    kafka: KafkaSecurity = field(default_factory=KafkaSecurity)

    @property
    def faust_broker(self) -> list[str]:
        return [f"kafka://{h}" for h in self.bootstrap.split(",")]

    def snapshot_spec(self) -> TopicSpec:
        """The snapshot topic: co-partitioned with the events (a snapshot record goes to its item's partition)."""
        t = self.topics
        return TopicSpec(self.snapshots_topic, t.partitions, t.replication,
                         {"cleanup.policy": "delete", "retention.ms": str(t.output_retention_ms)})
