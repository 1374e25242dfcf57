"""Per-unit sufficient statistics: the shared form of the analyses that `analysis.bootstrap` resamples.

A bootstrappable analysis runs ONE SQL aggregation whose rows are (group keys..., unit columns..., cell
columns..., value columns...): the counts of each output group g (one output row of the analysis), split by
resampling unit u (a document or a sentence, `UNIT_BY`) and by cell (an expert, a (value, expert) pair, ...).
`unit_tables` turns that long frame into, per group, a sparse (U_g, C_g) matrix S_g of per-unit counts; the
analysis's numpy `statistic` maps summed counts (n, *cell_shape) to its metrics (n,). The point estimate is the
statistic of the sum over every unit; `bootstrap.py` draws n multisets of units and sums with weights, W @ S_g.

Units come from the `tokens` table (docs/traces.md): by="document" is (dataset, doc_id) -- an article
(WikiText, SQuAD) or a `-DOCSTART-` document (CoNLL) --, by="sentence" is (dataset, doc_id, sent_id) -- a line
(WikiText), a sentence (CoNLL), an example (SQuAD). by=None puts every token in one unit (no resampling).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import sparse

from moe_lens.errors import MoeLensError

UNIT_BY = ("document", "sentence")
UNIT_COLUMNS = ["unit_doc", "unit_sent"]  # what each unit SQL returns (-1 where the level is not used)


class UnitTables(NamedTuple):
    keys: pd.DataFrame                 # (G rows) one per output group, its key columns
    tables: list[sparse.csr_matrix]    # per group (U_g, C_g): counts of unit u in flattened cell c
    shapes: list[tuple[int, ...]]      # per group the cell shape (prod = C_g)
    labels: list[list[np.ndarray]]     # per group, per cell dimension but the last, the labels of its positions
    units: list[pd.DataFrame]          # per group its units (the unit columns), in the row order of tables[g]


def unit_params(by: str | None) -> dict[str, Any]:
    """SQL parameters of the unit columns: $by_unit (false: one unit), $by_sentence."""
    if by is not None and by not in UNIT_BY:
        raise MoeLensError(f"by={by!r}; allowed: {', '.join(UNIT_BY)}")
    return dict(by_unit=by is not None, by_sentence=by == "sentence")


def unit_tables(df: pd.DataFrame, keys: list[str], cells: list[str], values: list[str],
                unit_cols: list[str] = UNIT_COLUMNS) -> UnitTables:
    """Per-group sparse tables from the long SQL frame: rows sorted by unit (then cell labels ascending)."""
    key_rows, tables, shapes, labels, units = [], [], [], [], []
    if df.empty:
        return UnitTables(pd.DataFrame(columns=keys), [], [], [], [])
    for key, grp in df.groupby(keys, sort=True, dropna=False):
        u_codes, u_index = _factorize(grp, unit_cols)
        codes, labs, shape = [], [], []
        for c in cells:
            code, lab = pd.factorize(grp[c], sort=True)
            codes.append(code)
            labs.append(np.asarray(lab))
            shape.append(len(lab))
        shape.append(len(values))
        flat = np.ravel_multi_index(tuple(codes), tuple(shape[:-1])) if cells else np.zeros(len(grp), np.int64)
        cols = (flat[:, None] * len(values) + np.arange(len(values))[None, :]).ravel()  # (rows * values,)
        rows = np.repeat(u_codes, len(values))
        data = grp[values].to_numpy(np.float64).ravel()
        tables.append(sparse.csr_matrix((data, (rows, cols)), shape=(len(u_index), int(np.prod(shape)))))
        shapes.append(tuple(shape))
        labels.append(labs)
        units.append(u_index)
        key_rows.append(key if isinstance(key, tuple) else (key,))
    return UnitTables(pd.DataFrame(key_rows, columns=keys), tables, shapes, labels, units)


def _factorize(grp: pd.DataFrame, cols: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Codes 0..U-1 of the rows' units, the units sorted ascending by their columns."""
    index = grp[cols].drop_duplicates().sort_values(cols).reset_index(drop=True)
    codes = grp.groupby(cols, sort=True).ngroup().to_numpy()
    return codes, index


def summed(t: UnitTables, g: int, weights: np.ndarray | None = None) -> np.ndarray:
    """(n, *shape) sums of group g's unit tables with unit weights (n, U) (default: every unit once, n = 1)."""
    s = t.tables[g]
    w = np.ones((1, s.shape[0])) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.asarray((s.T @ w.T).T).reshape((w.shape[0], *t.shapes[g]))


def point_rows(t: UnitTables, statistic, **extra) -> pd.DataFrame:
    """One row per group: its keys and `statistic(sums (1, *shape), labels, key_row, **extra)` at n = 1."""
    rows = []
    for g, key in enumerate(t.keys.itertuples(index=False)):
        stats = statistic(summed(t, g), t.labels[g], key._asdict(), **extra)
        rows.append({**key._asdict(), **{m: float(np.asarray(v).reshape(-1)[0]) for m, v in stats.items()}})
    return pd.DataFrame(rows)
