-- Stability of top-1 (rank 0) routing of one run on one dataset ($run, $dataset) per (split, layer, epoch);
-- a token is (dataset, token_idx):
--   changed   = share of tokens routed in this epoch and an earlier one whose top-1 expert differs from the
--               token's previous recorded epoch (NULL for the first recorded epoch)
--   same_next = share of adjacent token pairs (token_idx - 1, token_idx) of one sequence (position > 0 in
--               tokens: position restarts at 0 with each sentence/line/segment) with the same top-1 expert
-- No sort of the 10^7-row trace: one hash aggregate packs each token's experts into a HUGEINT, field p
-- ($bits wide) = expert + 1 at the p-th epoch of $epochs (0 = not routed); Python checks $bits * len($epochs) <= 126
-- and max expert first, else it runs stability_sorted.sql (same numbers with lag windows).
-- Tokens routed in every epoch (and their left neighbour) are compared field-parallel (SWAR: a field of
-- xor(a, b) is nonzero iff its high bit is set in (((x & rest) + rest) | x) & high) and counted per distinct
-- bit mask; the other tokens are expanded to one row per epoch. `pairs` is NULL for an epoch whose tokens all
-- start a sequence (as the ANTI JOIN of stability_sorted.sql leaves no row), else a count.
WITH top1 AS (
    SELECT token_idx, list_position($epochs, epoch) - 1 AS p, expert
    FROM routing
    WHERE run = $run AND dataset = $dataset AND split = $split AND layer = $layer AND rank = 0 AND list_contains($epochs, epoch)
),
per_token AS (
    SELECT token_idx, bit_or(CAST(expert + 1 AS HUGEINT) << ($bits * p)) AS h, bit_or(CAST(1 AS BIGINT) << p) AS present
    FROM top1 GROUP BY token_idx
),
starts AS (
    SELECT token_idx FROM tokens WHERE run = $run AND dataset = $dataset AND split = $split AND position = 0
),
c AS (
    SELECT len($epochs) AS n, (CAST(1 AS BIGINT) << len($epochs)) - 1 AS all_epochs,
           CAST(((CAST(1 AS HUGEINT) << ($bits * len($epochs))) - 1) // ((CAST(1 AS HUGEINT) << $bits) - 1) AS HUGEINT) AS low,
           CAST(1 AS HUGEINT) << ($bits - 1) AS top0
),
masks AS (SELECT *, CAST(low * top0 AS HUGEINT) AS high, CAST(low * (top0 - 1) AS HUGEINT) AS rest FROM c),
neighbours AS (
    SELECT t.token_idx, t.h, t.present, CAST(s.token_idx IS NULL AS BIGINT) AS inner_token,
           CASE WHEN lag(t.token_idx) OVER o = t.token_idx - 1 AND s.token_idx IS NULL THEN lag(t.h) OVER o END AS h_left,
           CASE WHEN lag(t.token_idx) OVER o = t.token_idx - 1 AND s.token_idx IS NULL THEN lag(t.present) OVER o END AS present_left
    FROM per_token t LEFT JOIN starts s ON s.token_idx = t.token_idx
    WINDOW o AS (ORDER BY t.token_idx)
),
complete AS (  -- every epoch recorded for the token (and its left neighbour): field-parallel comparisons
    SELECT inner_token, (((d & rest) + rest) | d) & high & ~top0 AS changed_bits,
           CASE WHEN h_left IS NOT NULL THEN high & ~((((l & rest) + rest) | l) & high) END AS same_bits
    FROM (SELECT inner_token, xor(h, h << $bits) AS d, h_left, xor(h, h_left) AS l FROM neighbours, masks
          WHERE present = all_epochs AND coalesce(present_left, all_epochs) = all_epochs), masks
),
complete_counts AS (
    SELECT r.p, sum(CAST(((g.changed_bits >> ($bits * r.p + $bits - 1)) & 1) AS BIGINT) * g.n) AS changed,
           sum(CASE WHEN r.p > 0 THEN g.n ELSE 0 END) AS compared, 0 AS same, 0 AS pairs, sum(g.inner_n) AS inner_rows
    FROM (SELECT changed_bits, count(*) AS n, sum(inner_token) AS inner_n FROM complete GROUP BY ALL) g CROSS JOIN range(len($epochs)) r(p)
    GROUP BY r.p
    UNION ALL
    SELECT r.p, 0, 0, sum(CAST(((g.same_bits >> ($bits * r.p + $bits - 1)) & 1) AS BIGINT) * g.n), sum(g.n), 0
    FROM (SELECT same_bits, count(*) AS n FROM complete WHERE same_bits IS NOT NULL GROUP BY ALL) g CROSS JOIN range(len($epochs)) r(p)
    GROUP BY r.p
),
fields AS (  -- the other tokens, one row per recorded epoch
    SELECT r.p, inner_token, present & ((CAST(1 AS BIGINT) << r.p) - 1) AS before, h,
           CAST((h >> ($bits * r.p)) & ((1 << $bits) - 1) AS INTEGER) AS x,
           CASE WHEN (present_left >> r.p) & 1 = 1 THEN CAST((h_left >> ($bits * r.p)) & ((1 << $bits) - 1) AS INTEGER) END AS x_left
    FROM (SELECT * FROM neighbours, masks WHERE NOT (present = all_epochs AND coalesce(present_left, all_epochs) = all_epochs))
         CROSS JOIN range(len($epochs)) r(p)
    WHERE (present >> r.p) & 1 = 1
),
other_counts AS (
    SELECT p, sum(changed) AS changed, count(changed) AS compared, sum(same) AS same, count(same) AS pairs,
           sum(inner_token) AS inner_rows
    FROM (SELECT p, inner_token, CASE WHEN before > 0 THEN CAST(x <> CAST((h >> ($bits * CAST(floor(log2(before)) AS INTEGER))) & ((1 << $bits) - 1) AS INTEGER) AS BIGINT) END AS changed,
                 CAST(x_left = x AS BIGINT) AS same FROM fields)
    GROUP BY p
),
per_epoch AS (
    SELECT p, CAST(sum(changed) AS BIGINT) AS changed, CAST(sum(compared) AS BIGINT) AS compared,
           CAST(sum(same) AS BIGINT) AS same, CAST(sum(pairs) AS BIGINT) AS pairs, sum(inner_rows) AS inner_rows
    FROM (SELECT * FROM complete_counts UNION ALL SELECT * FROM other_counts) GROUP BY p
)
SELECT $run AS run, $dataset AS dataset, $split AS split, CAST($layer AS SMALLINT) AS layer, $epochs[p + 1] AS epoch,
       CASE WHEN compared > 0 THEN compared END AS tokens_compared,
       CASE WHEN compared > 0 THEN changed / compared END AS changed,
       CASE WHEN inner_rows > 0 THEN pairs END AS pairs, CASE WHEN pairs > 0 THEN same / pairs END AS same_next
FROM per_epoch ORDER BY epoch
