-- Routing fluctuation (Dai et al. 2022, StableMoE): for each token of the split (valid: routed once per epoch) the
-- last recorded epoch at which its top-1 (rank 0) expert differed from its previous recorded epoch, per (run,
-- dataset) of $run_datasets ('run|dataset') and $layer or each layer. Rows (run, dataset, split, epoch = the last
-- recorded epoch, layer, unit_doc, unit_sent, last_change (-1: never changed), final_expert (top-1 at the last
-- epoch it was routed), n tokens) per resampling unit (analysis/units.py). numpy reads the epochs' steps
-- (epoch_steps.sql) and gives the share of tokens whose last change came after 20/50/80% of the final step.
WITH top AS (
    SELECT hash(run, dataset) AS part, epoch, layer, token_idx, expert
    FROM routing
    WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
      AND ($layer IS NULL OR layer = $layer) AND rank = 0
),
lagged AS (
    SELECT part, layer, token_idx, epoch, expert,
           expert <> lag(expert) OVER (PARTITION BY part, layer, token_idx ORDER BY epoch) AS changed,
           row_number() OVER (PARTITION BY part, layer, token_idx ORDER BY epoch DESC) AS from_last
    FROM top
),
per_token AS (
    SELECT part, layer, token_idx, coalesce(max(CASE WHEN changed THEN epoch END), -1) AS last_change,
           max(CASE WHEN from_last = 1 THEN expert END) AS final_expert
    FROM lagged GROUP BY part, layer, token_idx
),
tok AS (
    SELECT hash(run, dataset) AS part, token_idx, doc_id, sent_id FROM tokens WHERE list_contains($runs, run) AND split = $split
),
names AS (
    SELECT hash(run, dataset) AS part, any_value(run) AS run, any_value(dataset) AS dataset, max(epoch) AS epoch
    FROM routing
    WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
    GROUP BY part
)
SELECT s.run, s.dataset, $split AS split, s.epoch, p.layer, CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
       CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent, p.last_change, p.final_expert, count(*) AS n
FROM per_token p JOIN tok t ON t.part = p.part AND t.token_idx = p.token_idx JOIN names s ON s.part = p.part
GROUP BY ALL
