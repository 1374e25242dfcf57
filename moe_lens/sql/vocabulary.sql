-- Vocabulary specialization (Muennighoff et al. 2024, OLMoE, section 5): top-1 (rank 0) routing rows of one epoch
-- per (run, dataset) ($keys: 'run|dataset|epoch'), one split, $layer or each layer, counted per token type
-- (the surface `token`; words outside the vocabulary are left out unless $include_oov: the in_vocab rule, in_vocab
-- NULL -> token_id = the run's <unk> id, $unk_ids[i] for $unk_runs[i]) and expert, per resampling unit (unit_doc =
-- doc_id, unit_sent = sent_id with $by_sentence; -1 where unused). Rows (run, dataset, split, epoch, layer,
-- unit_doc, unit_sent, token, expert, n). numpy then keeps the types with N_t = sum_e n_te >= min_count and
-- gives share_t = max_e n_te / N_t, the share of type t routed to its most frequent expert (literature.py).
WITH tok AS (
    SELECT hash(run, dataset) AS part, token_idx, token, doc_id, sent_id,
           coalesce(NOT in_vocab, token_id = $unk_ids[list_position($unk_runs, run)], false) AS oov
    FROM tokens
    WHERE list_contains($runs, run) AND split = $split
),
counts AS (
    SELECT r.part, r.epoch, r.layer, CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
           CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent, t.token, r.expert, count(*) AS n
    FROM (SELECT hash(run, dataset) AS part, epoch, layer, token_idx, expert FROM routing
          WHERE list_contains($runs, run) AND list_contains($keys, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
            AND split = $split AND ($layer IS NULL OR layer = $layer) AND rank = 0) r
    JOIN tok t ON t.part = r.part AND t.token_idx = r.token_idx
    WHERE $include_oov OR NOT t.oov
    GROUP BY ALL
),
names AS (
    SELECT DISTINCT hash(run, dataset) AS part, run, dataset FROM tokens WHERE list_contains($runs, run) AND split = $split
)
SELECT s.run, s.dataset, $split AS split, c.epoch, c.layer, c.unit_doc, c.unit_sent, c.token, c.expert, c.n
FROM counts c JOIN names s ON s.part = c.part
