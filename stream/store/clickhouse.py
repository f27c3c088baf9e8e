"""ClickHouse results store: connection settings, connect, schema (DDL) and row layout.

One code path for both deployments, through clickhouse-connect:

* embedded (default): the real ClickHouse engine in-process via chdb,
  `clickhouse_connect.get_client(dsn="chdb:///<dir>")`, data under TRAIL_CLICKHOUSE_PATH.
  chdb serves one data directory per process and its client is synchronous, so callers use
  a client from one thread at a time (the sink has its own thread).
* server: CLICKHOUSE_URL=http://host:8123 (https://... or CLICKHOUSE_SECURE=1 for TLS), with
  CLICKHOUSE_USER, CLICKHOUSE_PASSWORD, CLICKHOUSE_DATABASE.

The DDL lives in deploy/clickhouse/NNN_name.sql (TRAIL_DDL_DIR overrides the folder);
`ensure_schema` applies the files not yet recorded in trail_schema_migrations, then sets
the retention TTL (TRAIL_RESULTS_TTL_DAYS, 0 = keep forever). `stream.settings` reads these
variables into a StoreConfig.

clickhouse_connect is imported inside functions only: importing this module costs nothing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import structlog

from stream.core.records import Explanation, Prediction, TrendSnapshot

if TYPE_CHECKING:
    from clickhouse_connect.driver.client import Client

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DDL_DIR = REPO_ROOT / "deploy" / "clickhouse"
DEFAULT_EMBEDDED_PATH = Path("var/clickhouse")
MIGRATIONS_TABLE = "trail_schema_migrations"
RESULT_TABLES = (Prediction.table, Explanation.table, TrendSnapshot.table)
_DDL_NAME = re.compile(r"^(\d{3,})_[A-Za-z0-9_]+\.sql$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TTL_DAYS = re.compile(r"TTL toDateTime\(written_at\) \+ toIntervalDay\((\d+)\)")

_TS = "DateTime64(3, 'UTC')"
_SIGNALS = "Map(LowCardinality(String), Float64)"
# Insert layout per table: (column, ClickHouse type). tests/test_store.py checks it against
# the tables the DDL creates, so the two cannot drift apart.
TABLE_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    Prediction.table: (
        ("item_id", "String"), ("tick", _TS), ("model_version", "LowCardinality(String)"),
        ("score", "Float64"), ("predicted_count", "Float64"), ("predicted_low", "Nullable(Float64)"),
        ("predicted_high", "Nullable(Float64)"), ("rank", "UInt32"), ("signals", _SIGNALS), ("drivers", _SIGNALS),
        ("written_at", _TS),
    ),
    Explanation.table: (
        ("item_id", "String"), ("tick", _TS), ("model_version", "LowCardinality(String)"),
        ("rank", "UInt32"), ("explanation", "String"), ("raw_explanation", "String"), ("repaired", "Bool"),
        ("faithful", "Bool"), ("claims_checked", "UInt32"), ("forecast", "Nullable(String)"),
        ("forecast_agrees", "Bool"), ("reason", "Nullable(String)"), ("reason_source", "Nullable(String)"),
        ("driver", "Nullable(String)"), ("written_at", _TS),
    ),
    TrendSnapshot.table: (
        ("item_id", "String"), ("tick", _TS), ("model_version", "LowCardinality(String)"),
        ("signals", _SIGNALS), ("written_at", _TS),
    ),
}


class StoreError(RuntimeError):
    """The store is misconfigured or its schema files are unusable."""


@dataclass(frozen=True)
class StoreConfig:
    """Where the results live. `url=None` means the embedded engine at `path`."""

    url: str | None = None
    path: Path = DEFAULT_EMBEDDED_PATH
    database: str = "trail"
    user: str = "default"
    password: str = field(default="", repr=False)
    secure: bool = False
    compress: bool | str = True  # HTTP only: lz4 request and response bodies
    ttl_days: int = 180
    connect_timeout_s: int = 10
    send_receive_timeout_s: int = 60
    ddl_dir: Path = DEFAULT_DDL_DIR

    def __post_init__(self) -> None:
        if not _IDENTIFIER.match(self.database):
            raise StoreError(f"database name {self.database!r} must be a plain identifier ([A-Za-z_][A-Za-z0-9_]*)")
        if self.ttl_days < 0:
            raise StoreError(f"ttl_days must be >= 0 (0 keeps results forever), got {self.ttl_days}")
        if self.url is not None:
            parsed = urlparse(self.url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise StoreError(f"CLICKHOUSE_URL {self.url!r} must look like http://host:8123 or https://host:8443")

    @property
    def embedded(self) -> bool:
        return self.url is None

    def describe(self) -> str:
        """Where the store is, for logs and error messages (never the password)."""
        if self.embedded:
            return f"embedded chdb at {Path(self.path).resolve()} (database {self.database})"
        parsed = urlparse(self.url)
        return f"{parsed.scheme}://{parsed.hostname}:{self._port(parsed)} (database {self.database}, user {self.user})"

    def _port(self, parsed) -> int:
        if parsed.port:
            return parsed.port
        return 8443 if self._tls(parsed) else 8123

    def _tls(self, parsed) -> bool:
        return parsed.scheme == "https" or self.secure


def connect(config: StoreConfig, *, create_database: bool = True) -> Client:
    """A clickhouse-connect client on `config.database` (created when missing)."""
    import clickhouse_connect

    if config.embedded:
        from clickhouse_connect.driver.exceptions import ProgrammingError

        data_dir = Path(config.path).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            client = clickhouse_connect.get_client(dsn=f"chdb://{data_dir}")
        except ProgrammingError as ex:
            raise StoreError(
                f"cannot open the embedded store at {data_dir}: {ex}. chdb lets one process use a data "
                "directory at a time (and one directory per process): stop the process holding it (a running "
                "stream worker), or run ClickHouse as a server and set CLICKHOUSE_URL"
            ) from ex
    else:
        parsed = urlparse(config.url)
        tls = config._tls(parsed)
        client = clickhouse_connect.get_client(
            host=parsed.hostname,
            port=config._port(parsed),
            interface="https" if tls else "http",
            username=unquote(parsed.username) if parsed.username else config.user,
            password=unquote(parsed.password) if parsed.password else config.password,
            compress=config.compress,
            connect_timeout=config.connect_timeout_s,
            send_receive_timeout=config.send_receive_timeout_s,
            # No server session: settings travel with each request, and one client per
            # thread never trips "concurrent queries within the same session".
            autogenerate_session_id=False,
            # The sink retries with its own backoff; the driver's retries would hide outages.
            query_retries=0,
        )
    try:
        if create_database:
            client.command(f"CREATE DATABASE IF NOT EXISTS {config.database}")
        client.database = config.database
    except Exception:
        client.close()
        raise
    return client


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    checksum: str


def split_statements(sql: str) -> list[str]:
    """Statements of a DDL file: '--' comment lines dropped, split at ';' ending a line."""
    body = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
    parts = re.split(r";[ \t]*(?:\n|$)", body)
    return [p.strip() for p in parts if p.strip()]


def load_migrations(ddl_dir: Path = DEFAULT_DDL_DIR) -> list[Migration]:
    ddl_dir = Path(ddl_dir)
    if not ddl_dir.is_dir():
        raise StoreError(f"DDL folder {ddl_dir} does not exist (set TRAIL_DDL_DIR to deploy/clickhouse)")
    migrations: list[Migration] = []
    for path in sorted(ddl_dir.glob("*.sql")):
        m = _DDL_NAME.match(path.name)
        if not m:
            raise StoreError(f"{path}: DDL files are named NNN_name.sql (e.g. 001_results.sql)")
        text = path.read_text(encoding="utf-8")
        statements = tuple(split_statements(text))
        if not statements:
            raise StoreError(f"{path} holds no SQL statement")
        migrations.append(Migration(int(m.group(1)), path.stem, statements,
                                    hashlib.sha256(text.encode()).hexdigest()[:16]))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise StoreError(f"two DDL files in {ddl_dir} share a version number: {sorted(versions)}")
    if not migrations:
        raise StoreError(f"no DDL files (NNN_name.sql) in {ddl_dir}")
    return migrations


def ensure_schema(client: Client, config: StoreConfig) -> list[int]:
    """Apply the DDL files not applied yet and set the TTL; returns the versions applied now."""
    client.command(
        f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version UInt32, name String, checksum String, "
        "applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) ENGINE = ReplacingMergeTree(applied_at) ORDER BY version"
    )
    done = {int(r[0]): r[1] for r in client.query(f"SELECT version, argMax(checksum, applied_at) FROM {MIGRATIONS_TABLE} GROUP BY version").result_rows}
    applied: list[int] = []
    for mig in load_migrations(config.ddl_dir):
        if mig.version in done:
            if done[mig.version] != mig.checksum:
                log.warning("store.ddl_changed_after_apply", version=mig.version, name=mig.name,
                            hint="add a new NNN_*.sql file for schema changes; applied files are not re-run")
            continue
        for statement in mig.statements:
            client.command(statement)
        client.insert(MIGRATIONS_TABLE, [[mig.version, mig.name, mig.checksum]], column_names=["version", "name", "checksum"],
                      column_type_names=["UInt32", "String", "String"])
        applied.append(mig.version)
        log.info("store.ddl_applied", version=mig.version, name=mig.name, store=config.describe())
    set_ttl(client, config.ttl_days)
    return applied


def table_ttl_days(client: Client, table: str) -> int | None:
    """The table's current retention in days, None when it has no TTL."""
    engine = client.command(
        "SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = {t:String}",
        parameters={"t": table},
    )
    if not engine:
        raise StoreError(f"table {table} does not exist")
    m = _TTL_DAYS.search(str(engine))
    return int(m.group(1)) if m else None


