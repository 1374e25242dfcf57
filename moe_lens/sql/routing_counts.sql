-- Routing rows counted per (run, dataset, split, epoch, step, layer, expert, rank): the one pass over the trace that
-- load_balance, collapse, router_confidence and capacity need, and the content of a per-run summary file
-- (moe_lens/summary.py: this query with $runs = [run] and $split NULL, written once per set of part files).
--   n          = routing rows of the group                 gates     = sum of their gates (DOUBLE)
--   entropies  = sum of their router entropies (DOUBLE)    dropped   = rows with dropped = true
--   known_drop = rows with a non-NULL dropped
-- $split NULL keeps every split.
SELECT run, dataset, split, epoch, step, layer, expert, rank, count(*) AS n, sum(CAST(gate AS DOUBLE)) AS gates,
       sum(CAST(entropy AS DOUBLE)) AS entropies, count(*) FILTER (WHERE dropped) AS dropped,
       count(dropped) AS known_drop
FROM routing
WHERE list_contains($runs, run) AND ($split IS NULL OR split = $split)
GROUP BY run, dataset, split, epoch, step, layer, expert, rank
