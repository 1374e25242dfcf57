-- The last recorded epoch of each (run, dataset) of $run_datasets ('run|dataset' keys) in a split (the default
-- epoch of the snapshot analyses).
-- `trace_keys` is the routing view, or the runs' summary files (moe_lens/summary.py): the same (run, dataset, split,
-- epoch, step, layer, expert, rank) tuples, so the same answer without a scan of the trace.
SELECT run, dataset, max(epoch) AS epoch
FROM trace_keys
WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
GROUP BY run, dataset
ORDER BY run, dataset
