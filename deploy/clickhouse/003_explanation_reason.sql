-- TRAIL results store, schema version 3: why a mover is forecast to move.
-- reason is the kind of true reason the published text gives for a forecast against the main
-- window's trend: 'trend' (a longer window's trend points the forecast's way), 'level' (the count
-- is above or below the longest window's pace) or NULL (no such forecast, or no reason given;
-- stream.core.faithfulness.grammar.stated_reason). Rows written before this migration read NULL.

ALTER TABLE trail_explanations ADD COLUMN IF NOT EXISTS reason Nullable(String) AFTER forecast_agrees;
