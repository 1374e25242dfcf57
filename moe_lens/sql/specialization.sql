-- Specialization of experts by a token attribute A (pos_tag, freq_band, dataset, ner_tag, segment, in_answer,
-- position_band, token), over the routing rows of one epoch per run ($run_epochs: 'run|epoch' strings),
-- rank 0 only unless $all_ranks. n_va = rows with attribute value v sent to expert e, N = sum n_ve:
--   p_expert_given_value = n_ve / n_v,   p_expert = n_e / N,   lift = p(e | v) / p(e)
--   mi   = I(E; A) = sum_{v,e} n_ve/N ln(n_ve N / (n_v n_e)),   h_expert = H(E) = -sum_e p(e) ln p(e)
--   nmi  = I(E; A) / H(E)
--   nmi_shuffled = the same with A permuted over the split's tokens (token t takes the value of token
--                  (t * 1000000007 + $seed) mod N, a bijection since the prime 1000000007 > N): chance level
--                  on these very routing counts
--   nmi_chance   = (|A| - 1)(|E| - 1) / (2N) / H(E), the expected bias of the plug-in MI under independence
--                  (Miller 1955), |A|, |E| the observed numbers of values and experts
-- Rows whose value (or shuffled value) is NULL, e.g. ner_tag outside CoNLL, are left out of the (shuffled) counts.
-- $shuffled = false skips the permuted lookup (nmi_shuffled NULL), about half of the work.
-- Speed (10^7 tokens): the joins are on (part, token_idx) with part = hash(run, dataset), two integers, not on the
-- strings run, dataset, split (split is one value here); tokens are hashed once into one table that is probed by
-- each routing row twice (its token and its permuted source, UNION-free: a cross join with (false), (true)), and
-- the counts are grouped by integer keys before run names come back. `sizes` fails loudly should two
-- (run, dataset) pairs ever share a 64-bit hash. Routing rows outside 0..N-1 are left out of both counts, as the
-- inner joins did; token_idx is 0..N-1 by the trace contract (docs/traces.md), which the permutation relies on.
WITH tok AS (
    SELECT hash(run, dataset) AS part, token_idx,
           CASE $attribute
               WHEN 'pos_tag' THEN pos_tag WHEN 'freq_band' THEN freq_band WHEN 'dataset' THEN dataset
               WHEN 'ner_tag' THEN ner_tag WHEN 'segment' THEN segment WHEN 'token' THEN token
               WHEN 'in_answer' THEN CAST(in_answer AS VARCHAR)
               WHEN 'position_band' THEN CASE WHEN position = 0 THEN '0' WHEN position < 5 THEN '1-4'
                   WHEN position < 10 THEN '5-9' WHEN position < 20 THEN '10-19' WHEN position < 50 THEN '20-49'
                   WHEN position >= 50 THEN '50+' END
           END AS value
    FROM tokens
    WHERE list_contains($runs, run) AND split = $split
),
sizes AS (  -- one row per (run, dataset) of the split: N = max(token_idx) + 1
    SELECT part, any_value(run) AS run, max(token_idx) + 1 AS num_tokens,
           CASE WHEN count(DISTINCT run || '|' || dataset) > 1
                THEN error('specialization: two (run, dataset) pairs share a hash; please report') END AS collision
    FROM (SELECT hash(run, dataset) AS part, run, dataset, token_idx FROM tokens
          WHERE list_contains($runs, run) AND split = $split)
    GROUP BY part
),
keyed AS (  -- each routing row twice: keyed by its token, and by the token whose value it takes when shuffled
    SELECT s.part, r.layer, r.expert, v.is_shuffled,
           CASE WHEN v.is_shuffled THEN (r.token_idx * 1000000007 + $seed) % s.num_tokens ELSE r.token_idx END AS key
    FROM routing r JOIN sizes s ON s.part = hash(r.run, r.dataset) AND s.collision IS NULL
    CROSS JOIN (VALUES (false), (true)) AS v(is_shuffled)
    WHERE list_contains($run_epochs, r.run || '|' || CAST(r.epoch AS VARCHAR)) AND r.split = $split
      AND r.layer = $layer AND ($all_ranks OR r.rank = 0) AND ($shuffled OR NOT v.is_shuffled)
      AND r.token_idx >= 0 AND r.token_idx < s.num_tokens
),
part_counts AS (
    SELECT k.part, k.layer, k.expert, k.is_shuffled, t.value, count(*) AS n
    FROM keyed k JOIN tok t ON t.part = k.part AND t.token_idx = k.key
    WHERE t.value IS NOT NULL
    GROUP BY k.part, k.layer, k.expert, k.is_shuffled, t.value
),
clean AS (
    SELECT s.run, c.layer, c.expert, c.value, c.is_shuffled, CAST(sum(c.n) AS BIGINT) AS n
    FROM part_counts c JOIN sizes s ON s.part = c.part
    GROUP BY s.run, c.layer, c.expert, c.value, c.is_shuffled
),
joint AS (
    SELECT run, layer, expert, value, is_shuffled, n,
           sum(n) OVER (PARTITION BY run, layer, is_shuffled) AS total,
           sum(n) OVER (PARTITION BY run, layer, is_shuffled, value) AS n_value,
           sum(n) OVER (PARTITION BY run, layer, is_shuffled, expert) AS n_expert
    FROM clean
),
info AS (
    SELECT run, layer, is_shuffled, any_value(total) AS total,
           sum(n / total * ln(CAST(n AS DOUBLE) * total / (CAST(n_value AS DOUBLE) * n_expert))) AS mi,
           count(DISTINCT value) AS num_values, count(DISTINCT expert) AS num_used
    FROM joint GROUP BY run, layer, is_shuffled
),
h AS (
    SELECT run, layer, 0.0 - sum(p * ln(p)) AS h_expert
    FROM (SELECT DISTINCT run, layer, expert, n_expert / total AS p FROM joint WHERE NOT is_shuffled)
    GROUP BY run, layer
),
summary AS (
    SELECT i.run, i.layer, CAST(i.total AS BIGINT) AS rows, i.num_values, h.h_expert, i.mi,
           CASE WHEN h.h_expert > 0 THEN i.mi / h.h_expert END AS nmi,
           CASE WHEN h.h_expert > 0 THEN s.mi / h.h_expert END AS nmi_shuffled,
           CASE WHEN h.h_expert > 0 THEN (i.num_values - 1) * (i.num_used - 1) / (2.0 * i.total) / h.h_expert END AS nmi_chance
    FROM info i LEFT JOIN info s ON s.run = i.run AND s.layer = i.layer AND s.is_shuffled
    JOIN h ON h.run = i.run AND h.layer = i.layer
    WHERE NOT i.is_shuffled
)
SELECT j.run, j.layer, j.value, j.expert, j.n, CAST(j.n_value AS BIGINT) AS n_value,
       j.n / j.n_value AS p_expert_given_value, j.n_expert / j.total AS p_expert,
       (j.n / j.n_value) / (j.n_expert / j.total) AS lift,
       s.rows, s.num_values, s.h_expert, s.mi, s.nmi, s.nmi_shuffled, s.nmi_chance
FROM joint j JOIN summary s ON s.run = j.run AND s.layer = j.layer
WHERE NOT j.is_shuffled
QUALIFY $top IS NULL OR (j.n_value >= $min_count AND row_number() OVER (
    PARTITION BY j.run, j.layer, j.expert, j.n_value >= $min_count
    ORDER BY CASE WHEN $by_lift THEN (j.n / j.n_value) / (j.n_expert / j.total) ELSE j.n END DESC, j.value) <= $top)
ORDER BY j.run, j.layer, j.expert, j.n DESC, j.value
