-- The last recorded epoch of each run in a split (the default epoch of the snapshot analyses).
SELECT run, max(epoch) AS epoch
FROM routing
WHERE list_contains($runs, run) AND split = $split
GROUP BY run
ORDER BY run
