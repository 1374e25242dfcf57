-- The (run, dataset) pairs an analysis covers in $split, as 'run|dataset' keys: $dataset NULL = each run's own
-- dataset (config.json `dataset`, in the runs view), a name = that (probe) dataset, '*' = every dataset the run
-- recorded in the split, each analysed on its own rows. A run without config.json falls back to every dataset.
-- `trace_keys` is the routing view, or the runs' summary files (moe_lens/summary.py): the same (run, dataset, split,
-- epoch, step, layer, expert, rank) tuples, so the same answer without a scan of the trace.
SELECT DISTINCT r.run || '|' || r.dataset AS key
FROM trace_keys r LEFT JOIN runs c ON c.run = r.run
WHERE list_contains($runs, r.run) AND r.split = $split
  AND CASE WHEN $dataset IS NULL THEN c.dataset IS NULL OR r.dataset = c.dataset
           WHEN $dataset = '*' THEN true ELSE r.dataset = $dataset END
ORDER BY key
