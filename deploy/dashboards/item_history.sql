-- Score history of the chosen items against their actual counts.
-- count_now: the item's count over the horizon window ending at the tick (what had happened);
-- predicted_count: the forecast for (tick, tick + horizon]; realised_count: what then happened
-- in that period (the count at tick + horizon, from trend snapshots or later predictions;
-- 0 when a snapshot exists at that tick without the item; NULL while the period is open).
-- Parameters: items, model_version ('' = latest model), count_signal (e.g. count_7d),
-- horizon_hours (e.g. 168), time_from, time_to.
WITH
    chosen AS
    (
        SELECT if({model_version:String} = '', argMax(model_version, tick), {model_version:String}) AS model_version
        FROM trail_predictions
    ),
    observed AS
    (
        SELECT item_id, tick, max(n) AS n
        FROM
        (
            SELECT item_id, tick, signals[{count_signal:String}] AS n
            FROM trail_trend_snapshots FINAL
            WHERE has({items:Array(String)}, item_id) AND mapContains(signals, {count_signal:String})
            UNION ALL
            SELECT item_id, tick, signals[{count_signal:String}] AS n
            FROM trail_predictions FINAL
            WHERE has({items:Array(String)}, item_id) AND mapContains(signals, {count_signal:String})
        )
        GROUP BY item_id, tick
    )
SELECT
    p.tick AS tick,
    p.item_id AS item_id,
    p.score AS score,
    p.rank AS rank,
    p.predicted_count AS predicted_count,
    if(mapContains(p.signals, {count_signal:String}), p.signals[{count_signal:String}], NULL) AS count_now,
    multiIf(
        o.n IS NOT NULL, o.n,
        p.tick + toIntervalHour({horizon_hours:UInt32}) IN (SELECT DISTINCT tick FROM trail_trend_snapshots), 0,
        NULL) AS realised_count
FROM
(
    SELECT item_id, tick, rank, score, predicted_count, signals
    FROM trail_predictions FINAL
    WHERE has({items:Array(String)}, item_id)
      AND model_version IN (SELECT model_version FROM chosen)
      AND tick >= {time_from:DateTime64(3, 'UTC')} AND tick <= {time_to:DateTime64(3, 'UTC')}
) AS p
LEFT JOIN observed AS o ON o.item_id = p.item_id AND o.tick = p.tick + toIntervalHour({horizon_hours:UInt32})
ORDER BY item_id, tick
SETTINGS join_use_nulls = 1
