-- Rolling accuracy: for each tick whose forecast period (tick, tick + horizon] has passed,
-- predicted vs realised counts of the items scored at that tick. Realised = the count over
-- the horizon window at tick + horizon (trend snapshots, else later predictions' signals;
-- 0 for an item absent from a snapshot that exists). Metrics on log(1 + count) like the
-- offline evaluation: MAE, RMSE, Spearman (Pearson correlation of average ranks), and their
-- means over the last window_ticks ticks (the current one included); and NDCG@top_n of the
-- tick's published ranking with the realised counts as gains, discounted by log2(1 + position):
-- DCG over the published top N, IDCG over the N items that did best, NULL where nothing ranked
-- at the tick was bought or viewed (IDCG = 0).
-- Parameters: model_version ('' = latest model), count_signal (e.g. count_7d),
-- horizon_hours (e.g. 168), window_ticks (e.g. 24), top_n (NDCG's K, e.g. 10), time_from, time_to.
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
            p.predicted_count AS predicted,
            multiIf(
                o.n IS NOT NULL, o.n,
                p.tick + toIntervalHour({horizon_hours:UInt32}) IN (SELECT DISTINCT tick FROM trail_trend_snapshots), 0,
                NULL) AS realised
        FROM
        (
            SELECT item_id, tick, rank, predicted_count
            FROM trail_predictions FINAL
            WHERE model_version IN (SELECT model_version FROM chosen)
              AND tick >= {time_from:DateTime64(3, 'UTC')} AND tick <= {time_to:DateTime64(3, 'UTC')}
        ) AS p
        LEFT JOIN observed AS o ON o.item_id = p.item_id AND o.tick = p.tick + toIntervalHour({horizon_hours:UInt32})
        SETTINGS join_use_nulls = 1
    ),
    ranked AS
    (
        -- average ranks within a tick (ties share the mean of their positions), as scipy's spearmanr
        SELECT
            tick,
            rank,
            predicted,
            assumeNotNull(realised) AS actual,
            row_number() OVER (PARTITION BY tick ORDER BY actual DESC, rank) AS ideal_position,
            rank() OVER (PARTITION BY tick ORDER BY predicted) + (count() OVER (PARTITION BY tick, predicted) - 1) / 2 AS rank_predicted,
            rank() OVER (PARTITION BY tick ORDER BY actual) + (count() OVER (PARTITION BY tick, actual) - 1) / 2 AS rank_actual
        FROM scored
        WHERE realised IS NOT NULL
    ),
    per_tick AS
    (
        SELECT
            tick,
            count() AS items,
            avg(abs(log1p(predicted) - log1p(actual))) AS mae_log1p,
            sqrt(avg(pow(log1p(predicted) - log1p(actual), 2))) AS rmse_log1p,
            corr(toFloat64(rank_predicted), toFloat64(rank_actual)) AS spearman,
            sum(predicted) AS predicted_total,
            sum(actual) AS realised_total,
            sumIf(actual / log2(rank + 1), rank <= {top_n:UInt32}) AS dcg,
            sumIf(actual / log2(ideal_position + 1), ideal_position <= {top_n:UInt32}) AS idcg
        FROM ranked
        GROUP BY tick
    )
SELECT
    tick,
    items,
    mae_log1p,
    rmse_log1p,
    spearman,
    predicted_total,
    realised_total,
    if(idcg > 0, dcg / idcg, NULL) AS ndcg,
    avg(mae_log1p) OVER w AS mae_log1p_rolling,
    avg(rmse_log1p) OVER w AS rmse_log1p_rolling,
    avg(spearman) OVER w AS spearman_rolling
FROM per_tick
WINDOW w AS (ORDER BY tick ROWS BETWEEN {window_ticks:UInt32} - 1 PRECEDING AND CURRENT ROW)
ORDER BY tick
