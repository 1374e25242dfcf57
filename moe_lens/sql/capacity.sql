-- Capacity overflow per (run, dataset, split, epoch, layer), for runs whose config sets capacity_factor, over the
-- 'run|dataset' keys of $run_datasets. Capacity applies in training only: eval splits never drop (0 here).
--   dropped_rate       = #dropped routing rows / #routing rows   (token-expert assignments; rows with a known `dropped`)
--   dropped_top1_rate  = the same over rank-0 rows (= share of tokens dropped for top-1 routers)
-- Read from `counts` (routing_counts.sql over the trace, or the runs' summary files: moe_lens/summary.py).
SELECT r.run, r.dataset, r.split, r.epoch, max(r.step) AS step, r.layer,
       any_value(c.capacity_factor) AS capacity_factor, CAST(sum(r.n) AS BIGINT) AS assignments,
       CASE WHEN sum(r.known_drop) > 0 THEN sum(r.dropped) / sum(r.known_drop) END AS dropped_rate,
       CASE WHEN sum(r.known_drop) FILTER (WHERE r.rank = 0) > 0
            THEN sum(r.dropped) FILTER (WHERE r.rank = 0) / sum(r.known_drop) FILTER (WHERE r.rank = 0) END AS dropped_top1_rate
FROM counts r JOIN runs c ON c.run = r.run
WHERE list_contains($runs, r.run) AND list_contains($run_datasets, r.run || '|' || r.dataset) AND r.split = $split
  AND ($layer IS NULL OR r.layer = $layer) AND ($epoch IS NULL OR r.epoch = $epoch) AND c.capacity_factor IS NOT NULL
GROUP BY r.run, r.dataset, r.split, r.epoch, r.layer
ORDER BY r.run, r.dataset, r.split, r.layer, r.epoch
