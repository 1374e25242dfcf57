-- Layer-to-layer transitions of the top-1 (rank 0) expert: for each token occurrence (run, dataset, split, epoch,
-- step, token_idx) routed at both MoE layers $layer_a and $layer_b, one count in cell (expert_a, expert_b).
-- One epoch per run ($run_epochs: 'run|dataset|epoch' strings, each run's own dataset unless one is named). Per group g = (run, dataset, split, epoch):
--   n_a = sum_b n_ab,   p_b_given_a = P(b | a) = n_ab / n_a,   p_ab = n_ab / N_g
-- (MI, NMI and AMI of the table are computed from these counts in analysis/depth.py).
WITH a AS (
    SELECT run, dataset, split, epoch, step, token_idx, expert
    FROM routing
    WHERE list_contains($runs, run) AND list_contains($run_epochs, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
      AND split = $split AND rank = 0 AND layer = $layer_a
),
b AS (
    SELECT run, dataset, split, epoch, step, token_idx, expert
    FROM routing
    WHERE list_contains($runs, run) AND list_contains($run_epochs, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
      AND split = $split AND rank = 0 AND layer = $layer_b
),
cells AS (
    SELECT a.run, a.dataset, a.split, a.epoch, a.expert AS expert_a, b.expert AS expert_b, count(*) AS n
    FROM a JOIN b ON a.run = b.run AND a.dataset = b.dataset AND a.split = b.split AND a.epoch = b.epoch
        AND a.step = b.step AND a.token_idx = b.token_idx
    GROUP BY a.run, a.dataset, a.split, a.epoch, a.expert, b.expert
)
SELECT run, dataset, split, epoch, expert_a, expert_b, n,
       CAST(sum(n) OVER (PARTITION BY run, dataset, split, epoch, expert_a) AS BIGINT) AS n_a,
       n / sum(n) OVER (PARTITION BY run, dataset, split, epoch, expert_a) AS p_b_given_a,
       n / sum(n) OVER (PARTITION BY run, dataset, split, epoch) AS p_ab
FROM cells
ORDER BY run, dataset, split, epoch, expert_a, expert_b
