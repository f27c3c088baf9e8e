-- NDCG@K of each tick's published ranking against what then happened, for the ticks whose
-- forecast period (tick, tick + horizon] has passed. Gains are the realised counts of the items
-- ranked at the tick (the count over the horizon window at tick + horizon, from trend snapshots or
-- later predictions' signals; 0 for an item absent from a snapshot that exists), discounted by
-- log2(1 + position): DCG over the published top K, IDCG over the K items that did best.
-- NULL where nothing ranked at the tick was bought or viewed (IDCG = 0).
-- Parameters: model_version ('' = latest model), count_signal, horizon_hours, top_n (K), time_from, time_to.
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
            WHERE mapContains(signals, {count_signal:String})
              AND tick >= {time_from:DateTime64(3, 'UTC')} + toIntervalHour({horizon_hours:UInt32})
              AND tick <= {time_to:DateTime64(3, 'UTC')} + toIntervalHour({horizon_hours:UInt32})
            UNION ALL
            SELECT item_id, tick, signals[{count_signal:String}] AS n
            FROM trail_predictions FINAL
            WHERE mapContains(signals, {count_signal:String})
              AND tick >= {time_from:DateTime64(3, 'UTC')} + toIntervalHour({horizon_hours:UInt32})
              AND tick <= {time_to:DateTime64(3, 'UTC')} + toIntervalHour({horizon_hours:UInt32})
        )
        GROUP BY item_id, tick
    ),
    scored AS
    (
        SELECT
            p.tick AS tick,
            p.rank AS rank,
            multiIf(
                o.n IS NOT NULL, o.n,
                p.tick + toIntervalHour({horizon_hours:UInt32}) IN (SELECT DISTINCT tick FROM trail_trend_snapshots), 0,
                NULL) AS realised
        FROM
        (
            SELECT item_id, tick, rank
            FROM trail_predictions FINAL
            WHERE model_version IN (SELECT model_version FROM chosen)
              AND tick >= {time_from:DateTime64(3, 'UTC')} AND tick <= {time_to:DateTime64(3, 'UTC')}
        ) AS p
        LEFT JOIN observed AS o ON o.item_id = p.item_id AND o.tick = p.tick + toIntervalHour({horizon_hours:UInt32})
        SETTINGS join_use_nulls = 1
    ),
    positioned AS
    (
        SELECT
            tick,
            rank,
            assumeNotNull(realised) AS gain,
            row_number() OVER (PARTITION BY tick ORDER BY assumeNotNull(realised) DESC, rank) AS ideal_position
        FROM scored
        WHERE realised IS NOT NULL
    )
SELECT
    tick,
    sumIf(gain / log2(rank + 1), rank <= {top_n:UInt32}) AS dcg,
    sumIf(gain / log2(ideal_position + 1), ideal_position <= {top_n:UInt32}) AS idcg,
    if(idcg > 0, dcg / idcg, NULL) AS ndcg
FROM positioned
GROUP BY tick
ORDER BY tick
