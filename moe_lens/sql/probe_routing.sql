-- Features of the POS probe from routing (Antoine et al. 2024): for one run, dataset, split and epoch ($run,
-- $dataset, $split, $epoch), the first $max_tokens tokens (by token_idx) that carry a POS tag and were routed in
-- that epoch, one row per (token, layer, expert) the token was routed to (every rank; an empty expert-choice slot,
-- -1, left out): token_idx, unit_doc = doc_id, unit_sent = sent_id (the train/test split unit), token_id, pos_tag,
-- layer, expert, gate = the summed gate of its slots on that expert. The classifier runs in numpy/scikit-learn
-- (analysis/probe_routing.py) on this small table.
WITH tok AS (
    SELECT t.token_idx, t.doc_id, t.sent_id, t.token_id, t.pos_tag
    FROM tokens t
    WHERE t.run = $run AND t.dataset = $dataset AND t.split = $split AND t.pos_tag IS NOT NULL
      AND t.token_idx IN (SELECT token_idx FROM routing WHERE run = $run AND dataset = $dataset AND split = $split
                          AND epoch = $epoch)
    ORDER BY t.token_idx
    LIMIT $max_tokens
)
SELECT tok.token_idx, tok.doc_id AS unit_doc, tok.sent_id AS unit_sent, tok.token_id, tok.pos_tag, r.layer, r.expert,
       sum(CAST(r.gate AS DOUBLE)) AS gate
FROM tok JOIN routing r ON r.token_idx = tok.token_idx
WHERE r.run = $run AND r.dataset = $dataset AND r.split = $split AND r.epoch = $epoch AND r.expert >= 0
GROUP BY ALL
ORDER BY tok.token_idx, r.layer, r.expert
