-- The observed routing of the ablated tokens, for the correlation of causal importance with the load statistics:
-- for each (run, dataset, split, epoch, layer) of the ablation table, the routing rows (every rank) at the
-- ablation's epoch of the tokens it evaluated, counted per unit (unit_doc = doc_id; with $by_sentence unit_sent =
-- sent_id; -1 where unused), expert and POS tag (pos_tag NULL kept: it counts for the load, not the POS table):
-- n assignments and gate = their summed gate. Load share, importance share and the specialization KL(P(pos | e)
-- || P(pos)) follow in numpy (analysis/ablation.py).
WITH ev AS (
    SELECT DISTINCT run, dataset, split, epoch, layer, token_idx FROM ablation
    WHERE list_contains($runs, run) AND split = $split AND ($layer IS NULL OR layer = $layer)
)
SELECT r.run, r.dataset, r.split, r.epoch, r.layer,
       CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
       CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent,
       r.expert, t.pos_tag, count(*) AS n, sum(CAST(r.gate AS DOUBLE)) AS gate
FROM routing r
JOIN ev ON ev.run = r.run AND ev.dataset = r.dataset AND ev.split = r.split AND ev.epoch = r.epoch
    AND ev.layer = r.layer AND ev.token_idx = r.token_idx
JOIN tokens t ON t.run = r.run AND t.dataset = r.dataset AND t.split = r.split AND t.token_idx = r.token_idx
WHERE list_contains($runs, r.run) AND r.split = $split AND r.expert >= 0
GROUP BY ALL
