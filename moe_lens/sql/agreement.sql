-- Contingency table of the top-1 (rank 0) experts two runs chose for the same tokens of one dataset
-- (token = ($dataset, token_idx), same split), run A at epoch $epoch_a, run B at epoch $epoch_b.
WITH a AS (
    SELECT token_idx, expert FROM routing
    WHERE run = $run_a AND dataset = $dataset AND split = $split AND layer = $layer AND rank = 0 AND epoch = $epoch_a
),
b AS (
    SELECT token_idx, expert FROM routing
    WHERE run = $run_b AND dataset = $dataset AND split = $split AND layer = $layer AND rank = 0 AND epoch = $epoch_b
)
SELECT a.expert AS expert_a, b.expert AS expert_b, count(*) AS n
FROM a JOIN b ON a.token_idx = b.token_idx
GROUP BY a.expert, b.expert
ORDER BY expert_a, expert_b
