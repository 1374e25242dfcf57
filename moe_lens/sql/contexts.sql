-- Example contexts of one token routed to one expert: up to $n occurrences of $token (in token_idx order) whose
-- top-1 (rank 0) expert was $expert at $layer in the last recorded epoch of $run on $dataset in $split, each with
-- the $width tokens either side (of the same dataset). Rows (hit, token_idx, token): hit = the occurrence's token_idx.
WITH last AS (SELECT max(epoch) AS epoch FROM routing WHERE run = $run AND dataset = $dataset AND split = $split),
hits AS (
    SELECT DISTINCT r.token_idx
    FROM routing r JOIN tokens t ON t.run = r.run AND t.dataset = r.dataset AND t.split = r.split
                                 AND t.token_idx = r.token_idx
    WHERE r.run = $run AND r.dataset = $dataset AND r.split = $split AND r.epoch = (SELECT epoch FROM last)
      AND r.layer = $layer AND r.rank = 0 AND r.expert = $expert AND t.token = $token
    ORDER BY r.token_idx LIMIT $n
)
SELECT h.token_idx AS hit, t.token_idx, t.token
FROM hits h JOIN tokens t ON t.run = $run AND t.dataset = $dataset AND t.split = $split
     AND t.token_idx BETWEEN h.token_idx - $width AND h.token_idx + $width
ORDER BY hit, t.token_idx
