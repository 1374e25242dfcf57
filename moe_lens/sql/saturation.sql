-- Router saturation (Muennighoff et al. 2024, OLMoE, section 5): each earlier recorded epoch's routing against the
-- final epoch's on the same tokens, per (run, dataset) of $run_datasets ('run|dataset'), one split (valid: every
-- token is routed once per epoch), $layer or each layer. $final_keys ('run|dataset|epoch') names each pair's final
-- epoch. A token's set S = its experts of every rank (bit i of a HUGEINT: num_experts <= 127, checked in Python),
-- its top-1 = rank 0. Rows (run, dataset, split, epoch, final_epoch, layer, unit_doc, unit_sent, expert, a, b, c,
-- d, match, inter, kf) per resampling unit (analysis/units.py), over the tokens routed in both epochs:
--   a_i, b_i = tokens whose top-1 is i in the epoch / in the final epoch; c_i, d_i = tokens with i in S / in S_final
--   match_i, inter_i, kf_i = over the tokens whose final top-1 is i: top-1 equal, |S & S_final|, |S_final|
-- numpy: top1_match = sum match / T, topk_overlap = sum |S & S_final| / sum |S_final| (|∩|/k for a fixed k),
-- chance: sum a_i b_i / T^2 and sum c_i d_i / (T sum |S_final|), their expectations were the two epochs' routings
-- independent with these frequencies (T = sum b, tokens compared).
WITH occ AS (
    SELECT hash(run, dataset) AS part, epoch, layer, token_idx, max(CASE WHEN rank = 0 THEN expert END) AS e0,
           bit_or(CAST(1 AS HUGEINT) << expert) AS s
    FROM routing
    WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
      AND ($layer IS NULL OR layer = $layer)
    GROUP BY part, epoch, layer, token_idx
),
finals AS (  -- the final epoch of each (run, dataset), its name and number of experts
    SELECT DISTINCT hash(r.run, r.dataset) AS part, r.run, r.dataset, r.epoch AS final_epoch,
           greatest(coalesce(c.num_experts, 1), 1) AS num_experts
    FROM (SELECT DISTINCT run, dataset, epoch FROM routing
          WHERE list_contains($runs, run) AND list_contains($final_keys, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
            AND split = $split) r
    LEFT JOIN runs c ON c.run = r.run
),
tok AS (
    SELECT hash(run, dataset) AS part, token_idx, doc_id, sent_id FROM tokens WHERE list_contains($runs, run) AND split = $split
),
agg AS (  -- pairs (token at epoch, token at the final epoch) counted per distinct (top-1s, sets, unit)
    SELECT o.part, o.epoch, o.layer, CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
           CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent,
           o.e0 AS oe, f.e0 AS fe, o.s AS os, f.s AS fs, count(*) AS n
    FROM occ o
    JOIN finals x ON x.part = o.part AND o.epoch < x.final_epoch
    JOIN occ f ON f.part = o.part AND f.epoch = x.final_epoch AND f.layer = o.layer AND f.token_idx = o.token_idx
    JOIN tok t ON t.part = o.part AND t.token_idx = o.token_idx
    WHERE o.e0 IS NOT NULL AND f.e0 IS NOT NULL
    GROUP BY ALL
),
cells AS (
    SELECT g.part, g.epoch, g.layer, g.unit_doc, g.unit_sent, CAST(i AS SMALLINT) AS expert,
           sum(CASE WHEN g.oe = i THEN g.n ELSE 0 END) AS a, sum(CASE WHEN g.fe = i THEN g.n ELSE 0 END) AS b,
           sum(CAST((g.os >> i) & 1 AS BIGINT) * g.n) AS c, sum(CAST((g.fs >> i) & 1 AS BIGINT) * g.n) AS d,
           sum(CASE WHEN g.fe = i AND g.oe = g.fe THEN g.n ELSE 0 END) AS match,
           sum(CASE WHEN g.fe = i THEN bit_count(g.os & g.fs) * g.n ELSE 0 END) AS inter,
           sum(CASE WHEN g.fe = i THEN bit_count(g.fs) * g.n ELSE 0 END) AS kf
    FROM agg g JOIN (SELECT part, unnest(range(num_experts)) AS i FROM finals) e ON e.part = g.part
    GROUP BY ALL
)
SELECT x.run, x.dataset, $split AS split, c.epoch, x.final_epoch, c.layer, c.unit_doc, c.unit_sent, c.expert,
       c.a, c.b, c.c, c.d, c.match, c.inter, c.kf
FROM cells c JOIN finals x ON x.part = c.part
