-- Current top-N: the latest tick's ranking, each item with its explanation when the explainer
-- has written one (NULL until then), the forecast it states and the kind of reason it gives a
-- mover ('trend', 'level', 'neighbourhood', 'season', 'text'; NULL: none due or none given), where that reason came
-- from (reason_source: 'drivers', the model's top driver, or 'rule') and the model's top driver; the
-- prediction's 80% range (predicted_low / predicted_high, NULL from a model without quantile heads) and
-- drivers (each input group's share of the forecast's gap from the item's pace, in log counts; empty when not attributed).
-- Parameters: top_n, model_version ('' = the model that wrote the most recent tick).
WITH
    chosen AS
    (
        SELECT if({model_version:String} = '', argMax(model_version, tick), {model_version:String}) AS model_version
        FROM trail_predictions
    ),
    latest AS
    (
        SELECT max(tick) AS tick
        FROM trail_predictions
        WHERE model_version IN (SELECT model_version FROM chosen)
    )
SELECT
    p.rank AS rank,
    p.item_id AS item_id,
    p.score AS score,
    p.predicted_count AS predicted_count,
    p.predicted_low AS predicted_low,
    p.predicted_high AS predicted_high,
    e.explanation AS explanation,
    e.faithful AS faithful,
    e.claims_checked AS claims_checked,
    e.forecast AS forecast,
    e.reason AS reason,
    e.reason_source AS reason_source,
    e.driver AS driver,
    p.drivers AS drivers,
    p.signals AS signals,
    p.model_version AS model_version,
    p.tick AS tick
FROM
(
    SELECT item_id, tick, model_version, rank, score, predicted_count, predicted_low, predicted_high, drivers, signals
    FROM trail_predictions FINAL
    WHERE tick IN (SELECT tick FROM latest) AND model_version IN (SELECT model_version FROM chosen)
) AS p
LEFT JOIN
(
    SELECT item_id, model_version, explanation, faithful, claims_checked, forecast, reason, reason_source, driver
    FROM trail_explanations FINAL
    WHERE tick IN (SELECT tick FROM latest) AND model_version IN (SELECT model_version FROM chosen)
) AS e ON e.item_id = p.item_id AND e.model_version = p.model_version
ORDER BY rank, item_id
LIMIT {top_n:UInt32}
SETTINGS join_use_nulls = 1
