-- The recorded epochs of each (run, dataset) of $run_datasets in $split, the step each ended at (its largest
-- recorded step) and the largest expert id routed first: the training progress of an epoch and the field width of
-- fluctuation.sql.
SELECT run, dataset, epoch, max(step) AS step, max(CASE WHEN rank = 0 THEN expert END) AS max_expert
FROM routing
WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
GROUP BY run, dataset, epoch
ORDER BY run, dataset, epoch
