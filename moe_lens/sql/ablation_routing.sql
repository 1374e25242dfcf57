-- The observed routing of the ablated tokens, for the correlation of causal importance with the load statistics:
-- for each (run, dataset, split, epoch, layer) of the ablation table, the routing rows (every rank) at the
-- ablation's epoch of the tokens it evaluated, counted per unit (unit_doc = doc_id; with $by_sentence unit_sent =
-- sent_id; -1 where unused), expert and POS tag (pos_tag NULL kept: it counts for the load, not the POS table):
-- n assignments and gate = their summed gate. Load share, importance share and the specialization KL(P(pos | e)
-- || P(pos)) follow in numpy (analysis/ablation.py).
-- Speed: integer join keys (hash(run, dataset), epoch, layer, token_idx), the routing rows cut to the ablation's
-- epochs before the join, the run and dataset names joined back onto the aggregate.
WITH ev AS (
    SELECT DISTINCT hash(run, dataset) AS part, epoch, layer, token_idx FROM ablation
    WHERE list_contains($runs, run) AND split = $split AND ($layer IS NULL OR layer = $layer)
),
names AS (
    SELECT DISTINCT hash(run, dataset) AS part, run, dataset FROM ablation
    WHERE list_contains($runs, run) AND split = $split
),
tok AS (
    SELECT hash(run, dataset) AS part, token_idx, doc_id, sent_id, pos_tag FROM tokens
    WHERE list_contains($runs, run) AND split = $split
),
agg AS (
    SELECT ev.part, r.epoch, r.layer,
           CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
           CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent,
           r.expert, t.pos_tag, count(*) AS n, sum(CAST(r.gate AS DOUBLE)) AS gate
    FROM (SELECT hash(run, dataset) AS part, epoch, layer, token_idx, expert, gate FROM routing
          WHERE list_contains($runs, run) AND split = $split AND expert >= 0 AND ($layer IS NULL OR layer = $layer)
            AND epoch IN (SELECT DISTINCT epoch FROM ev)) r
    JOIN ev ON ev.part = r.part AND ev.epoch = r.epoch AND ev.layer = r.layer AND ev.token_idx = r.token_idx
    JOIN tok t ON t.part = r.part AND t.token_idx = r.token_idx
    GROUP BY ALL
)
SELECT x.run, x.dataset, $split AS split, a.epoch, a.layer, a.unit_doc, a.unit_sent, a.expert, a.pos_tag, a.n, a.gate
FROM agg a JOIN names x ON x.part = a.part
