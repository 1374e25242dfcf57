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
-- independent with these frequencies (T = sum b, tokens compared: those with a top-1 in both epochs).
-- Speed: no per-epoch aggregate of the trace; the final epoch's tokens (top-1, set as bits, unit) are hashed once
-- and every earlier routing row probes them, counted per (epoch, unit, expert, rank 0?, final top-1, final set).
WITH tok AS (
    SELECT hash(run, dataset) AS part, token_idx, doc_id, sent_id FROM tokens WHERE list_contains($runs, run) AND split = $split
),
finals AS (  -- each (run, dataset): its name, final epoch ($final_epochs[i] for $run_datasets[i]), number of experts
    SELECT DISTINCT hash(t.run, t.dataset) AS part, t.run, t.dataset,
           $final_epochs[list_position($run_datasets, t.run || '|' || t.dataset)] AS final_epoch,
           greatest(coalesce(c.num_experts, 1), 1) AS num_experts
    FROM tokens t LEFT JOIN runs c ON c.run = t.run
    WHERE list_contains($runs, t.run) AND t.split = $split AND list_contains($run_datasets, t.run || '|' || t.dataset)
),
fin AS (  -- the final epoch per token: top-1 fe, set fs (bits), resampling unit
    SELECT f.part, f.layer, f.token_idx, f.fe, f.fs, CASE WHEN $by_unit THEN t.doc_id ELSE -1 END AS unit_doc,
           CASE WHEN $by_sentence THEN t.sent_id ELSE -1 END AS unit_sent
    FROM (SELECT hash(run, dataset) AS part, layer, token_idx, max(CASE WHEN rank = 0 THEN expert END) AS fe,
                 bit_or(CAST(1 AS HUGEINT) << expert) AS fs
          FROM routing
          WHERE list_contains($runs, run) AND split = $split AND ($layer IS NULL OR layer = $layer)
            AND list_contains($final_keys, run || '|' || dataset || '|' || CAST(epoch AS VARCHAR))
          GROUP BY part, layer, token_idx) f
    JOIN tok t ON t.part = f.part AND t.token_idx = f.token_idx
    WHERE f.fe IS NOT NULL
),
agg AS (  -- earlier epochs' routing rows of those tokens, counted per (epoch, unit, expert, rank 0?, fe, fs)
    SELECT r.part, r.epoch, r.layer, f.unit_doc, f.unit_sent, r.expert, r.top, f.fe, f.fs, count(*) AS n
    FROM (SELECT hash(run, dataset) AS part, epoch, layer, token_idx, expert, rank = 0 AS top FROM routing
          WHERE list_contains($runs, run) AND list_contains($run_datasets, run || '|' || dataset) AND split = $split
            AND ($layer IS NULL OR layer = $layer)
            AND epoch < $final_epochs[list_position($run_datasets, run || '|' || dataset)]) r
    JOIN fin f ON f.part = r.part AND f.layer = r.layer AND f.token_idx = r.token_idx
    GROUP BY ALL
),
cells AS (
    SELECT g.part, g.epoch, g.layer, g.unit_doc, g.unit_sent, CAST(e.i AS SMALLINT) AS expert,
           sum(CASE WHEN g.top AND g.expert = e.i THEN g.n ELSE 0 END) AS a,
           sum(CASE WHEN g.top AND g.fe = e.i THEN g.n ELSE 0 END) AS b,
           sum(CASE WHEN g.expert = e.i THEN g.n ELSE 0 END) AS c,
           sum(CASE WHEN g.top AND ((g.fs >> e.i) & 1) = 1 THEN g.n ELSE 0 END) AS d,
           sum(CASE WHEN g.top AND g.fe = e.i AND g.expert = g.fe THEN g.n ELSE 0 END) AS match,
           sum(CASE WHEN g.fe = e.i AND ((g.fs >> g.expert) & 1) = 1 THEN g.n ELSE 0 END) AS inter,
           sum(CASE WHEN g.top AND g.fe = e.i THEN bit_count(g.fs) * g.n ELSE 0 END) AS kf
    FROM agg g JOIN (SELECT part, unnest(range(num_experts)) AS i FROM finals) e ON e.part = g.part
    GROUP BY ALL
)
SELECT x.run, x.dataset, $split AS split, c.epoch, x.final_epoch, c.layer, c.unit_doc, c.unit_sent, c.expert,
       c.a, c.b, c.c, c.d, c.match, c.inter, c.kf
FROM cells c JOIN finals x ON x.part = c.part
WHERE c.b > 0 OR c.a > 0 OR c.c > 0 OR c.d > 0
