-- The MoE layers recorded for each run (any dataset, split and epoch): one row per (run, layer), for the app's
-- layer picker.
-- `trace_keys` is the routing view, or the runs' summary files (moe_lens/summary.py): the same (run, dataset, split,
-- epoch, step, layer, expert, rank) tuples, so the same answer without a scan of the trace.
SELECT DISTINCT run, layer
FROM trace_keys
WHERE list_contains($runs, run)
ORDER BY run, layer
