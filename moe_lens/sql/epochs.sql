-- The recorded epochs of one run on one dataset in a split, in order.
-- `trace_keys` is the routing view, or the runs' summary files (moe_lens/summary.py): the same (run, dataset, split,
-- epoch, step, layer, expert, rank) tuples, so the same answer without a scan of the trace.
SELECT DISTINCT epoch FROM trace_keys WHERE run = $run AND dataset = $dataset AND split = $split ORDER BY epoch
