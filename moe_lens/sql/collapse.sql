-- Collapse of expert usage per group g = (run, dataset, split, epoch, step, layer), from per_expert
-- (load_balance.sql), p_e = share_e (rank 0 unless $all_ranks):
--   entropy            H = -sum_e p_e ln p_e  (nats; 0 ln 0 = 0)
--   norm_entropy       H / ln(num_experts)     (NULL for one expert)
--   effective_experts  exp(H)                  (1 = everything on one expert, num_experts = uniform)
--   dead_experts       #{e : assignments_e / sum_j assignments_j < 1 / (10 num_experts)}, over all k assignments
--                      (every rank, whatever $all_ranks says)
--   never_top1         #{e : top1_e = 0}, experts that are never any token's first choice
--   collapse_step      first recorded step after which effective_experts stays < $threshold
--                      (NULL when the last recorded step is still >= $threshold, and for a run with one expert,
--                      whose exp(H) = 1 by construction: nothing collapsed)
WITH h AS (
    SELECT run, dataset, split, epoch, step, layer, any_value(num_experts) AS num_experts,
           CAST(sum(tokens) AS BIGINT) AS tokens,
           0.0 - sum(CASE WHEN share > 0 THEN share * ln(share) ELSE 0.0 END) AS entropy,
           count(*) FILTER (WHERE coalesce(assignment_share, 0.0) < 1.0 / (10 * num_experts)) AS dead_experts,
           count(*) FILTER (WHERE top1 = 0) AS never_top1
    FROM per_expert
    GROUP BY run, dataset, split, epoch, step, layer
),
m AS (
    SELECT *, CASE WHEN num_experts > 1 THEN entropy / ln(num_experts) END AS norm_entropy,
           exp(entropy) AS effective_experts
    FROM h
),
c AS (
    SELECT *, max(CASE WHEN effective_experts >= $threshold THEN step END)
                  OVER (PARTITION BY run, dataset, split, layer) AS last_high
    FROM m
)
SELECT run, dataset, split, epoch, step, layer, num_experts, tokens, entropy, norm_entropy, effective_experts,
       dead_experts, never_top1,
       min(CASE WHEN num_experts > 1 AND (last_high IS NULL OR step > last_high) THEN step END)
           OVER (PARTITION BY run, dataset, split, layer) AS collapse_step
FROM c
ORDER BY run, dataset, split, layer, step
