-- Per-unit sums of the ablation table (`moe-lens ablate`, moe_lens/ablate.py) for each group g = (run, dataset,
-- split, epoch, layer, expert): n tokens, delta_sum = sum of delta_loss (the loss with the expert removed minus
-- the unablated loss, nats), n_chose and delta_chose over the tokens whose unablated routing chose the expert,
-- n_up = tokens whose loss rose. Split by the document (unit_doc = doc_id) or, with $by_sentence, the sentence
-- (unit_sent = sent_id) of the token in `tokens`; -1 where a level is not used ($by_unit false: one unit).
-- mean_delta = sum delta_sum / sum n is computed in numpy (analysis/ablation.py; analysis.bootstrap resamples units).
-- Speed: tokens joined on two integers (hash(run, dataset), token_idx), not on four keys with three strings.
WITH tok AS (
    SELECT hash(run, dataset) AS part, token_idx, doc_id, sent_id FROM tokens
    WHERE list_contains($runs, run) AND split = $split
)
SELECT a.run, a.dataset, a.split, a.epoch, a.layer, a.expert,
       CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
       CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent,
       count(*) AS n, sum(CAST(a.delta_loss AS DOUBLE)) AS delta_sum, count(*) FILTER (WHERE a.chose) AS n_chose,
       coalesce(sum(CAST(a.delta_loss AS DOUBLE)) FILTER (WHERE a.chose), 0) AS delta_chose,
       count(*) FILTER (WHERE a.delta_loss > 0) AS n_up
FROM ablation a JOIN tok t ON t.part = hash(a.run, a.dataset) AND t.token_idx = a.token_idx
WHERE list_contains($runs, a.run) AND a.split = $split AND ($layer IS NULL OR a.layer = $layer)
GROUP BY ALL
