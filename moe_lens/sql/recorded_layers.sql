-- The MoE layers recorded for each run (any dataset, split and epoch): one row per (run, layer), for the app's
-- layer picker.
SELECT DISTINCT run, layer
FROM routing
WHERE list_contains($runs, run)
ORDER BY run, layer
