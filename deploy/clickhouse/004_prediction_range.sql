-- TRAIL results store, schema version 4: how much and how sure, and what moved the score.
-- predicted_low / predicted_high: the count's 80% range (10% and 90% quantiles of the next-period
-- count); NULL from a model without quantile heads and for rows written before this migration.
-- drivers: each input group's contribution to the score (trend, level, neighbourhood, season, text);
-- empty when the prediction was not attributed.

ALTER TABLE trail_predictions ADD COLUMN IF NOT EXISTS predicted_low Nullable(Float64) AFTER predicted_count;
ALTER TABLE trail_predictions ADD COLUMN IF NOT EXISTS predicted_high Nullable(Float64) AFTER predicted_low;
ALTER TABLE trail_predictions ADD COLUMN IF NOT EXISTS drivers Map(LowCardinality(String), Float64) AFTER signals;
