-- Per-expert load and importance (Shazeer et al. 2017, "Outrageously large neural networks").
-- Group g = (run, split, epoch, step, layer); with $by_step false one group per epoch (step = its last step).
--   tokens_e      = routing rows of g sent to expert e (every rank, or rank 0 only when $all_ranks is false)
--   importance_e  = sum of their gates
--   share_e       = tokens_e / sum_j tokens_j,  importance_share_e = importance_e / sum_j importance_j
-- Every expert 0..num_experts-1 appears, with 0 when it got nothing (num_experts from the run's config).
WITH fine AS (
    SELECT run, split, epoch, CASE WHEN $by_step THEN step END AS step_key, layer, expert,
           max(step) AS last_step, count(*) AS n, sum(CAST(gate AS DOUBLE)) AS importance
    FROM routing
    WHERE list_contains($runs, run) AND split = $split AND layer = $layer
      AND ($epoch IS NULL OR epoch = $epoch) AND ($all_ranks OR rank = 0)
    GROUP BY run, split, epoch, step_key, layer, expert
),
groups AS (
    SELECT run, split, epoch, step_key, layer, max(last_step) AS step
    FROM fine GROUP BY run, split, epoch, step_key, layer
),
sizes AS (
    SELECT f.run, greatest(coalesce(any_value(r.num_experts), 0), max(f.expert) + 1) AS num_experts
    FROM fine f LEFT JOIN runs r ON r.run = f.run
    GROUP BY f.run
),
grid AS (
    SELECT g.*, s.num_experts, CAST(unnest(range(s.num_experts)) AS SMALLINT) AS expert
    FROM groups g JOIN sizes s ON s.run = g.run
),
filled AS (
    SELECT grid.run, grid.split, grid.epoch, grid.step_key, grid.step, grid.layer, grid.num_experts, grid.expert,
           coalesce(f.n, 0) AS tokens, coalesce(f.importance, 0.0) AS importance
    FROM grid LEFT JOIN fine f
      ON f.run = grid.run AND f.split = grid.split AND f.epoch = grid.epoch AND f.layer = grid.layer
     AND f.step_key IS NOT DISTINCT FROM grid.step_key AND f.expert = grid.expert
)
SELECT run, split, epoch, step, layer, num_experts, expert, tokens, importance,
       tokens / sum(tokens) OVER g AS share,
       importance / sum(importance) OVER g AS importance_share
FROM filled
WINDOW g AS (PARTITION BY run, split, epoch, step_key, layer)
