-- Routing fluctuation (Dai et al. 2022, StableMoE): for each token routed in every recorded epoch of the split
-- (valid: all of them), the last recorded epoch at which its top-1 (rank 0) expert differed from the previous
-- recorded epoch, per (run, dataset) of $run_datasets ('run|dataset') and $layer or each layer. Rows (run, dataset,
-- split, epoch = the last recorded epoch, layer, unit_doc, unit_sent, last_change (-1: never changed),
-- final_expert (top-1 at the last epoch), n tokens) per resampling unit (analysis/units.py). numpy reads the
-- epochs' steps (epoch_steps.sql) and gives the share of tokens whose last change came after 20/50/80% of the
-- final step. No sort and no self-join of the trace: one hash aggregate packs each token's top-1 experts into a
-- HUGEINT (field e, $bits wide, = expert + 1 at epoch e; Python checks $bits * (max epoch + 1) <= 127), then list
-- lambdas over each (run, dataset)'s recorded epochs ($epoch_lists[i] for $run_datasets[i], from epoch_steps.sql)
-- compare consecutive fields, once per distinct (unit, history).
WITH per_token AS (
    SELECT hash(run, dataset) AS part, layer, token_idx,
           bit_or(CAST(expert + 1 AS HUGEINT) << ($bits * epoch)) AS h, count(*) AS k
    FROM routing
    WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
      AND ($layer IS NULL OR layer = $layer) AND rank = 0
    GROUP BY part, layer, token_idx
),
tok AS (
    SELECT hash(run, dataset) AS part, token_idx, doc_id, sent_id FROM tokens WHERE list_contains($runs, run) AND split = $split
),
names AS (  -- each (run, dataset)'s name and recorded epochs
    SELECT DISTINCT hash(run, dataset) AS part, run, dataset,
           $epoch_lists[list_position($run_datasets, run || '|' || dataset)] AS epochs
    FROM tokens WHERE list_contains($runs, run) AND split = $split AND list_contains($run_datasets, run || '|' || dataset)
),
histories AS (  -- distinct (unit, packed history) with their token count
    SELECT p.part, p.layer, CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
           CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent, p.h, p.k, count(*) AS n
    FROM per_token p JOIN tok t ON t.part = p.part AND t.token_idx = p.token_idx
    GROUP BY ALL
),
mask AS (SELECT (CAST(1 AS HUGEINT) << $bits) - 1 AS m)
SELECT s.run, s.dataset, $split AS split, epochs[len(epochs)] AS epoch, layer, unit_doc, unit_sent,
       coalesce(epochs[list_max(list_filter(range(2, len(epochs) + 1),
           lambda i: ((h >> ($bits * epochs[i])) & m) <> ((h >> ($bits * epochs[i - 1])) & m)))], -1) AS last_change,
       CAST(((h >> ($bits * epochs[len(epochs)])) & m) - 1 AS INTEGER) AS final_expert, sum(n) AS n
FROM histories g JOIN names s ON s.part = g.part, mask
WHERE k = len(epochs)
GROUP BY ALL
