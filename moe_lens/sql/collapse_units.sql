-- Per-unit expert counts of collapse's groups, for analysis.bootstrap (moe_lens/analysis/units.py): the routing
-- rows of load_balance.sql's groups g = (run, dataset, split, epoch[, step], layer) (rank 0 unless $all_ranks),
-- split by the document (unit_doc = doc_id) or, with $by_sentence, the sentence (unit_sent = sent_id) of their
-- token in `tokens`; -1 where a level is not used ($by_unit false: one unit). Rows (g, unit_doc, unit_sent,
-- expert, n); collapse's entropy H = -sum_e p_e ln p_e of the summed n is computed in numpy (bootstrap.py).
SELECT r.run, r.dataset, r.split, r.epoch, CASE WHEN $by_step THEN r.step END AS step, r.layer,
       CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
       CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent, r.expert, count(*) AS n
FROM routing r JOIN tokens t ON t.run = r.run AND t.dataset = r.dataset AND t.split = r.split AND t.token_idx = r.token_idx
WHERE list_contains($runs, r.run) AND list_contains($run_datasets, r.run || '|' || r.dataset) AND r.split = $split
  AND ($layer IS NULL OR r.layer = $layer) AND ($epoch IS NULL OR r.epoch = $epoch) AND ($all_ranks OR r.rank = 0)
  AND list_contains($runs, t.run) AND t.split = $split
GROUP BY ALL
