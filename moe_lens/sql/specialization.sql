-- Contingency counts of expert by token attribute A (pos_tag, freq_band, dataset, ner_tag, segment, in_answer,
-- position_band, token), over the routing rows of one epoch per (run, dataset) ($keys: 'run|dataset|epoch'
-- strings), one split, one layer ($layer) or each recorded layer on its own rows ($layer NULL), rank 0 only unless $all_ranks. Rows (run, dataset, layer, is_shuffled, value,
-- expert, n); the value of a token is the `token_value` macro (moe_lens/store.py, shared with the other
-- attribute SQL); every measure (P(e|v), lift, MI, NMI, AMI, chance) is computed from them in moe_lens/information.py.
-- The analysed tokens of a (run, dataset): routed in that group, with a non-NULL value (ner_tag is NULL outside
-- CoNLL), and in the vocabulary unless $include_oov: in_vocab = false is out; where in_vocab is NULL (traces
-- recorded before the column) a token is out iff token_id is the run's <unk> id ($unk_ids[i] for $unk_runs[i],
-- unk_ids.sql).
-- is_shuffled: the same counts with A permuted within the analysed tokens of each (run, dataset, split, epoch,
-- layer): the i-th token (in token_idx order, i in 0..m-1) takes the value of the token at ((i * 1000000007 + $seed)
-- mod m), a bijection since the prime 1000000007 > m. Its marginals are those of the real table, so it is a chance
-- level on these very routing counts, also for sparse train traces (only the recorded batches). $shuffled = false
-- skips it. For attribute = 'dataset' the datasets of a run are pooled (dataset = '*'); the permutation, within
-- one dataset, could not break that association, so the caller leaves it off.
-- Speed (10^7 tokens): joins are on (part, token_idx) with part = hash(run, dataset), two integers, not on the
-- strings run, dataset (split is one value here); tokens are hashed once; counts are grouped by integer keys before
-- run names come back. `sizes` fails loudly should two (run, dataset) pairs ever share a 64-bit hash. The one sort
-- is the numbering of the analysed tokens (a window over tokens, not over routing rows).
WITH tok AS (
    SELECT hash(run, dataset) AS part, token_idx,
           token_value($attribute, pos_tag, freq_band, dataset, ner_tag, segment, token, in_answer, position) AS value,
           coalesce(NOT in_vocab, token_id = $unk_ids[list_position($unk_runs, run)], false) AS oov
    FROM tokens
    WHERE list_contains($runs, run) AND split = $split
),
sizes AS (  -- one row per (run, dataset) of the split
    SELECT part, any_value(run) AS run, any_value(dataset) AS dataset,
           CASE WHEN count(DISTINCT run || '|' || dataset) > 1
                THEN error('specialization: two (run, dataset) pairs share a hash; please report') END AS collision
    FROM (SELECT DISTINCT hash(run, dataset) AS part, run, dataset FROM routing
          WHERE list_contains($runs, run) AND list_contains($keys, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
            AND split = $split)
    GROUP BY part
),
kept AS (  -- the analysed routing rows with their token's value
    SELECT r.part, r.layer, r.token_idx, r.expert, t.value
    FROM (SELECT hash(run, dataset) AS part, layer, token_idx, expert FROM routing
          WHERE list_contains($runs, run) AND list_contains($keys, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
            AND split = $split AND ($layer IS NULL OR layer = $layer) AND ($all_ranks OR rank = 0)) r
    JOIN tok t ON t.part = r.part AND t.token_idx = r.token_idx
    WHERE t.value IS NOT NULL AND ($include_oov OR NOT t.oov)
),
numbered AS (  -- the analysed tokens of each (part, layer), numbered 0..m-1 in token_idx order
    SELECT part, layer, token_idx, value, row_number() OVER (PARTITION BY part, layer ORDER BY token_idx) - 1 AS i,
           count(*) OVER (PARTITION BY part, layer) AS m
    FROM (SELECT DISTINCT part, layer, token_idx, value FROM kept WHERE $shuffled)
),
shuffled AS (  -- token i takes the value of token (i * 1000000007 + $seed) mod m of the same (part, layer)
    SELECT a.part, a.layer, a.token_idx, b.value
    FROM numbered a JOIN numbered b ON b.part = a.part AND b.layer = a.layer AND b.i = (a.i * 1000000007 + $seed) % a.m
),
counts AS (
    SELECT part, layer, false AS is_shuffled, value, expert, count(*) AS n FROM kept GROUP BY part, layer, value, expert
    UNION ALL
    SELECT k.part, k.layer, true, s.value, k.expert, count(*)
    FROM kept k JOIN shuffled s ON s.part = k.part AND s.layer = k.layer AND s.token_idx = k.token_idx
    GROUP BY k.part, k.layer, s.value, k.expert
)
SELECT s.run, CASE WHEN $attribute = 'dataset' THEN '*' ELSE s.dataset END AS dataset, c.layer,
       c.is_shuffled, c.value, c.expert, CAST(sum(c.n) AS BIGINT) AS n
FROM counts c JOIN sizes s ON s.part = c.part AND s.collision IS NULL
GROUP BY ALL
ORDER BY s.run, dataset, c.layer, c.is_shuffled, c.value, c.expert
