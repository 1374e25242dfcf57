"""analysis.bootstrap against a plain numpy loop over the same unit draws (exact), and its coverage on traces whose
true value is known.

The reference reads the run's Parquet files with pyarrow, forms the units (documents or (doc_id, sent_id)
sentences, sorted) with pandas, repeats the draws `rng.integers(0, U, (n, U))` group by group, and recomputes each
replicate's statistic from the raw rows of the drawn units (scipy's entropy, scikit-learn's AMI/NMI/MI).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from scipy.stats import entropy
from sklearn.metrics import adjusted_mutual_info_score, mutual_info_score, normalized_mutual_info_score

from moe_lens import analysis as A
from moe_lens.errors import MoeLensError
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_runs"
RUN = "conll2003-hybrid-seed1"
TOL = dict(rtol=1e-9, atol=1e-9)
E = 8  # num_experts of RUN


def read(run_dir: Path, table: str, split: str = "valid") -> pd.DataFrame:
    d = ds.dataset(run_dir / table, format="parquet", partitioning="hive")
    df = d.to_table().to_pandas()
    for c in ("dataset", "split"):
        df[c] = df[c].astype(str)
    return df[df["split"] == split]


@pytest.fixture(scope="module")
def con():
    return connect(SAMPLE)


def _units(rows: pd.DataFrame, by: str) -> tuple[np.ndarray, list[pd.DataFrame]]:
    unit = list(zip(rows["doc_id"], rows["sent_id"] if by == "sentence" else [-1] * len(rows)))
    parts = {k: g for k, g in rows.groupby(pd.Series(unit, index=rows.index))}
    keys = sorted(parts)
    return keys, [parts[k] for k in keys]


def _reference(rows_by_group: list[pd.DataFrame], by: str, n: int, seed: int, stat) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for rows in rows_by_group:
        _, parts = _units(rows, by)
        idx = rng.integers(0, len(parts), size=(n, len(parts)))
        reps = [stat(pd.concat([parts[i] for i in draw])) for draw in idx]
        out.append({m: np.nanquantile([r[m] for r in reps], [0.025, 0.975]) for m in reps[0]})
    return out


@pytest.mark.parametrize("by", ["document", "sentence"])
def test_collapse_intervals_equal_a_numpy_loop(con, by: str) -> None:
    got = A.bootstrap(A.collapse, con, RUN, by=by, n=40, seed=3, split="valid", fn_options=dict(by="epoch"))
    tok = read(SAMPLE / RUN, "tokens")
    rout = read(SAMPLE / RUN, "routing")
    rows = rout[rout["rank"] == 0].merge(tok[["token_idx", "doc_id", "sent_id"]], on="token_idx")
    rows["epoch"] = rows["epoch"].astype(int)
    groups = [rows[rows["epoch"] == e] for e in sorted(rows["epoch"].unique())]

    def stat(r: pd.DataFrame) -> dict:
        h = entropy(r["expert"].value_counts().to_numpy())
        return {"effective_experts": np.exp(h), "norm_entropy": h / np.log(E)}

    ref = _reference(groups, by, 40, 3, stat)
    got = got.sort_values("epoch").reset_index(drop=True)
    assert len(got) == len(ref) == 3
    for i, r in enumerate(ref):
        for m in r:
            np.testing.assert_allclose([got.at[i, f"{m}_lo"], got.at[i, f"{m}_hi"]], r[m], **TOL)
        assert got.at[i, "effective_experts_lo"] <= got.at[i, "effective_experts"] <= got.at[i, "effective_experts_hi"]
    assert (got["units"] == len(_units(groups[0], by)[0])).all()


def test_specialization_intervals_equal_a_numpy_loop(con) -> None:
    got = A.bootstrap("specialization", con, RUN, by="document", n=30, seed=1, summary=True)
    tok = read(SAMPLE / RUN, "tokens")
    rout = read(SAMPLE / RUN, "routing")
    last = rout["epoch"].astype(int).max()
    rows = rout[(rout["rank"] == 0) & (rout["epoch"].astype(int) == last)].merge(tok, on="token_idx")
    rows = rows[rows["pos_tag"].notna() & rows["in_vocab"]]

    def stat(r: pd.DataFrame) -> dict:
        return {"mi": mutual_info_score(r["pos_tag"], r["expert"]),
                "nmi": normalized_mutual_info_score(r["pos_tag"], r["expert"]),
                "ami": adjusted_mutual_info_score(r["pos_tag"], r["expert"])}

    (ref,) = _reference([rows], "document", 30, 1, stat)
    for m in ref:
        np.testing.assert_allclose([got.at[0, f"{m}_lo"], got.at[0, f"{m}_hi"]], ref[m], **TOL)


@pytest.mark.parametrize("run", ["wikitext2-load", "squad-load"])
def test_specialization_intervals_with_repeated_draws(con, run: str) -> None:
    """Few units (WikiText-2's 5 valid documents, SQuAD's 1) repeat draws, each distinct draw computed once
    (bootstrap.intervals): still every replicate's sklearn scores, and a point interval for one unit."""
    got = A.bootstrap("specialization", con, run, by="document", n=40, seed=2, summary=True)
    got = got[got["dataset"] == run.split("-")[0]].reset_index(drop=True)
    dataset = run.split("-")[0]  # WikiText-2 runs also record CoNLL replays: the run's own dataset's group
    tok = read(SAMPLE / run, "tokens").query("dataset == @dataset").drop(columns=["dataset", "split"])
    rout = read(SAMPLE / run, "routing").query("dataset == @dataset")
    last = rout["epoch"].astype(int).max()
    rows = rout[(rout["rank"] == 0) & (rout["epoch"].astype(int) == last)].merge(tok, on="token_idx")
    rows = rows[rows["pos_tag"].notna() & rows["in_vocab"]]
    units = len(_units(rows, "document")[0])
    draws = np.random.default_rng(2).integers(0, units, size=(40, units))
    assert len(np.unique(np.sort(draws, 1), axis=0)) < 40  # repeated multisets: the dedup path runs

    def stat(r: pd.DataFrame) -> dict:
        return {"mi": mutual_info_score(r["pos_tag"], r["expert"]),
                "nmi": normalized_mutual_info_score(r["pos_tag"], r["expert"]),
                "ami": adjusted_mutual_info_score(r["pos_tag"], r["expert"])}

    (ref,) = _reference([rows], "document", 40, 2, stat)
    assert len(got) == 1 and got.at[0, "units"] == units
    for m in ref:
        np.testing.assert_allclose([got.at[0, f"{m}_lo"], got.at[0, f"{m}_hi"]], ref[m], **TOL)
    if units == 1:
        for m in ref:
            assert got.at[0, f"{m}_lo"] == got.at[0, f"{m}_hi"]


