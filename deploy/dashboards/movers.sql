-- Rank movers since the previous tick, among items in the top-N at either tick:
-- change is 'new' (not ranked before), 'dropped' (not ranked now), 'up' or 'down';
-- moved_up = rank_before - rank_now. Biggest changes first, entries and exits before moves.
-- Parameters: top_n, model_version ('' = latest model).
WITH
    chosen AS
    (
        SELECT if({model_version:String} = '', argMax(model_version, tick), {model_version:String}) AS model_version
        FROM trail_predictions
    ),
    ticks AS
    (
        SELECT DISTINCT tick
        FROM trail_predictions
        WHERE model_version IN (SELECT model_version FROM chosen)
        ORDER BY tick DESC
        LIMIT 2
    )
SELECT
    coalesce(c.item_id, b.item_id) AS item_id,
    c.rank AS rank_now,
    b.rank AS rank_before,
    toInt64(b.rank) - toInt64(c.rank) AS moved_up,
    multiIf(b.rank IS NULL, 'new', c.rank IS NULL, 'dropped', b.rank > c.rank, 'up', 'down') AS change,
    c.score AS score_now,
    b.score AS score_before,
    (SELECT max(tick) FROM ticks) AS tick,
    (SELECT min(tick) FROM ticks) AS previous_tick
FROM
(
    SELECT item_id, rank, score
    FROM trail_predictions FINAL
    WHERE tick = (SELECT max(tick) FROM ticks) AND model_version IN (SELECT model_version FROM chosen)
) AS c
FULL OUTER JOIN
(
    SELECT item_id, rank, score
    FROM trail_predictions FINAL
    WHERE tick = (SELECT min(tick) FROM ticks) AND (SELECT count() FROM ticks) = 2
      AND model_version IN (SELECT model_version FROM chosen)
) AS b ON c.item_id = b.item_id
WHERE least(ifNull(c.rank, 4294967295), ifNull(b.rank, 4294967295)) <= {top_n:UInt32}
  AND (b.rank IS NULL OR c.rank IS NULL OR b.rank != c.rank)
  AND (SELECT count() FROM ticks) = 2
ORDER BY ifNull(abs(moved_up), 4294967295) DESC, ifNull(rank_now, rank_before), item_id
SETTINGS join_use_nulls = 1
