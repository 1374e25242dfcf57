-- Balance of one group g = (run, dataset, split, epoch, step, layer) over its num_experts experts x_1..x_e
-- (x = tokens or importance), from per_expert (load_balance.sql):
--   cv2_load       = Var_pop(tokens) / mean(tokens)^2          (Shazeer et al. 2017: CV^2 of load)
--   cv2_importance = Var_pop(importance) / mean(importance)^2
--   max_over_mean  = max_e tokens_e / mean(tokens)
--   gini           = 2 * sum_i i * x_(i) / (e * sum_i x_i) - (e + 1) / e, x_(1) <= ... <= x_(e) the sorted tokens
WITH ranked AS (
    SELECT *, row_number() OVER (PARTITION BY run, dataset, split, epoch, step, layer ORDER BY tokens, expert) AS i
    FROM per_expert
)
SELECT run, dataset, split, epoch, step, layer, any_value(num_experts) AS num_experts, CAST(sum(tokens) AS BIGINT) AS tokens,
       var_pop(tokens) / (avg(tokens) * avg(tokens)) AS cv2_load,
       var_pop(importance) / (avg(importance) * avg(importance)) AS cv2_importance,
       max(tokens) / avg(tokens) AS max_over_mean,
       2.0 * sum(i * tokens) / (count(*) * sum(tokens)) - (count(*) + 1.0) / count(*) AS gini
FROM ranked
GROUP BY run, dataset, split, epoch, step, layer
ORDER BY run, dataset, split, layer, step
