"""App-side queries that no `moe_lens.analysis` function answers yet (parameterised, never formatted):
example contexts of a token routed to an expert. Pages call these functions, never SQL."""
from __future__ import annotations

import duckdb
import pandas as pd

_CONTEXTS_SQL = """
WITH last AS (SELECT max(epoch) AS epoch FROM routing WHERE run = $run AND split = $split),
hits AS (
  SELECT DISTINCT r.dataset, r.token_idx
  FROM routing r JOIN tokens t ON t.run = r.run AND t.dataset = r.dataset AND t.split = r.split
                               AND t.token_idx = r.token_idx
  WHERE r.run = $run AND r.split = $split AND r.epoch = (SELECT epoch FROM last) AND r.layer = $layer
    AND r.rank = 0 AND r.expert = $expert AND t.token = $token
  ORDER BY r.token_idx LIMIT $n)
SELECT h.token_idx AS hit, t.token_idx, t.token
FROM hits h JOIN tokens t ON t.run = $run AND t.dataset = h.dataset AND t.split = $split
     AND t.token_idx BETWEEN h.token_idx - $width AND h.token_idx + $width
ORDER BY hit, t.token_idx
"""


def contexts(con: duckdb.DuckDBPyConnection, run: str, *, split: str, layer: int, expert: int, token: str,
             n: int = 5, width: int = 8) -> pd.DataFrame:
    """Up to `n` occurrences of `token` whose top-1 expert was `expert` in the last recorded epoch, each
    with `width` tokens either side: rows (hit, token_idx, token), hit = the occurrence's token_idx."""
    params = dict(run=run, split=split, layer=layer, expert=expert, token=token, n=n, width=width)
    return con.execute(_CONTEXTS_SQL, params).df()
