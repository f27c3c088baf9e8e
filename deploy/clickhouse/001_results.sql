-- TRAIL results store, schema version 1.
-- Applied on start-up by stream.store.ensure_schema (in file order, each file once, recorded in
-- trail_schema_migrations). Statements are separated by ';' at the end of a line and must be
-- idempotent (IF NOT EXISTS), because two workers may start at the same moment.
--
-- ReplacingMergeTree keyed by (item_id, tick, model_version): a replayed write of the same key
-- (Kafka redelivery, sink retry after a lost response, spill-file replay) replaces the earlier
-- row instead of adding one. Until a background merge has run, duplicates can still be seen
-- by a plain SELECT, so readers use FINAL (or argMax(..., written_at)). The version column
-- written_at makes the newest write win. Retention (TTL on written_at, not on tick, so that a
-- replay of a 2010 log is not deleted on arrival) is set by ensure_schema from
-- TRAIL_RESULTS_TTL_DAYS.

CREATE TABLE IF NOT EXISTS trail_predictions
(
    item_id          String,
    tick             DateTime64(3, 'UTC'),
    model_version    LowCardinality(String),
    score            Float64,
    predicted_count  Float64,
    rank             UInt32,
    signals          Map(LowCardinality(String), Float64),
    written_at       DateTime64(3, 'UTC'),
    INDEX tick_minmax tick TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree(written_at)
PARTITION BY toYYYYMM(tick)
ORDER BY (item_id, tick, model_version);

CREATE TABLE IF NOT EXISTS trail_explanations
(
    item_id          String,
    tick             DateTime64(3, 'UTC'),
    model_version    LowCardinality(String),
    rank             UInt32,
    explanation      String,
    faithful         Bool,
    claims_checked   UInt32,
    written_at       DateTime64(3, 'UTC'),
    INDEX tick_minmax tick TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree(written_at)
PARTITION BY toYYYYMM(tick)
ORDER BY (item_id, tick, model_version);

-- Every active item's trend signals at each tick, scored or not: the realised count of
-- (t, t+h] is signals['count_<h>'] at tick t+h, which the accuracy dashboard needs.
-- model_version here names the feature spec the signals came from.
CREATE TABLE IF NOT EXISTS trail_trend_snapshots
(
    item_id          String,
    tick             DateTime64(3, 'UTC'),
    model_version    LowCardinality(String),
    signals          Map(LowCardinality(String), Float64),
    written_at       DateTime64(3, 'UTC'),
    INDEX tick_minmax tick TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree(written_at)
PARTITION BY toYYYYMM(tick)
ORDER BY (item_id, tick, model_version);
