"""The analyses on traces shaped like real ones (tests/real_shapes.py), against pandas, numpy, scipy and scikit-learn.

Issue 18: a probe dataset in the same split must never be pooled with the run's own (item 1); the shuffled NMI
must permute within the routed tokens of sparse train traces (2); nmi/ami are scikit-learn's, I/H(E) is
`uncertainty_coef` (4); dead experts count all k assignments (5); capacity defaults to train (6); the chance
level is the exact expected NMI under permutation (8); OOV tokens leave specialization (10); matched agreement
is the optimum (scipy).
"""
from __future__ import annotations

import builtins
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_mutual_info_score, mutual_info_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix, expected_mutual_information

from moe_lens import analysis as A
from moe_lens.store import connect
from real_shapes import E, EPOCHS, UNK_ID, write_shapes

TOL = dict(rtol=1e-9, atol=1e-12)
SAMPLE = Path(__file__).resolve().parents[1] / "sample_runs"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory):
    s = write_shapes(tmp_path_factory.mktemp("real_shapes"))
    return s, connect(s.root)


def _rows(s, run: str, split: str, dataset: str, layer: int = 0) -> pd.DataFrame:
    r = s.routing
    return r[(r["run"] == run) & (r["split"] == split) & (r["dataset"] == dataset) & (r["layer"] == layer)]


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _pick(df: pd.DataFrame, dataset: str, epoch: int | None = None) -> pd.DataFrame:
    """The rows of one dataset (all rows where the frame has no dataset column: the old, pooled frames)."""
    mask = (df["dataset"] == dataset) if "dataset" in df else np.ones(len(df), bool)
    return df[mask & ((df["epoch"] == epoch) if epoch is not None else True)]


DATASET_CHOICES = [None, "conll2003", "*"]  # default (the run's own), a probe, each on its own rows


@pytest.mark.parametrize("choice", range(len(DATASET_CHOICES)))
def test_no_analysis_pools_datasets(shapes, choice: int) -> None:
    s, con = shapes
    dataset = DATASET_CHOICES[choice]
    expected = {None: ["wikitext2"], "conll2003": ["conll2003"], "*": ["conll2003", "wikitext2"]}[dataset]
    kw = dict(layer=0) if dataset is None else dict(dataset=dataset, layer=0)  # the default, on the layer checked
    lb = A.load_balance(con, "a", **kw)
    col = A.collapse(con, "a", split="valid", by="epoch", **kw)
    conf = A.router_confidence(con, "a", **kw)
    cap = A.capacity(con, "a", split="train", **kw)
    spec = A.specialization(con, "a", summary=True, **kw)
    for ds in expected:
        v = _rows(s, "a", "valid", ds)
        t = _rows(s, "a", "train", ds)
        for epoch in range(EPOCHS):
            ve = v[v["epoch"] == epoch]
            n = np.bincount(ve["expert"], minlength=E).astype(float)  # all ranks: load_balance's default
            got = _pick(lb, ds, epoch)
            np.testing.assert_allclose(got["cv2_load"], n.var() / n.mean() ** 2, **TOL)
            top = ve[ve["rank"] == 0]
            p = np.bincount(top["expert"], minlength=E) / len(top)
            got = _pick(col, ds, epoch)
            np.testing.assert_allclose(got["effective_experts"], np.exp(_entropy(p)), **TOL)
            got = _pick(conf, ds, epoch)
            np.testing.assert_allclose(got["top1_gate"], top["gate"].astype(float).mean(), **TOL)
            te = t[t["epoch"] == epoch]
            got = _pick(cap, ds, epoch)
            np.testing.assert_allclose(got["dropped_rate"], te["dropped"].mean(), **TOL)
        last = v[(v["epoch"] == EPOCHS - 1) & (v["rank"] == 0)]
        tok = s.tokens[(s.tokens["run"] == "a") & (s.tokens["dataset"] == ds) & (s.tokens["split"] == "valid")]
        tok = tok.set_index("token_idx")
        keep = tok.loc[last["token_idx"], "in_vocab"].to_numpy()
        labels = tok.loc[last["token_idx"], "pos_tag"].to_numpy()[keep]
        got = _pick(spec, ds)
        np.testing.assert_allclose(got["mi"], mutual_info_score(labels, last["expert"].to_numpy()[keep]), **TOL)
    for df in (lb, col, conf, cap, spec):
        assert sorted(df["dataset"].unique()) == expected


