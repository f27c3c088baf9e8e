-- TRAIL results store, schema version 2: what happened to each explanation.
-- raw_explanation is the model's decoded text, explanation the published one; repaired says the
-- stream's verify-and-revise step changed it. forecast is the direction the text states
-- (rise / steady / fall, NULL when it states none) and forecast_agrees whether that matches the
-- direction of the model's own predicted count (stream.core.forecast.outlook).
-- Rows written before this migration read as not repaired, raw = published, no forecast.

ALTER TABLE trail_explanations ADD COLUMN IF NOT EXISTS raw_explanation String DEFAULT explanation AFTER explanation;
ALTER TABLE trail_explanations ADD COLUMN IF NOT EXISTS repaired Bool DEFAULT false AFTER raw_explanation;
ALTER TABLE trail_explanations ADD COLUMN IF NOT EXISTS forecast Nullable(String) AFTER claims_checked;
ALTER TABLE trail_explanations ADD COLUMN IF NOT EXISTS forecast_agrees Bool DEFAULT false AFTER forecast;
