-- Per-unit sums of the ablation table per value of a token attribute ($attribute: 'pos_tag' or 'freq_band', the
-- `token_value` macro of moe_lens/store.py): for each group g = (run, dataset, split, epoch, layer, expert, value)
-- over the ablation table joined with `tokens`, n tokens, delta_sum = sum of delta_loss, n_chose and delta_chose
-- over the tokens whose unablated routing chose the expert, n_up = tokens whose loss rose; split by the document
-- (unit_doc = doc_id) or, with $by_sentence, the sentence (unit_sent = sent_id) of the token; -1 where a level is
-- not used ($by_unit false: one unit). Tokens without a value (NULL) are left out. mean_delta = sum delta_sum /
-- sum n, and the min_tokens rule, are applied in numpy (analysis/ablation.py; analysis.bootstrap resamples units).
SELECT a.run, a.dataset, a.split, a.epoch, a.layer, a.expert,
       token_value($attribute, t.pos_tag, t.freq_band, t.dataset, t.ner_tag, t.segment, t.token, t.in_answer,
                   t.position) AS value,
       CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
       CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent,
       count(*) AS n, sum(CAST(a.delta_loss AS DOUBLE)) AS delta_sum, count(*) FILTER (WHERE a.chose) AS n_chose,
       coalesce(sum(CAST(a.delta_loss AS DOUBLE)) FILTER (WHERE a.chose), 0) AS delta_chose,
       count(*) FILTER (WHERE a.delta_loss > 0) AS n_up
FROM ablation a JOIN tokens t ON t.run = a.run AND t.dataset = a.dataset AND t.split = a.split AND t.token_idx = a.token_idx
WHERE list_contains($runs, a.run) AND a.split = $split AND ($layer IS NULL OR a.layer = $layer) AND value IS NOT NULL
GROUP BY ALL