def test_stability_keys_on_dataset_and_token(shapes) -> None:
    """Changed = top-1 differs from the token's previous recorded epoch, a token being (dataset, token_idx);
    on sparse train traces only tokens recorded in both epochs are compared."""
    s, con = shapes
    got = A.stability(con, "a", split="train", dataset="*", layer=0)
    for ds in ("wikitext2", "conll2003"):
        t = _rows(s, "a", "train", ds)
        t = t[t["rank"] == 0].pivot_table(index="token_idx", columns="epoch", values="expert")
        both = t.dropna()
        row = got[(got["dataset"] == ds) & (got["epoch"] == 1)]
        assert int(row["tokens_compared"].iloc[0]) == len(both)
        np.testing.assert_allclose(row["changed"], (both[0] != both[1]).mean(), **TOL)
    own = A.stability(con, "a", split="train", layer=0)
    assert own["dataset"].unique().tolist() == ["wikitext2"]
    pd.testing.assert_frame_equal(own.reset_index(drop=True),
                                  got[got["dataset"] == "wikitext2"].reset_index(drop=True))


def test_agreement_and_contexts_stay_in_one_dataset(shapes) -> None:
    s, con = shapes
    for dataset in (None, "conll2003"):
        ds = dataset or "wikitext2"
        a = _rows(s, "a", "valid", ds)
        b = _rows(s, "b", "valid", ds)
        a, b = (x[(x["rank"] == 0) & (x["epoch"] == EPOCHS - 1)].set_index("token_idx")["expert"] for x in (a, b))
        got = A.agreement(con, "a", "b", dataset=dataset, layer=0).iloc[0]
        assert got["dataset"] == ds and got["tokens"] == len(a)
        np.testing.assert_allclose(got["agreement"], (a == b.loc[a.index]).mean(), **TOL)
    tok = s.tokens[(s.tokens["run"] == "a") & (s.tokens["split"] == "valid")]
    for dataset, prefix in ((None, "w"), ("conll2003", "c")):
        word = tok[tok["dataset"] == (dataset or "wikitext2")]["token"].value_counts().index[0]
        r = _rows(s, "a", "valid", dataset or "wikitext2")
        r = r[(r["rank"] == 0) & (r["epoch"] == EPOCHS - 1)]
        expert = int(r[r["token_idx"].isin(tok[(tok["dataset"] == (dataset or "wikitext2"))
                                               & (tok["token"] == word)]["token_idx"])]["expert"].iloc[0])
        ctx = A.contexts(con, "a", split="valid", layer=0, expert=expert, token=word, dataset=dataset)
        assert len(ctx) and ctx["token"].str.startswith(prefix).all()  # neighbours from the same dataset only
        assert ctx.groupby("hit").size().max() <= 17  # one window per hit, never doubled by the other dataset


@pytest.mark.parametrize("seed", [0, 7])
def test_shuffled_nmi_permutes_the_routed_tokens_of_sparse_train(shapes, seed: int) -> None:
    """The i-th routed (analysed) token in token_idx order takes the value of token (i * 1000000007 + seed) mod m."""
    s, con = shapes
    got = A.specialization(con, "a", split="train", dataset="*", seed=seed, layer=2, summary=True)
    for ds in ("wikitext2", "conll2003"):
        r = _rows(s, "a", "train", ds, layer=2)
        r = r[(r["rank"] == 0) & (r["epoch"] == EPOCHS - 1)]
        tok = s.tokens[(s.tokens["run"] == "a") & (s.tokens["dataset"] == ds) & (s.tokens["split"] == "train")]
        tok = tok.set_index("token_idx")
        r = r[tok.loc[r["token_idx"], "in_vocab"].to_numpy()]
        kept = np.sort(r["token_idx"].unique())
        source = kept[(np.arange(len(kept)) * 1000000007 + seed) % len(kept)]
        shuffled = pd.Series(tok.loc[source, "pos_tag"].to_numpy(), index=kept)
        want = normalized_mutual_info_score(shuffled[r["token_idx"]].to_numpy(), r["expert"].to_numpy())
        row = got[got["dataset"] == ds].iloc[0]
        np.testing.assert_allclose(row["nmi_shuffled"], want, **TOL)
        assert 0 <= row["nmi_shuffled"] <= 1


