-- Router confidence per (run, dataset, split, epoch[, step], layer) over the 'run|dataset' keys of $run_datasets,
-- over tokens (rank-0 rows):
--   top1_gate  = mean_t g_t,0                     (gate of the chosen / largest expert)
--   margin     = mean_t (g_t,0 - g_t,1)  = mean g_0 - mean g_1, exact when every token has a rank-1 row
--                (top-k routers with k >= 2); NULL otherwise (k = 1, expert choice)
--   entropy    = mean_t H_t, H_t = -sum_j p_tj ln p_tj the router entropy the recorder stores (nats)
-- Read from `counts` (routing_counts.sql over the trace, or the runs' summary files: moe_lens/summary.py).
WITH by_rank AS (
    SELECT run, dataset, split, epoch, CASE WHEN $by_step THEN step END AS step_key, layer, rank,
           max(step) AS step, sum(n) AS n, sum(gates) AS gates, sum(entropies) AS entropies
    FROM counts
    WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
      AND ($layer IS NULL OR layer = $layer) AND rank <= 1
      AND ($epoch IS NULL OR epoch = $epoch)
    GROUP BY run, dataset, split, epoch, step_key, layer, rank
)
SELECT run, dataset, split, epoch, max(step) AS step, layer,
       CAST(sum(n) FILTER (WHERE rank = 0) AS BIGINT) AS tokens,
       sum(gates) FILTER (WHERE rank = 0) / sum(n) FILTER (WHERE rank = 0) AS top1_gate,
       CASE WHEN sum(n) FILTER (WHERE rank = 1) = sum(n) FILTER (WHERE rank = 0)
            THEN sum(gates) FILTER (WHERE rank = 0) / sum(n) FILTER (WHERE rank = 0)
               - sum(gates) FILTER (WHERE rank = 1) / sum(n) FILTER (WHERE rank = 1)
       END AS margin,
       sum(entropies) FILTER (WHERE rank = 0) / sum(n) FILTER (WHERE rank = 0) AS entropy
FROM by_rank
GROUP BY run, dataset, split, epoch, step_key, layer
ORDER BY run, dataset, split, layer, step
