-- TRAIL results store, schema version 5: why, faithful to the model.
-- reason may now also be 'neighbourhood' (the item's semantic neighbours' trend) or 'season' (the same
-- weeks last year), from a model that gives drivers. reason_source says where a reason came from:
-- 'drivers' (the model's top driver), 'rule' (no drivers, or a top driver with no words the checker
-- verifies: why_window / level_reason) or NULL (no reason given). driver is the model's top driver for the
-- stated forecast (trend, level, neighbourhood, season, text); NULL without drivers. Rows written before
-- this migration read NULL.

ALTER TABLE trail_explanations ADD COLUMN IF NOT EXISTS reason_source Nullable(String) AFTER reason;
ALTER TABLE trail_explanations ADD COLUMN IF NOT EXISTS driver Nullable(String) AFTER reason_source;
