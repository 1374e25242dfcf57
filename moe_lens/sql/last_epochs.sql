-- The last recorded epoch of each (run, dataset) of $run_datasets ('run|dataset' keys) in a split (the default
-- epoch of the snapshot analyses).
SELECT run, dataset, max(epoch) AS epoch
FROM routing
WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
GROUP BY run, dataset
ORDER BY run, dataset
