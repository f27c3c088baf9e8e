"""Results store on the embedded ClickHouse engine (chdb): records, DDL, inserts, replay dedup, TTL."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest

from stream.core.records import Explanation, Prediction, RecordError, TrendSnapshot, tick_iso, to_tick
from stream.settings import SettingsError, load_settings
from stream.store.clickhouse import (
    DEFAULT_DDL_DIR,
    MIGRATIONS_TABLE,
    RESULT_TABLES,
    TABLE_COLUMNS,
    StoreConfig,
    StoreError,
    connect,
    ensure_schema,
    insert_records,
    load_migrations,
    set_ttl,
    split_statements,
    table_ttl_days,
)

T0 = datetime(2011, 12, 1, tzinfo=timezone.utc)


def pred(item: str, tick: datetime = T0, score: float = 0.5, rank: int = 1, model: str = "m1") -> Prediction:
    return Prediction(item, tick, score, 3.0, rank, {"count_7d": 2.0, "velocity_7d": 1.0}, model)


@pytest.fixture
def store(tmp_path):
    config = StoreConfig(path=tmp_path / "clickhouse", ttl_days=30)
    client = connect(config)
    ensure_schema(client, config)
    yield config, client
    client.close()


# ---- records (pure) ---------------------------------------------------------------------

def test_prediction_round_trips_the_json_contract():
    p = Prediction("A1", "2011-12-01T10:00:00Z", 0.25, 4.0, 3, {"count_7d": 5, "ema": 1.5}, "v1")
    d = orjson.loads(p.to_json())
    assert d == {"item_id": "A1", "tick": "2011-12-01T10:00:00.000Z", "score": 0.25, "predicted_count": 4.0,
                 "rank": 3, "signals": {"count_7d": 5.0, "ema": 1.5}, "model_version": "v1",
                 "predicted_low": None, "predicted_high": None, "drivers": None}
    assert Prediction.from_json(p.to_json()) == p
    old = {k: v for k, v in d.items() if k not in ("predicted_low", "predicted_high", "drivers")}
    assert Prediction.from_dict(old) == p  # a record written before the range and drivers still reads
    assert Prediction.from_dict(d).tick == datetime(2011, 12, 1, 10, tzinfo=timezone.utc)


def test_explanation_and_snapshot_round_trip():
    e = Explanation("A1", 1322733600000, 1, "Rising: 5 sales in 7 days.", True, 2, "v1")
    assert Explanation.from_dict(orjson.loads(e.to_json())) == e
    s = TrendSnapshot("A1", T0, {"count_7d": 1.0})
    assert TrendSnapshot.from_dict({"item_id": "A1", "tick": tick_iso(T0), "signals": {"count_7d": 1}}) == s


def test_tick_forms_agree_and_are_truncated_to_milliseconds():
    iso = to_tick("2011-12-01T10:00:00.123456+00:00")
    assert iso == to_tick(1322733600123) == to_tick(datetime(2011, 12, 1, 11, 0, 0, 123999,
                                                             tzinfo=timezone(timedelta(hours=1))))
    assert tick_iso(iso) == "2011-12-01T10:00:00.123Z"


@pytest.mark.parametrize("kwargs, message", [
    ({"item_id": ""}, "item_id must not be empty"),
    ({"tick": "yesterday"}, "not an ISO-8601"),
    ({"tick": datetime(2011, 1, 1)}, "naive datetime"),
    ({"tick": "2011-12-01T10:00:00"}, "no UTC offset"),
    ({"score": math.nan}, "score must be finite"),
    ({"score": "high"}, "score must be a number"),
    ({"predicted_count": -1.0}, "predicted_count must be >= 0"),
    ({"rank": 0}, "rank must be >= 1"),
    ({"rank": 1.5}, "rank must be an integer"),
    ({"signals": [1, 2]}, "signals must be a mapping"),
    ({"signals": {"count_7d": math.inf}}, "must be finite"),
    ({"model_version": " "}, "model_version must not be empty"),
])
def test_bad_prediction_fields_are_rejected_with_a_clear_message(kwargs, message):
    fields = {"item_id": "A", "tick": T0, "score": 0.1, "predicted_count": 1.0, "rank": 1,
              "signals": {"count_7d": 1.0}, "model_version": "m"} | kwargs
    with pytest.raises(RecordError, match=message):
        Prediction(**fields)


def test_prediction_carries_its_range_and_drivers():
    p = Prediction("A1", T0, 0.25, 40.0, 1, {"count_7d": 26}, "v1", predicted_low=28, predicted_high=55.5,
                   drivers={"trend": 0.4, "season": -0.1})
    d = orjson.loads(p.to_json())
    assert (d["predicted_low"], d["predicted_high"], d["drivers"]) == (28.0, 55.5, {"trend": 0.4, "season": -0.1})
    assert Prediction.from_json(p.to_json()) == p
    with pytest.raises(RecordError, match="both or neither"):
        Prediction("A1", T0, 0.25, 40.0, 1, {}, "v1", predicted_low=28)
    with pytest.raises(RecordError, match="0 <= predicted_low <= predicted_high"):
        Prediction("A1", T0, 0.25, 40.0, 1, {}, "v1", predicted_low=60, predicted_high=55)
    with pytest.raises(RecordError, match=r"drivers\['trend'\] must be finite"):
        Prediction("A1", T0, 0.25, 40.0, 1, {}, "v1", drivers={"trend": float("nan")})


def test_from_dict_names_missing_fields():
    with pytest.raises(RecordError, match="missing rank, signals"):
        Prediction.from_dict({"item_id": "A", "tick": "2011-12-01T00:00:00Z", "score": 1, "predicted_count": 1,
                              "model_version": "m"})
    with pytest.raises(RecordError, match="faithful must be a bool"):
        Explanation("A", T0, 1, "x", "yes", 1, "m")


# ---- configuration ----------------------------------------------------------------------

def test_store_config_from_settings():
    c = load_settings({"CLICKHOUSE_URL": "https://ch.example:9443", "CLICKHOUSE_USER": "u",
                       "CLICKHOUSE_PASSWORD": "secret", "CLICKHOUSE_DATABASE": "results",
                       "TRAIL_RESULTS_TTL_DAYS": "0", "CLICKHOUSE_COMPRESS": "0"}).store
    assert (c.url, c.user, c.password, c.database, c.ttl_days, c.compress) == (
        "https://ch.example:9443", "u", "secret", "results", 0, False)
    assert not c.embedded and "secret" not in c.describe() and "secret" not in repr(c)
    e = load_settings({"TRAIL_CLICKHOUSE_PATH": "/tmp/x"}).store
    assert e.embedded and e.path == Path("/tmp/x") and e.compress is True and e.database == "trail"


@pytest.mark.parametrize("env, message", [
    ({"CLICKHOUSE_URL": "clickhouse:8123"}, "CLICKHOUSE_URL='clickhouse:8123': must look like http://host:8123"),
    ({"CLICKHOUSE_DATABASE": "a-b"}, r"CLICKHOUSE_DATABASE='a-b': must be an identifier"),
    ({"TRAIL_RESULTS_TTL_DAYS": "-1"}, "TRAIL_RESULTS_TTL_DAYS='-1': must be a whole number of days >= 0"),
    ({"TRAIL_RESULTS_TTL_DAYS": "ninety"}, "TRAIL_RESULTS_TTL_DAYS='ninety'"),
    ({"CLICKHOUSE_SECURE": "maybe"}, "CLICKHOUSE_SECURE='maybe': must be 1/0, true/false"),
    ({"CLICKHOUSE_COMPRESS": "snappy"}, "CLICKHOUSE_COMPRESS='snappy': must be 1/0, true/false or lz4"),
])
def test_store_config_rejects_bad_env(env, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(env)


# ---- DDL ---------------------------------------------------------------------------------

def test_split_statements_ignores_comments_and_semicolons_inside_lines():
    sql = "-- a; comment\nCREATE TABLE a (x String DEFAULT ';') ENGINE = Memory;\n\nSELECT 1;\n-- end\n"
    assert split_statements(sql) == ["CREATE TABLE a (x String DEFAULT ';') ENGINE = Memory", "SELECT 1"]


def test_migration_files_are_versioned_and_named():
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})
    assert migrations[0].version == 1 and len(migrations[0].statements) == 3


def test_bad_ddl_folder_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        load_migrations(tmp_path / "nope")
    (tmp_path / "schema.sql").write_text("SELECT 1;")
    with pytest.raises(StoreError, match="NNN_name.sql"):
        load_migrations(tmp_path)


def test_schema_is_created_once_and_matches_the_insert_layout(store):
    config, client = store
    assert ensure_schema(client, config) == []  # second start-up: nothing to apply
    rows = client.query(f"SELECT version, name FROM {MIGRATIONS_TABLE} FINAL ORDER BY version").result_rows
    assert rows == [(1, "001_results"), (2, "002_explanation_provenance"), (3, "003_explanation_reason"),
                    (4, "004_prediction_range"), (5, "005_explanation_driver")]
    for table in RESULT_TABLES:
        described = [(r[0], r[1]) for r in client.query(f"DESCRIBE TABLE {table}").result_rows]
        assert described == list(TABLE_COLUMNS[table]), table
        engine = client.command(f"SELECT engine_full FROM system.tables WHERE database = 'trail' AND name = '{table}'")
        assert "ReplacingMergeTree(written_at)" in engine and "ORDER BY (item_id, tick, model_version)" in engine


def test_a_new_migration_file_is_applied_on_the_next_start(store, tmp_path):
    config, client = store
    ddl = tmp_path / "ddl"
    ddl.mkdir()
    for m in sorted(config.ddl_dir.glob("*.sql")):
        (ddl / m.name).write_text(m.read_text())
    (ddl / "900_extra.sql").write_text(
        "ALTER TABLE trail_predictions ADD COLUMN IF NOT EXISTS region LowCardinality(String) DEFAULT '';\n")
    config2 = StoreConfig(path=config.path, ttl_days=config.ttl_days, ddl_dir=ddl)
    assert ensure_schema(client, config2) == [900]
    assert "region" in [r[0] for r in client.query("DESCRIBE TABLE trail_predictions").result_rows]
    assert ensure_schema(client, config2) == []


def test_explanation_provenance_migrates_a_version_1_store(tmp_path):
    """A store written before 002: old rows read as raw = published, not repaired, no forecast."""
    v1 = tmp_path / "ddl-v1"
    v1.mkdir()
    (v1 / "001_results.sql").write_text((DEFAULT_DDL_DIR / "001_results.sql").read_text())
    config = StoreConfig(path=tmp_path / "ch", ddl_dir=v1)
    client = connect(config)
    assert ensure_schema(client, config) == [1]
    client.command("INSERT INTO trail_explanations (item_id, tick, model_version, rank, explanation, faithful, "
                   "claims_checked, written_at) VALUES ('a', '2011-01-01 00:00:00', 'v', 1, 'old text', true, 2, now64(3))")
    assert ensure_schema(client, StoreConfig(path=config.path)) == [2, 3, 4, 5]
    row = client.query("SELECT explanation, raw_explanation, repaired, forecast, forecast_agrees, reason, "
                       "reason_source, driver FROM trail_explanations FINAL").result_rows
    assert row == [("old text", "old text", False, None, False, None, None, None)]
    client.close()


def test_prediction_range_migrates_a_version_3_store(tmp_path):
    """A store written before 004: old predictions read with no range and no drivers."""
    v3 = tmp_path / "ddl-v3"
    v3.mkdir()
    for f in sorted(DEFAULT_DDL_DIR.glob("00[123]_*.sql")):
        (v3 / f.name).write_text(f.read_text())
    config = StoreConfig(path=tmp_path / "ch", ddl_dir=v3)
    client = connect(config)
    assert ensure_schema(client, config) == [1, 2, 3]
    client.command("INSERT INTO trail_predictions (item_id, tick, model_version, score, predicted_count, rank, signals, "
                   "written_at) VALUES ('a', '2011-01-01 00:00:00', 'v', 1.0, 3.0, 1, map('count_7d', 2.0), now64(3))")
    assert ensure_schema(client, StoreConfig(path=config.path)) == [4, 5]
    row = client.query("SELECT predicted_count, predicted_low, predicted_high, drivers FROM trail_predictions FINAL").result_rows
    assert row == [(3.0, None, None, {})]
    client.close()


# ---- inserts, replays, TTL ----------------------------------------------------------------

def test_insert_and_read_back_every_field(store):
    _, client = store
    now = datetime.now(timezone.utc).replace(microsecond=0)
    p = pred("A")
    ranged = Prediction("R", T0, 0.4, 40.0, 2, {"count_7d": 26.0}, "m1", predicted_low=28.0, predicted_high=55.0,
                        drivers={"trend": 0.3, "neighbourhood": 0.1})
    e = Explanation("A", T0, 1, "Sales doubled: 8 in the last 7 days vs 4 before.", False, 3, "m1")
    why = Explanation("B", T0, 2, "Likely to fall: 8 in the last 7 days, up from 4, but already above its 28-day pace.",
                      True, 4, "m1", forecast="fall", reason="level", reason_source="drivers", driver="level")
    s = TrendSnapshot("A", T0, {"count_7d": 8.0}, "signals-v1")
    for r in (p, ranged, e, why, s):
        insert_records(client, r.table, [r], [now])
    got = client.query("SELECT item_id, tick, model_version, score, predicted_count, rank, signals, predicted_low, "
                       "predicted_high, drivers FROM trail_predictions FINAL ORDER BY item_id").result_rows
    assert got == [("A", T0.replace(tzinfo=None), "m1", 0.5, 3.0, 1, {"count_7d": 2.0, "velocity_7d": 1.0}, None, None, {}),
                   ("R", T0.replace(tzinfo=None), "m1", 0.4, 40.0, 2, {"count_7d": 26.0}, 28.0, 55.0,
                    {"trend": 0.3, "neighbourhood": 0.1})]
    got = client.query("SELECT explanation, faithful, claims_checked, reason, reason_source, driver "
                       "FROM trail_explanations FINAL ORDER BY item_id").result_rows
    assert got == [(e.explanation, False, 3, None, None, None), (why.explanation, True, 4, "level", "drivers", "level")]
    assert client.query("SELECT signals['count_7d'] FROM trail_trend_snapshots FINAL").result_rows == [(8.0,)]


def test_replayed_writes_count_once_and_the_newest_wins(store):
    _, client = store
    first = datetime.now(timezone.utc) - timedelta(hours=1)  # within the 30-day TTL
    batch = [pred(f"i{n}", T0 + timedelta(hours=n % 3), score=0.1, rank=n + 1) for n in range(30)]
    insert_records(client, Prediction.table, batch, [first] * len(batch))
    # the same keys again (a Kafka redelivery / sink retry), rescored, in two separate inserts
    replay = [pred(r.item_id, r.tick, score=0.9, rank=r.rank) for r in batch]
    insert_records(client, Prediction.table, replay[:10], [first + timedelta(seconds=1)] * 10)
    insert_records(client, Prediction.table, replay[10:], [first + timedelta(seconds=1)] * 20)
    # a different model version is a different key
    insert_records(client, Prediction.table, [pred("i0", T0, model="m2")], [first])
    assert client.query("SELECT count() FROM trail_predictions").result_rows[0][0] > 31  # not merged yet
    rows = client.query("SELECT model_version, count(), min(score), max(score) FROM trail_predictions FINAL "
                        "GROUP BY model_version ORDER BY model_version").result_rows
    assert rows == [("m1", 30, 0.9, 0.9), ("m2", 1, 0.5, 0.5)]
    client.command("OPTIMIZE TABLE trail_predictions FINAL")
    assert client.query("SELECT count() FROM trail_predictions").result_rows[0][0] == 31


def test_ttl_drops_rows_written_longer_ago_than_the_retention(store):
    config, client = store
    assert all(table_ttl_days(client, t) == 30 for t in RESULT_TABLES)
    now = datetime.now(timezone.utc)
    old, fresh = pred("old"), pred("fresh")
    insert_records(client, Prediction.table, [old], [now - timedelta(days=31)])
    insert_records(client, Prediction.table, [fresh], [now - timedelta(days=29)])
    client.command("OPTIMIZE TABLE trail_predictions FINAL")
    assert client.query("SELECT item_id FROM trail_predictions").result_rows == [("fresh",)]
    # retention is configuration: a new value is applied on the next start, 0 removes it
    set_ttl(client, 7)
    assert table_ttl_days(client, Prediction.table) == 7
    set_ttl(client, 0)
    assert table_ttl_days(client, Prediction.table) is None


def test_a_second_process_on_the_embedded_store_gets_a_clear_error(store):
    config, _ = store
    code = textwrap.dedent(f"""
        from stream.store.clickhouse import StoreConfig, StoreError, connect
        try:
            connect(StoreConfig(path={str(config.path)!r}))
        except StoreError as ex:
            print("STORE_ERROR", ex)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert "STORE_ERROR" in out.stdout, out.stderr[-2000:]
    assert "one process" in out.stdout and "CLICKHOUSE_URL" in out.stdout
