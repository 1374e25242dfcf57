-- Per-unit contingency counts of specialization's groups, for analysis.bootstrap (moe_lens/analysis/units.py):
-- the analysed routing rows of specialization.sql (one epoch per (run, dataset) from $keys, one split, $layer or
-- each layer, rank 0 unless $all_ranks, a non-NULL value of $attribute, the in_vocab rule: in_vocab false out
-- unless $include_oov, where in_vocab is NULL token_id = the run's <unk> id out), split by the unit of their
-- token: unit_ds = its dataset, unit_doc = doc_id, unit_sent = sent_id with $by_sentence (-1 where a level is not
-- used; $by_unit false: one unit per dataset). Rows (run, dataset, layer, unit_ds, unit_doc, unit_sent, value,
-- expert, n); the value of a token is the `token_value` macro (moe_lens/store.py, shared with the other
-- attribute SQL); MI, NMI and AMI of the summed table are computed in moe_lens/information.py.
WITH tok AS (
    SELECT run, dataset, token_idx, doc_id, sent_id,
           token_value($attribute, pos_tag, freq_band, dataset, ner_tag, segment, token, in_answer, position) AS value,
           coalesce(NOT in_vocab, token_id = $unk_ids[list_position($unk_runs, run)], false) AS oov
    FROM tokens
    WHERE list_contains($runs, run) AND split = $split
)
SELECT r.run, CASE WHEN $attribute = 'dataset' THEN '*' ELSE r.dataset END AS dataset, r.layer,
       r.dataset AS unit_ds, CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
       CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent, t.value, r.expert, count(*) AS n
FROM routing r JOIN tok t ON t.run = r.run AND t.dataset = r.dataset AND t.token_idx = r.token_idx
WHERE list_contains($runs, r.run) AND list_contains($keys, r.run || '|' || r.dataset || '|' || CAST(r.epoch AS VARCHAR))
  AND r.split = $split AND ($layer IS NULL OR r.layer = $layer) AND ($all_ranks OR r.rank = 0)
  AND t.value IS NOT NULL AND ($include_oov OR NOT t.oov)
GROUP BY ALL