def test_sample_runs_sparse_train_baseline_is_at_chance() -> None:
    """wikitext2-naive_topk on train: the old permutation over max(token_idx)+1 positions found ~30 of 6,720 keys
    and gave nmi_shuffled 1.178."""
    got = A.specialization(connect(SAMPLE), "wikitext2-naive_topk", split="train", summary=True).iloc[0]
    assert 0 <= got["nmi_shuffled"] < 0.02 and got["nmi_shuffled"] < 3 * got["nmi_chance"]


def _expected_nmi(labels: np.ndarray, experts: np.ndarray) -> float:
    c = contingency_matrix(labels, experts)
    mean_h = (_entropy(c.sum(0)) + _entropy(c.sum(1))) / 2
    return expected_mutual_information(c, len(labels)) / mean_h


@pytest.mark.parametrize("attribute,split,dataset", [("pos_tag", "valid", None), ("token", "train", "conll2003"),
                                                     ("position_band", "valid", "conll2003")])
def test_nmi_ami_and_chance_are_sklearns(shapes, attribute: str, split: str, dataset: str | None) -> None:
    s, con = shapes
    got = A.specialization(con, "a", attribute=attribute, split=split, dataset=dataset, summary=True).iloc[0]
    ds = dataset or "wikitext2"
    r = _rows(s, "a", split, ds)
    r = r[(r["rank"] == 0) & (r["epoch"] == EPOCHS - 1)]
    tok = s.tokens[(s.tokens["run"] == "a") & (s.tokens["dataset"] == ds) & (s.tokens["split"] == split)]
    tok = tok.set_index("token_idx").loc[r["token_idx"]]
    band = pd.cut(tok["position"], [-1, 0, 4, 9, 19, 49, 10**9], labels=["0", "1-4", "5-9", "10-19", "20-49", "50+"])
    labels = (band.astype(str) if attribute == "position_band" else tok[attribute]).to_numpy()
    keep = tok["in_vocab"].to_numpy()
    labels, experts = pd.factorize(labels[keep])[0], r["expert"].to_numpy()[keep]
    np.testing.assert_allclose(got["nmi"], normalized_mutual_info_score(labels, experts), **TOL)
    np.testing.assert_allclose(got["ami"], adjusted_mutual_info_score(labels, experts), **TOL)
    np.testing.assert_allclose(got["mi"], mutual_info_score(labels, experts), **TOL)
    h_e = _entropy(np.bincount(experts).astype(float))
    np.testing.assert_allclose(got["uncertainty_coef"], mutual_info_score(labels, experts) / h_e, **TOL)
    chance = _expected_nmi(labels, experts)
    np.testing.assert_allclose(got["nmi_chance"], chance, rtol=1e-9)
    rng = np.random.default_rng(0)  # and the mean of 200 permutations, within 4 standard errors
    perm = np.array([normalized_mutual_info_score(rng.permutation(labels), experts) for _ in range(200)])
    assert abs(perm.mean() - got["nmi_chance"]) < 4 * perm.std() / np.sqrt(200)


def test_agreement_nmi_ami_are_sklearns(shapes) -> None:
    s, con = shapes
    got = A.agreement(con, "a", "b", layer=1).iloc[0]
    a, b = (_rows(s, run, "valid", "wikitext2", layer=1) for run in ("a", "b"))
    a, b = (x[(x["rank"] == 0) & (x["epoch"] == EPOCHS - 1)].set_index("token_idx")["expert"] for x in (a, b))
    b = b.loc[a.index]
    np.testing.assert_allclose(got["nmi"], normalized_mutual_info_score(a, b), **TOL)
    np.testing.assert_allclose(got["ami"], adjusted_mutual_info_score(a, b), **TOL)
    np.testing.assert_allclose(got["mi"], mutual_info_score(a, b), **TOL)


def test_compare_ranks_by_ami(shapes) -> None:
    s, con = shapes
    spec = A.specialization(con, ["a", "b"], summary=True, layer=0).set_index("run")  # compare: layer 0
    by_ami = A.compare(con, ["a", "b"])
    assert by_ami["run"].tolist() == spec["ami"].sort_values(ascending=False).index.tolist()
    assert by_ami["rank"].tolist() == [1, 2]
    np.testing.assert_allclose(by_ami.set_index("run").loc[spec.index, "ami_pos_tag"], spec["ami"], **TOL)
    by_mi = A.compare(con, ["a", "b"], rank_by="mi")
    assert by_mi["run"].tolist() == spec["mi"].sort_values(ascending=False).index.tolist()
    with pytest.raises(Exception, match="rank_by"):
        A.compare(con, ["a"], rank_by="nmi")


