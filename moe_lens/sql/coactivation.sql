-- Co-activation of experts within a token's top-k: for each token occurrence (run, dataset, split, epoch, step,
-- token_idx) at MoE layer l, every ordered pair (i, j), i != j, of the experts it was routed to (all ranks, dropped
-- slots included: the router's choice) counts once. One epoch per run ($run_epochs: 'run|dataset|epoch' strings, each run's own dataset unless one is named); every
-- layer unless $layer is set. Per group g = (run, dataset, split, epoch, layer):
--   n_i  = occurrences with expert i among their experts,   n_ij = occurrences with both i and j
--   p_j_given_i = P(j | i) = n_ij / n_i    (rows i with n_i > 0; only pairs with n_ij > 0 are returned)
-- With top-1 routing there are no pairs and no rows.
-- Linear in the trace: one hash aggregate gives each occurrence its set of experts, occurrences are counted per
-- distinct set (few: at most C(e, k) per group), and the pairs are expanded from the sets, not by a self-join of
-- the trace on token_idx.
WITH sets AS (
    SELECT run, dataset, split, epoch, layer, experts, count(*) AS n
    FROM (SELECT run, dataset, split, epoch, layer, list_sort(list(DISTINCT expert) FILTER (WHERE expert IS NOT NULL)) AS experts
          FROM routing
          WHERE list_contains($runs, run) AND list_contains($run_epochs, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
            AND split = $split AND ($layer IS NULL OR layer = $layer)
          GROUP BY run, dataset, split, epoch, layer, step, token_idx)
    GROUP BY run, dataset, split, epoch, layer, experts
),
singles AS (
    SELECT run, dataset, split, epoch, layer, expert_i, CAST(sum(n) AS BIGINT) AS n_i
    FROM (SELECT run, dataset, split, epoch, layer, unnest(experts) AS expert_i, n FROM sets)
    GROUP BY run, dataset, split, epoch, layer, expert_i
),
pairs AS (
    SELECT run, dataset, split, epoch, layer, expert_i, expert_j, CAST(sum(n) AS BIGINT) AS n_ij
    FROM (SELECT run, dataset, split, epoch, layer, expert_i, unnest(experts) AS expert_j, n
          FROM (SELECT *, unnest(experts) AS expert_i FROM sets))
    WHERE expert_i <> expert_j
    GROUP BY run, dataset, split, epoch, layer, expert_i, expert_j
)
SELECT p.run, p.dataset, p.split, p.epoch, p.layer, p.expert_i, p.expert_j, p.n_ij, s.n_i,
       p.n_ij / s.n_i AS p_j_given_i
FROM pairs p JOIN singles s ON s.run = p.run AND s.dataset = p.dataset AND s.split = p.split AND s.epoch = p.epoch
    AND s.layer = p.layer AND s.expert_i = p.expert_i
ORDER BY p.run, p.dataset, p.split, p.epoch, p.layer, p.expert_i, p.expert_j
