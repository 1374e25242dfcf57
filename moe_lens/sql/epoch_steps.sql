-- The recorded epochs of each (run, dataset) of $run_datasets in $split and the step each ended at (its largest
-- recorded step): the training progress of an epoch for fluctuation.sql.
SELECT run, dataset, epoch, max(step) AS step
FROM routing
WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
GROUP BY run, dataset, epoch
ORDER BY run, dataset, epoch
