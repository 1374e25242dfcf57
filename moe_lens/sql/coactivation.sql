-- Co-activation of experts within a token's top-k: for each token occurrence (run, dataset, split, epoch, step,
-- token_idx) at MoE layer l, every ordered pair (i, j), i != j, of the experts it was routed to (all ranks, dropped
-- slots included: the router's choice) counts once. One epoch per run ($run_epochs: 'run|dataset|epoch' strings, each run's own dataset unless one is named); every
-- layer unless $layer is set. Per group g = (run, dataset, split, epoch, layer):
--   n_i  = occurrences with expert i among their experts,   n_ij = occurrences with both i and j
--   p_j_given_i = P(j | i) = n_ij / n_i    (rows i with n_i > 0; only pairs with n_ij > 0 are returned)
-- With top-1 routing there are no pairs and no rows.
WITH sel AS (
    SELECT DISTINCT run, dataset, split, epoch, layer, step, token_idx, expert
    FROM routing
    WHERE list_contains($runs, run) AND list_contains($run_epochs, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
      AND split = $split AND ($layer IS NULL OR layer = $layer)
),
singles AS (
    SELECT run, dataset, split, epoch, layer, expert, count(*) AS n_i
    FROM sel GROUP BY run, dataset, split, epoch, layer, expert
),
pairs AS (
    SELECT x.run, x.dataset, x.split, x.epoch, x.layer, x.expert AS expert_i, y.expert AS expert_j, count(*) AS n_ij
    FROM sel x JOIN sel y ON x.run = y.run AND x.dataset = y.dataset AND x.split = y.split AND x.epoch = y.epoch
        AND x.layer = y.layer AND x.step = y.step AND x.token_idx = y.token_idx AND x.expert <> y.expert
    GROUP BY x.run, x.dataset, x.split, x.epoch, x.layer, x.expert, y.expert
)
SELECT p.run, p.dataset, p.split, p.epoch, p.layer, p.expert_i, p.expert_j, p.n_ij, s.n_i,
       p.n_ij / s.n_i AS p_j_given_i
FROM pairs p JOIN singles s ON s.run = p.run AND s.dataset = p.dataset AND s.split = p.split AND s.epoch = p.epoch
    AND s.layer = p.layer AND s.expert = p.expert_i
ORDER BY p.run, p.dataset, p.split, p.epoch, p.layer, p.expert_i, p.expert_j
