-- The `<unk>` token id of each run of $runs, read from its tokens (any dataset, any split): the id of a literal
-- '<unk>' token, else the one id that carries several surface words (only `<unk>` maps many words to one id; the
-- vocabulary is one-to-one otherwise). Used for traces without `in_vocab` (NULL): such a token is out of the
-- vocabulary iff token_id = this id. A run whose tokens show neither has no row (nothing counts as OOV).
SELECT run, token_id AS unk_id
FROM (SELECT run, token_id, bool_or(token = '<unk>') AS literal, count(DISTINCT token) AS words
      FROM tokens WHERE list_contains($runs, run) GROUP BY run, token_id)
WHERE literal OR words > 1
QUALIFY row_number() OVER (PARTITION BY run ORDER BY literal DESC, words DESC, token_id) = 1  -- ties: deterministic
ORDER BY run
