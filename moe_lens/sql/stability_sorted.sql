-- The general form of stability.sql (same columns, same numbers), used when the packed encoding does not fit.
-- Stability of top-1 (rank 0) routing of one run on one dataset ($run, $dataset) per (split, layer, epoch);
-- a token is (dataset, token_idx):
--   changed   = share of tokens routed in this epoch and the previous recorded one whose top-1 expert differs
--               (NULL for the first recorded epoch)
--   same_next = share of adjacent token pairs (token_idx - 1, token_idx) of one sequence (position > 0 in
--               tokens: position restarts at 0 with each sentence/line/segment) with the same top-1 expert
-- Integer-only window keys: strings in PARTITION BY cost seconds on 10^7 rows, hence one run per query.
WITH top1 AS (
    SELECT epoch, token_idx, expert
    FROM routing
    WHERE run = $run AND dataset = $dataset AND split = $split AND layer = $layer AND rank = 0 AND list_contains($epochs, epoch)
),
changes AS (
    SELECT epoch, CASE WHEN lag(token_idx) OVER o = token_idx
                       THEN CAST(lag(expert) OVER o <> expert AS DOUBLE) END AS changed
    FROM top1
    WINDOW o AS (ORDER BY token_idx, epoch)
),
per_epoch AS (
    SELECT epoch, count(changed) AS tokens_compared, avg(changed) AS changed FROM changes GROUP BY epoch
),
starts AS (
    SELECT token_idx FROM tokens WHERE run = $run AND dataset = $dataset AND split = $split AND position = 0
),
prev AS (
    SELECT epoch, token_idx, CASE WHEN lag(token_idx) OVER w = token_idx - 1
                                  THEN CAST(lag(expert) OVER w = expert AS DOUBLE) END AS same_prev
    FROM top1
    WINDOW w AS (PARTITION BY epoch ORDER BY token_idx)
),
pairs AS (
    SELECT epoch, count(same_prev) AS pairs, avg(same_prev) AS same_next
    FROM prev ANTI JOIN starts ON starts.token_idx = prev.token_idx
    GROUP BY epoch
)
SELECT $run AS run, $dataset AS dataset, $split AS split, CAST($layer AS SMALLINT) AS layer, e.epoch,
       CASE WHEN e.tokens_compared > 0 THEN e.tokens_compared END AS tokens_compared, e.changed,
       p.pairs, p.same_next
FROM per_epoch e LEFT JOIN pairs p ON p.epoch = e.epoch
ORDER BY e.epoch
