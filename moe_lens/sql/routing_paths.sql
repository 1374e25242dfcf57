-- Routing paths across MoE layers: the path of a token occurrence is the tuple of its top-1 (rank 0) experts
-- over the layers, in layer order, written 'e0-e1-...'. An occurrence is (run, dataset, split, epoch, step,
-- token_idx); only occurrences routed at every layer recorded for their (run, dataset, split, epoch) form a path
-- (a token an expert_choice layer left unrouted has none). One epoch per run ($run_epochs: 'run|dataset|epoch' strings, each run's own dataset unless one is named).
-- Returns the contingency counts the path and per-layer statistics are computed from (analysis/depth.py):
--   layer NULL:  label = the path,             value = the token's $attribute (NULL if it has none), n
--   layer = l:   label = the top-1 expert at l, value, n   (over the same occurrences as the paths)
-- so H(path), the number of distinct paths, I(path; A) and each layer's I(expert_l; A) share one population.
-- value is NULL for a word outside the model's vocabulary unless $include_oov (in_vocab false; where in_vocab is NULL,
-- token_id = the run's <unk> id, $unk_ids[i] for $unk_runs[i]): such occurrences count in the paths, not in I(.; A).
WITH top1 AS (
    SELECT run, dataset, split, epoch, step, token_idx, layer, expert
    FROM routing
    WHERE list_contains($runs, run) AND list_contains($run_epochs, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
      AND split = $split AND rank = 0
),
depth AS (
    SELECT run, dataset, split, epoch, count(DISTINCT layer) AS num_layers
    FROM top1 GROUP BY run, dataset, split, epoch
),
paths AS (
    SELECT t.run, t.dataset, t.split, t.epoch, t.step, t.token_idx,
           string_agg(CAST(t.expert AS VARCHAR), '-' ORDER BY t.layer) AS path, count(*) AS layers_seen
    FROM top1 t
    GROUP BY t.run, t.dataset, t.split, t.epoch, t.step, t.token_idx
),
complete AS (
    SELECT p.*, CASE WHEN NOT $include_oov AND coalesce(NOT k.in_vocab, k.token_id = $unk_ids[list_position($unk_runs, k.run)], false)
                     THEN NULL  -- a word outside the vocabulary: no value (specialization's in_vocab rule)
                     ELSE CASE $attribute WHEN 'pos_tag' THEN k.pos_tag WHEN 'freq_band' THEN k.freq_band
                    WHEN 'ner_tag' THEN k.ner_tag WHEN 'segment' THEN k.segment WHEN 'token' THEN k.token END END AS value
    FROM paths p
    JOIN depth d ON d.run = p.run AND d.dataset = p.dataset AND d.split = p.split AND d.epoch = p.epoch
    LEFT JOIN tokens k ON k.run = p.run AND k.dataset = p.dataset AND k.split = p.split AND k.token_idx = p.token_idx
    WHERE p.layers_seen = d.num_layers
),
labelled AS (
    SELECT run, dataset, split, epoch, CAST(NULL AS SMALLINT) AS layer, path AS label, value FROM complete
    UNION ALL
    SELECT t.run, t.dataset, t.split, t.epoch, t.layer, CAST(t.expert AS VARCHAR), c.value
    FROM top1 t JOIN complete c ON c.run = t.run AND c.dataset = t.dataset AND c.split = t.split
        AND c.epoch = t.epoch AND c.step = t.step AND c.token_idx = t.token_idx
)
SELECT run, dataset, split, epoch, layer, label, value, count(*) AS n
FROM labelled
GROUP BY run, dataset, split, epoch, layer, label, value
ORDER BY run, dataset, split, epoch, layer NULLS FIRST, n DESC, label, value
