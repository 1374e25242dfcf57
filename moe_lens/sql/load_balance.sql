-- Per-expert load and importance (Shazeer et al. 2017, "Outrageously large neural networks").
-- Group g = (run, dataset, split, epoch, step, layer), over the (run, dataset) pairs of $run_datasets ('run|dataset'
-- keys: run_datasets.sql); with $by_step false one group per epoch (step = its last step).
--   tokens_e      = routing rows of g sent to expert e (every rank, or rank 0 only when $all_ranks is false)
--   importance_e  = sum of their gates
--   share_e       = tokens_e / sum_j tokens_j,  importance_share_e = importance_e / sum_j importance_j
--   assignments_e = rows of every rank sent to e (all k assignments), assignment_share_e = its share
--   top1_e        = rank-0 rows sent to e
-- Every expert 0..num_experts-1 appears, with 0 when it got nothing (num_experts from the run's config).
-- Read from `counts` (routing_counts.sql over the trace, or the runs' summary files: moe_lens/summary.py), whose
-- groups are small: one pass over the trace, none at all with a summary.
WITH by_rank AS (
    SELECT run, dataset, split, epoch, CASE WHEN $by_step THEN step END AS step_key, layer, expert, rank = 0 AS top,
           max(step) AS last_step, sum(n) AS n, sum(gates) AS importance
    FROM counts
    WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
      AND ($layer IS NULL OR layer = $layer) AND ($epoch IS NULL OR epoch = $epoch)
    GROUP BY run, dataset, split, epoch, step_key, layer, expert, top
),
fine AS (
    SELECT run, dataset, split, epoch, step_key, layer, expert, max(last_step) AS last_step,
           sum(CASE WHEN $all_ranks OR top THEN n ELSE 0 END) AS n,
           sum(CASE WHEN $all_ranks OR top THEN importance ELSE 0.0 END) AS importance,
           sum(n) AS assignments, sum(CASE WHEN top THEN n ELSE 0 END) AS top1
    FROM by_rank
    GROUP BY run, dataset, split, epoch, step_key, layer, expert
),
groups AS (
    SELECT run, dataset, split, epoch, step_key, layer, max(last_step) AS step
    FROM fine GROUP BY run, dataset, split, epoch, step_key, layer
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
    SELECT grid.run, grid.dataset, grid.split, grid.epoch, grid.step_key, grid.step, grid.layer, grid.num_experts,
           grid.expert, coalesce(f.n, 0) AS tokens, coalesce(f.importance, 0.0) AS importance,
           coalesce(f.assignments, 0) AS assignments, coalesce(f.top1, 0) AS top1
    FROM grid LEFT JOIN fine f
      ON f.run = grid.run AND f.dataset = grid.dataset AND f.split = grid.split AND f.epoch = grid.epoch
     AND f.layer = grid.layer AND f.step_key IS NOT DISTINCT FROM grid.step_key AND f.expert = grid.expert
)
SELECT run, dataset, split, epoch, step, layer, num_experts, expert, CAST(tokens AS BIGINT) AS tokens, importance,
       tokens / sum(tokens) OVER g AS share,
       importance / sum(importance) OVER g AS importance_share,
       CAST(assignments AS BIGINT) AS assignments, assignments / sum(assignments) OVER g AS assignment_share,
       CAST(top1 AS BIGINT) AS top1
FROM filled
WINDOW g AS (PARTITION BY run, dataset, split, epoch, step_key, layer)
