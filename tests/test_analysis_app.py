"""The analysis functions the app calls (contexts, metric_curves, specialization(shuffled=False)) against
independent pandas computations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from moe_lens import analysis as A
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run


def load(root: Path, table: str) -> pd.DataFrame:
    return ds.dataset(root / table, format="parquet", partitioning="hive").to_table().to_pandas()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("app_runs")
    write_synthetic_run(d, "a", num_tokens=600, epochs=2, vocab_size=40, seed=1)
    write_synthetic_run(d, "b", num_tokens=300, epochs=1, vocab_size=40, top_k=1, seed=2)
    return d


@pytest.mark.parametrize("n,width", [(5, 8), (2, 0), (50, 3)])
def test_contexts_matches_pandas(runs: Path, n: int, width: int) -> None:
    con = connect(runs)
    tok = load(runs / "a", "tokens")
    tok = tok[tok["split"] == "valid"].sort_values("token_idx")
    r = load(runs / "a", "routing")
    r = r[(r["split"] == "valid") & (r["epoch"] == r[r["split"] == "valid"]["epoch"].max()) & (r["layer"] == 0)
          & (r["rank"] == 0)]
    top1 = r.set_index("token_idx")["expert"]
    for token in tok["token"].value_counts().index[:3]:
        for expert in sorted(r["expert"].unique())[:3]:
            got = A.contexts(con, "a", split="valid", layer=0, expert=int(expert), token=token, n=n, width=width)
            idx = tok[(tok["token"] == token) & tok["token_idx"].map(top1).eq(expert)]["token_idx"].sort_values()
            hits = idx.to_numpy()[:n]
            rows = [(h, t, w) for h in hits for t, w in zip(tok["token_idx"], tok["token"]) if abs(t - h) <= width]
            want = pd.DataFrame(rows, columns=["hit", "token_idx", "token"])
            assert list(got.columns) == ["hit", "token_idx", "token"]
            assert got.values.tolist() == want.values.tolist()


def test_metric_curves_matches_pandas(runs: Path) -> None:
    con = connect(runs)
    m = pd.concat([pd.read_parquet(runs / r / "metrics.parquet").assign(run=r) for r in ("a", "b")])
    m = m[m["layer"].isna() & m["expert"].isna()]
    for names, chosen in ((None, ["a", "b"]), (["loss", "ppl"], ["b"]), (["nope"], ["a"])):
        got = A.metric_curves(con, chosen, names=names)
        want = m[m["run"].isin(chosen) & (m["name"].isin(names) if names else True)]
        want = want.sort_values(["run", "split", "name", "step"])[["run", "split", "name", "step", "epoch", "value"]]
        assert list(got.columns) == list(want.columns) and len(got) == len(want)
        assert got[["run", "split", "name"]].values.tolist() == want[["run", "split", "name"]].values.tolist()
        np.testing.assert_array_equal(got["step"], want["step"])
        np.testing.assert_allclose(got["value"], want["value"], rtol=1e-12)


@pytest.mark.parametrize("attribute,all_ranks", [("pos_tag", False), ("token", True), ("freq_band", False)])
def test_specialization_without_shuffle_is_the_same_table(runs: Path, attribute: str, all_ranks: bool) -> None:
    con = connect(runs)
    kw = dict(attribute=attribute, all_ranks=all_ranks)
    full = A.specialization(con, **kw)
    fast = A.specialization(con, shuffled=False, **kw)
    assert fast["nmi_shuffled"].isna().all() and full["nmi_shuffled"].notna().all()
    cols = [c for c in full.columns if c != "nmi_shuffled"]
    pd.testing.assert_frame_equal(fast[cols], full[cols], rtol=1e-12)
    top = A.specialization(con, "a", attribute="token", top=3, order_by="lift", min_count=4, shuffled=False)
    want = A.specialization(con, "a", attribute="token", top=3, order_by="lift", min_count=4)
    pd.testing.assert_frame_equal(top[cols], want[cols], rtol=1e-12)
