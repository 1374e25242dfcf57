-- Mean delta_loss of each ablated expert per value of a token attribute ($attribute: 'pos_tag' or 'freq_band'):
-- for each (run, dataset, split, epoch, layer, expert, value) over the ablation table joined with `tokens`,
-- n tokens, mean_delta = avg(delta_loss), n_chose and mean_delta_chose over the tokens whose unablated routing
-- chose the expert (NULL when none did). Values with fewer than $min_tokens tokens are left out.
WITH a AS (
    SELECT a.run, a.dataset, a.split, a.epoch, a.layer, a.expert, a.chose, CAST(a.delta_loss AS DOUBLE) AS delta,
           CASE $attribute WHEN 'pos_tag' THEN t.pos_tag WHEN 'freq_band' THEN t.freq_band END AS value
    FROM ablation a JOIN tokens t ON t.run = a.run AND t.dataset = a.dataset AND t.split = a.split
        AND t.token_idx = a.token_idx
    WHERE list_contains($runs, a.run) AND a.split = $split AND ($layer IS NULL OR a.layer = $layer)
)
SELECT run, dataset, split, epoch, layer, expert, value, count(*) AS n, avg(delta) AS mean_delta,
       count(*) FILTER (WHERE chose) AS n_chose, avg(delta) FILTER (WHERE chose) AS mean_delta_chose
FROM a WHERE value IS NOT NULL
GROUP BY ALL HAVING count(*) >= $min_tokens
ORDER BY run, dataset, layer, expert, value
