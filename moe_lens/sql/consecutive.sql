-- Consecutive-token routing (Jiang et al. 2024, Mixtral, Table 5). Occurrences of one epoch per (run, dataset)
-- ($keys: 'run|dataset|epoch'), one split, $layer or each layer; a pair is (token t, token t + 1) routed at the
-- same step and layer, both in the same document (doc_id) and, with $within = 'sentence', the same sentence
-- (sent_id) of `tokens`. Per pair: left = t's top-1 (rank 0), right = t + 1's top-1 and its top-2 set {rank 0, 1}
-- (the top-1 alone for top-1 routers). Rows (run, dataset, split, epoch, layer, unit_doc, unit_sent, expert, a,
-- same, in2, b, c), per resampling unit (analysis/units.py; -1 where unused, $by_unit false: one unit):
--   a_i = pairs whose left top-1 is i; same_i, in2_i = those whose right top-1 is i too / whose right top-2 holds i
--   b_i = pairs whose right top-1 is i;  c_i = pairs whose right top-2 holds i
-- numpy then gives same_top1 = sum same / P, top1_in_next_top2 = sum in2 / P (P = sum a = pairs) and the exact
-- expectations if pairs were matched at random with these frequencies: sum_i a_i b_i / P^2 (= sum p_i^2 when both
-- sides have the same p) and sum_i a_i c_i / P^2 (literature.py).
WITH tok AS (
    SELECT hash(run, dataset) AS part, token_idx, doc_id, sent_id FROM tokens
    WHERE list_contains($runs, run) AND split = $split
),
occ AS (  -- one row per routed occurrence: its top-1 e0 and second expert e1 (NULL for top-1 routers), its text unit
    SELECT o.*, t.doc_id, t.sent_id
    FROM (SELECT hash(run, dataset) AS part, any_value(run) AS run, any_value(dataset) AS dataset, epoch, step, layer,
                 token_idx, max(CASE WHEN rank = 0 THEN expert END) AS e0, max(CASE WHEN rank = 1 THEN expert END) AS e1
          FROM routing
          WHERE list_contains($runs, run) AND list_contains($keys, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
            AND split = $split AND ($layer IS NULL OR layer = $layer) AND rank < 2
          GROUP BY part, epoch, step, layer, token_idx) o
    JOIN tok t ON t.part = o.part AND t.token_idx = o.token_idx
    WHERE o.e0 IS NOT NULL
),
pairs AS (
    SELECT a.run, a.dataset, a.epoch, a.layer, a.e0 AS left_e0, b.e0 AS right_e0, b.e1 AS right_e1,
           CASE WHEN $by_unit THEN a.doc_id ELSE -1 END AS unit_doc,
           CASE WHEN $by_sentence THEN a.sent_id ELSE -1 END AS unit_sent
    FROM occ a
    JOIN occ b ON b.part = a.part AND b.epoch = a.epoch AND b.step = a.step AND b.layer = a.layer
        AND b.token_idx = a.token_idx + 1 AND b.doc_id = a.doc_id
    WHERE $within = 'document' OR a.sent_id = b.sent_id
),
sides AS (
    SELECT run, dataset, epoch, layer, unit_doc, unit_sent, left_e0 AS expert, 1 AS a,
           CAST(left_e0 = right_e0 AS INTEGER) AS same,
           CAST(left_e0 = right_e0 OR left_e0 IS NOT DISTINCT FROM right_e1 AS INTEGER) AS in2, 0 AS b, 0 AS c
    FROM pairs
    UNION ALL
    SELECT run, dataset, epoch, layer, unit_doc, unit_sent, right_e0, 0, 0, 0, 1, 1 FROM pairs
    UNION ALL
    SELECT run, dataset, epoch, layer, unit_doc, unit_sent, right_e1, 0, 0, 0, 0, 1 FROM pairs WHERE right_e1 IS NOT NULL
)
SELECT run, dataset, $split AS split, epoch, layer, unit_doc, unit_sent, expert,
       sum(a) AS a, sum(same) AS same, sum(in2) AS in2, sum(b) AS b, sum(c) AS c
FROM sides
GROUP BY run, dataset, epoch, layer, unit_doc, unit_sent, expert
