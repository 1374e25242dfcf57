-- The last value of each scalar metric (layer and expert NULL) per (run, split, name), from metrics.parquet.
SELECT run, split, name, arg_max(value, step) AS value, max(step) AS step, arg_max(epoch, step) AS epoch
FROM metrics
WHERE list_contains($runs, run) AND layer IS NULL AND expert IS NULL
GROUP BY run, split, name
ORDER BY run, split, name
