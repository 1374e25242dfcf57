-- Capacity overflow per (run, dataset, split, epoch, layer), for runs whose config sets capacity_factor, over the
-- 'run|dataset' keys of $run_datasets. Capacity applies in training only: eval splits never drop (0 here).
--   dropped_rate       = #dropped routing rows / #routing rows   (token-expert assignments)
--   dropped_top1_rate  = the same over rank-0 rows (= share of tokens dropped for top-1 routers)
SELECT r.run, r.dataset, r.split, r.epoch, max(r.step) AS step, r.layer,
       any_value(c.capacity_factor) AS capacity_factor, count(*) AS assignments,
       avg(CAST(r.dropped AS DOUBLE)) AS dropped_rate,
       avg(CAST(r.dropped AS DOUBLE)) FILTER (WHERE r.rank = 0) AS dropped_top1_rate
FROM routing r JOIN runs c ON c.run = r.run
WHERE list_contains($runs, r.run) AND list_contains($run_datasets, r.run || '|' || r.dataset) AND r.split = $split
  AND ($layer IS NULL OR r.layer = $layer) AND ($epoch IS NULL OR r.epoch = $epoch) AND c.capacity_factor IS NOT NULL
GROUP BY r.run, r.dataset, r.split, r.epoch, r.layer
ORDER BY r.run, r.dataset, r.split, r.layer, r.epoch
