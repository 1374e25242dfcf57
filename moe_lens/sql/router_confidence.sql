-- Router confidence per (run, split, epoch[, step], layer), over tokens (rank-0 rows):
--   top1_gate  = mean_t g_t,0                     (gate of the chosen / largest expert)
--   margin     = mean_t (g_t,0 - g_t,1)  = mean g_0 - mean g_1, exact when every token has a rank-1 row
--                (top-k routers with k >= 2); NULL otherwise (k = 1, expert choice)
--   entropy    = mean_t H_t, H_t = -sum_j p_tj ln p_tj the router entropy the recorder stores (nats)
SELECT run, split, epoch, max(step) AS step, layer,
       count(*) FILTER (WHERE rank = 0) AS tokens,
       avg(CAST(gate AS DOUBLE)) FILTER (WHERE rank = 0) AS top1_gate,
       CASE WHEN count(*) FILTER (WHERE rank = 1) = count(*) FILTER (WHERE rank = 0)
            THEN avg(CAST(gate AS DOUBLE)) FILTER (WHERE rank = 0) - avg(CAST(gate AS DOUBLE)) FILTER (WHERE rank = 1)
       END AS margin,
       avg(CAST(entropy AS DOUBLE)) FILTER (WHERE rank = 0) AS entropy
FROM routing
WHERE list_contains($runs, run) AND split = $split AND layer = $layer AND rank <= 1
  AND ($epoch IS NULL OR epoch = $epoch)
GROUP BY run, split, epoch, CASE WHEN $by_step THEN step END, layer
ORDER BY run, split, layer, step