def set_ttl(client: Client, ttl_days: int, tables: Sequence[str] = RESULT_TABLES) -> None:
    """Retention by write time: rows older than ttl_days after written_at are dropped at merges."""
    for table in tables:
        current = table_ttl_days(client, table)
        if ttl_days == 0 and current is not None:
            client.command(f"ALTER TABLE {table} REMOVE TTL")
            log.info("store.ttl_removed", table=table)
        elif ttl_days > 0 and current != ttl_days:
            client.command(f"ALTER TABLE {table} MODIFY TTL toDateTime(written_at) + INTERVAL {int(ttl_days)} DAY")
            log.info("store.ttl_set", table=table, days=ttl_days, previous=current)


def to_columns(table: str, records: Sequence[Any], written_at: Sequence[datetime]) -> list[list[Any]]:
    """Column-oriented data for `TABLE_COLUMNS[table]` (one list per column, rows in order)."""
    names = [name for name, _ in TABLE_COLUMNS[table]]
    maps = {name for name, kind in TABLE_COLUMNS[table] if kind.startswith("Map(")}  # a Map is never NULL: {} stands for None
    columns: list[list[Any]] = [[] for _ in names]
    for record, stamp in zip(records, written_at, strict=True):
        for i, name in enumerate(names):
            value = stamp if name == "written_at" else getattr(record, name)
            columns[i].append({} if value is None and name in maps else value)
    return columns


def insert_records(client: Client, table: str, records: Sequence[Any], written_at: Sequence[datetime]) -> None:
    """One columnar INSERT (Native format) of `records` into `table`."""
    if not records:
        return
    layout = TABLE_COLUMNS[table]
    client.insert(
        table,
        to_columns(table, records, written_at),
        column_names=[n for n, _ in layout],
        column_type_names=[t for _, t in layout],
        column_oriented=True,
    )