def test_dead_experts_count_all_assignments(shapes) -> None:
    """Expert E-1 is never any token's first choice but takes ~60% of the second choices: not dead."""
    s, con = shapes
    got = A.collapse(con, "a", split="valid", by="epoch", layer=0)
    for epoch in range(EPOCHS):
        v = _rows(s, "a", "valid", "wikitext2")
        v = v[v["epoch"] == epoch]
        share = np.bincount(v["expert"], minlength=E) / len(v)  # all k assignments
        top1 = np.bincount(v[v["rank"] == 0]["expert"], minlength=E)
        row = got[got["epoch"] == epoch].iloc[0]
        assert row["dead_experts"] == int((share < 1 / (10 * E)).sum()) == 0  # old code: 1 (never top-1)
        assert row["never_top1"] == int((top1 == 0).sum()) == 1


def test_capacity_defaults_to_train_where_tokens_drop(shapes) -> None:
    s, con = shapes
    got = A.capacity(con, "a", layer=0)
    assert got["split"].unique().tolist() == ["train"]
    t = _rows(s, "a", "train", "wikitext2")
    np.testing.assert_allclose(got.sort_values("epoch")["dropped_rate"], t.groupby("epoch")["dropped"].mean(), **TOL)
    assert (got["dropped_rate"] > 0).all()
    assert (A.capacity(con, "a", split="valid")["dropped_rate"] == 0).all()  # eval never drops


def test_oov_tokens_are_left_out_of_specialization(shapes) -> None:
    s, con = shapes
    r = _rows(s, "a", "valid", "wikitext2")
    r = r[(r["rank"] == 0) & (r["epoch"] == EPOCHS - 1)]
    tok = s.tokens[(s.tokens["run"] == "a") & (s.tokens["dataset"] == "wikitext2") & (s.tokens["split"] == "valid")]
    tok = tok.set_index("token_idx").loc[r["token_idx"]]
    assert (~tok["in_vocab"]).sum() > 20  # the fixture has OOV tokens
    for include_oov in (False, True):
        keep = np.ones(len(r), bool) if include_oov else tok["in_vocab"].to_numpy()
        got = A.specialization(con, "a", include_oov=include_oov, layer=0)
        want = pd.crosstab(tok["pos_tag"].to_numpy()[keep], r["expert"].to_numpy()[keep]).stack()
        want = want[want > 0].sort_index()
        mine = got.set_index(["value", "expert"])["n"].sort_index()
        assert mine.index.tolist() == want.index.tolist() and mine.tolist() == want.tolist()
        assert got["rows"].iloc[0] == keep.sum()


def test_traces_without_in_vocab_fall_back_to_the_unk_id(shapes) -> None:
    """Run `old` has run `a`'s traces without the in_vocab column: a token is OOV iff token_id is the run's
    <unk> id (the id many surface words share), so both give the same table."""
    s, con = shapes
    assert con.execute("SELECT count(in_vocab) FROM tokens WHERE run = 'old'").fetchall()[0][0] == 0
    tok = s.tokens[s.tokens["run"] == "a"]
    assert ((tok["token_id"] == UNK_ID) == ~tok["in_vocab"]).all()
    for include_oov in (False, True):
        for dataset in (None, "conll2003"):
            a = A.specialization(con, "a", include_oov=include_oov, dataset=dataset).drop(columns="run")
            old = A.specialization(con, "old", include_oov=include_oov, dataset=dataset).drop(columns="run")
            pd.testing.assert_frame_equal(a.reset_index(drop=True), old.reset_index(drop=True))
    assert A.specialization(con, "old", summary=True)["rows"].iloc[0] < \
        A.specialization(con, "old", summary=True, include_oov=True)["rows"].iloc[0]


def test_matched_agreement_is_the_optimum_even_if_scipy_import_is_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old greedy fallback (without scipy) took the 10 first and gave 10; the optimum pairs 9 + 9 = 18."""
    import importlib

    stability = importlib.import_module("moe_lens.analysis.stability")
    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError(f"blocked {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    monkeypatch.delitem(sys.modules, "scipy.optimize", raising=False)
    assert stability._matched(np.array([[10.0, 9.0], [9.0, 0.0]])) == 18.0