def test_batched_scores_equal_one_table_at_a_time() -> None:
    """information.scores_batch (bootstrap's replicates at once) equals information.scores table by table (1e-12),
    edge cases included (empty, one cell, one row, one column, non-integer counts), and AMI equals sklearn's."""
    from moe_lens import information
    rng = np.random.default_rng(0)
    batches = [rng.poisson(lam, size=(reps, v, e)).astype(np.float64)
               for lam, reps, v, e in [(0.3, 20, 6, 4), (3, 30, 12, 8), (40, 10, 5, 3), (400, 5, 9, 8), (2, 8, 1, 5),
                                       (2, 8, 5, 1)]]  # fmt: skip
    batches.append(np.array([[[5.0, 0], [0, 0]], [[0, 0], [0, 0]], [[1, 0], [0, 0]], [[0, 3], [0, 4]], [[3, 4], [0, 0]]]))
    batches.append(rng.random((4, 3, 3)) * 5)
    for tables in batches:
        got = information.scores_batch(tables)
        for b, table in enumerate(tables):
            want = information.scores(table)
            for f in want._fields:
                np.testing.assert_allclose(got[f][b], getattr(want, f), rtol=1e-12, atol=1e-12, err_msg=f)
    tables = batches[1][:8].astype(np.int64)
    got = information.scores_batch(tables)
    for b, table in enumerate(tables):
        v, e = np.nonzero(table)
        labels_v, labels_e = np.repeat(v, table[v, e]), np.repeat(e, table[v, e])
        assert abs(got["ami"][b] - adjusted_mutual_info_score(labels_v, labels_e)) < 1e-9


def test_bad_arguments_are_one_line_errors(con) -> None:
    with pytest.raises(MoeLensError, match="by='word'; allowed: document, sentence"):
        A.bootstrap(A.collapse, con, RUN, by="word")
    with pytest.raises(MoeLensError, match="'load_balance' has no resampler; bootstrappable: collapse"):
        A.bootstrap(A.load_balance, con, RUN)


def test_coverage_on_traces_with_a_known_value(tmp_path: Path) -> None:
    """Top-1 experts drawn i.i.d. from p: exp(H(p)) is the true effective number; over 20 traces the 95%
    intervals (documents resampled) cover it in >= 16 of 20 (the count is Binomial(20, ~0.95) up to the plug-in bias)."""
    p = np.array([0.4, 0.3, 0.2, 0.1])
    truth = np.exp(entropy(p))
    covered = 0
    rng = np.random.default_rng(0)
    for i in range(20):
        run = write_synthetic_run(tmp_path, f"r{i}", num_tokens=2500, num_experts=4, top_k=1, epochs=1,
                                  splits=("valid",), seed=i)
        for part in (run / "routing").rglob("*.parquet"):
            t = pq.read_table(part).to_pandas()
            t["expert"] = rng.choice(4, size=len(t), p=p).astype(t["expert"].dtype)
            pq.write_table(pa_table(t), part)
    con = connect(tmp_path)
    got = A.bootstrap(A.collapse, con, None, by="document", n=200, seed=0, split="valid", fn_options=dict(by="epoch"))
    covered = int(((got["effective_experts_lo"] <= truth) & (truth <= got["effective_experts_hi"])).sum())
    assert len(got) == 20 and covered >= 16, covered
    assert (got["effective_experts_hi"] - got["effective_experts_lo"]).between(0.01, 0.5).all()


def pa_table(df: pd.DataFrame):
    import pyarrow as pa
    return pa.Table.from_pandas(df, preserve_index=False)
