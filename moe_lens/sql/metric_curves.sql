-- Scalar metric curves (layer and expert NULL) of $runs from metrics.parquet, long format, one row per logged
-- (run, split, name, step); $names (a list of metric names, or NULL for every name) keeps only those.
SELECT run, split, name, step, epoch, value
FROM metrics
WHERE list_contains($runs, run) AND layer IS NULL AND expert IS NULL
  AND ($names IS NULL OR list_contains($names, name))
ORDER BY run, split, name, step
