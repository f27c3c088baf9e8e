"""The trend worker's configuration, read once from the environment.

Environment (defaults in brackets); topic names and partition counts come from
`stream.topics.Topics.from_env`, windows and lateness from `TrendConfig.from_env`,
validation limits from `ValidationConfig.from_env`:

    KAFKA_BOOTSTRAP          host:port[,host:port...]; else TRAIL_BROKER_URL
    TRAIL_BROKER_URL         kafka://host:port[;kafka://host:port]   [kafka://127.0.0.1:9092]
    TRAIL_SNAPSHOTS_TOPIC    trend snapshots, one record per active item per tick [trail.snapshots]
    TRAIL_TICK_S             wall seconds between ticks (snapshot, checkpoint, commit) [5]
    TRAIL_CHECKPOINT_S       min wall seconds between checkpoints (then commits); 0: every tick [0]
    TRAIL_STATE_DIR          per-partition checkpoints [./var/state]
    TRAIL_GROUP_ID           consumer group of the trend consumer [trail-trends]
    TRAIL_APP_ID             Faust app id (Faust's own group; unrelated to the above) [trail]
    TRAIL_MAX_POLL_RECORDS   records per getmany [5000]
    TRAIL_SESSION_TIMEOUT_S  group session timeout; a dead worker's partitions move after it [10]
    TRAIL_PUBLISH_SNAPSHOTS  0 turns the snapshot topic off (hooks still run) [1]
    TRAIL_TICK_HOOKS         module:attr[,module:attr] async callables run every tick
                             [SERVING_HOOKS when TRAIL_MODEL_DIR is set, else none]
    TRAIL_WEB_PORT           Faust web port; unset: no web server (as --without-web) []
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from stream.core.events import ValidationConfig
from stream.topics import TopicSpec, Topics
from stream.core.trends import TrendConfig

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
# scorer + ranker + explainer, and the trend snapshots the accuracy dashboard reads
SERVING_HOOKS = "stream.serving.service:on_tick,stream.store.hooks:store_snapshots"


def bootstrap_from_env(env: Mapping[str, str]) -> str:
    """aiokafka bootstrap string ("h:p,h:p") from KAFKA_BOOTSTRAP or a Faust-style TRAIL_BROKER_URL."""
    if v := env.get("KAFKA_BOOTSTRAP", "").strip():
        hosts = [h.strip() for h in v.split(",") if h.strip()]
    elif v := env.get("TRAIL_BROKER_URL", "").strip():
        hosts = []
        for part in v.replace(",", ";").split(";"):
            part = part.strip()
            if not part:
                continue
            scheme, sep, rest = part.partition("://")
            if sep and scheme != "kafka":
                raise ValueError(f"TRAIL_BROKER_URL={v!r}: only kafka:// URLs are supported, not {scheme}://")
            hosts.append(rest if sep else part)
    else:
        return DEFAULT_BOOTSTRAP
    for h in hosts:
        host, _, port = h.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"broker address {h!r} is not host:port")
    if not hosts:
        raise ValueError("KAFKA_BOOTSTRAP / TRAIL_BROKER_URL names no broker")
    return ",".join(hosts)


def _num(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    v = env.get(name, "").strip()
    if not v:
        return default
    try:
        x = float(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not a number") from None
    if x < minimum:
        raise ValueError(f"{name}={v} must be >= {minimum}")
    return x


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

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorkerConfig:
        env = os.environ if env is None else env
        d = cls()
        spec = env.get("TRAIL_TICK_HOOKS")
        if spec is None and env.get("TRAIL_MODEL_DIR", "").strip():
            spec = SERVING_HOOKS  # a model to serve and no explicit hooks: run the whole service
        hooks = tuple(h.strip() for h in (spec or "").split(",") if h.strip())
        for h in hooks:
            if ":" not in h:
                raise ValueError(f"TRAIL_TICK_HOOKS entry {h!r} is not module:attribute")
        web = env.get("TRAIL_WEB_PORT", "").strip()
        if web and not web.isdigit():
            raise ValueError(f"TRAIL_WEB_PORT={web!r} is not a port number")
        publish = env.get("TRAIL_PUBLISH_SNAPSHOTS", "1").strip().lower()
        if publish not in ("0", "1", "true", "false", "yes", "no", ""):
            raise ValueError(f"TRAIL_PUBLISH_SNAPSHOTS={publish!r}: use 1 or 0")
        return cls(
            bootstrap=bootstrap_from_env(env),
            topics=Topics.from_env(env),
            snapshots_topic=env.get("TRAIL_SNAPSHOTS_TOPIC", "").strip() or d.snapshots_topic,
            trend=TrendConfig.from_env(dict(env)),
            validation=ValidationConfig.from_env(env),
            tick_s=_num(env, "TRAIL_TICK_S", d.tick_s, 0.05),
            checkpoint_s=_num(env, "TRAIL_CHECKPOINT_S", d.checkpoint_s, 0),
            state_dir=Path(env.get("TRAIL_STATE_DIR", "").strip() or d.state_dir),
            group_id=env.get("TRAIL_GROUP_ID", "").strip() or d.group_id,
            app_id=env.get("TRAIL_APP_ID", "").strip() or d.app_id,
            max_poll_records=int(_num(env, "TRAIL_MAX_POLL_RECORDS", d.max_poll_records, 1)),
            session_timeout_s=_num(env, "TRAIL_SESSION_TIMEOUT_S", d.session_timeout_s, 1),
            publish_snapshots=publish not in ("0", "false", "no"),
            tick_hooks=hooks,
            web_port=int(web) if web else None,
        )

    @property
    def faust_broker(self) -> list[str]:
        return [f"kafka://{h}" for h in self.bootstrap.split(",")]

    def snapshot_spec(self) -> TopicSpec:
        """The snapshot topic: co-partitioned with the events (a snapshot record goes to its item's partition)."""
        t = self.topics
        return TopicSpec(self.snapshots_topic, t.partitions, t.replication,
                         {"cleanup.policy": "delete", "retention.ms": str(t.output_retention_ms)})
