"""The literature's routing analyses (consecutive, saturation, vocabulary, fluctuation) against pandas on the
sample runs (1e-9), and on hand-built traces whose answer is known: a router that gives every token of a document
the same expert (consecutive rate 1), one drawing experts at random (the chance level inside the interval), a
router fixed across epochs (saturation 1, nothing fluctuates), one that is a function of the token (vocabulary 1).
"""
from __future__ import annotations

from pathlib import Path

import literature_ref as ref
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_lens import analysis as A
from moe_lens.errors import MoeLensError
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_runs"
RUNS = ["wikitext2-load-3layer", "conll2003-hybrid-seed1", "squad-noisy_topk"]  # 3 layers top-2; top-1; top-2
TOL = {"rtol": 1e-9, "atol": 1e-9}


def read(run: str, table: str, split: str = "valid") -> pd.DataFrame:
    return ref.read(SAMPLE / run, table, split)


@pytest.fixture(scope="module")
def con():
    return connect(SAMPLE)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("within", ["document", "sentence"])
def test_consecutive_equals_pandas(con, run: str, within: str) -> None:
    got = A.consecutive(con, run, within=within).set_index("layer")
    ref.close(got, ref.consecutive(read(run, "tokens"), read(run, "routing"), within), ref.CONSECUTIVE)


@pytest.mark.parametrize("run", RUNS)
def test_saturation_equals_pandas(con, run: str) -> None:
    got = A.saturation(con, run).set_index(["epoch", "layer"])
    ref.close(got, ref.saturation(read(run, "routing")), ref.SATURATION)


@pytest.mark.parametrize("run", RUNS)
def test_vocabulary_equals_pandas(con, run: str) -> None:
    got = A.vocabulary(con, run, min_count=10).set_index("layer")
    table = A.vocabulary(con, run, min_count=10, summary=False)
    want, counts = ref.vocabulary(read(run, "tokens"), read(run, "routing"), min_count=10)
    ref.close(got, want, ref.VOCABULARY)
    for layer, n in counts.items():
        assert got.loc[layer, "mean_share_chance"] < got.loc[layer, "mean_share"] or got.loc[layer, "mean_share"] > 0.99
        t = table[table["layer"] == layer].set_index("token")
        share = (n.max(axis=1) / n.sum(axis=1)).to_numpy()
        np.testing.assert_allclose(t.loc[n.index, "share"].to_numpy(), share, **TOL)
        assert (t.loc[n.index, "expert"].to_numpy() == n.idxmax(axis=1).to_numpy()).all()


@pytest.mark.parametrize("run", ["conll2003-hybrid", "wikitext2-load-3layer"])
def test_fluctuation_equals_pandas(con, run: str) -> None:
    got = A.fluctuation(con, run).set_index("layer")
    dist = A.fluctuation(con, run, summary=False).set_index(["layer", "last_change"])["tokens"]
    want, want_dist = ref.fluctuation(read(run, "routing"))
    ref.close(got, want, ref.FLUCTUATION)
    assert dist.sort_index().to_dict() == want_dist.sort_index().to_dict()


# --- hand-built traces ----------------------------------------------------------------------------------------

def _hand_run(root: Path, name: str, route, *, top_k: int = 1, experts: int = 4, epochs: int = 3,
              tokens: int = 3000, seed: int = 0) -> None:
    """A synthetic run's valid trace with rank-0 experts replaced by route(tokens frame, epoch, rng) (n,)."""
    run = write_synthetic_run(root, name, num_tokens=tokens, num_experts=experts, top_k=top_k, epochs=epochs,
                              splits=("valid",), seed=seed)
    tok = pq.read_table(next((run / "tokens").rglob("*.parquet"))).to_pandas().set_index("token_idx")
    rng = np.random.default_rng(seed)
    for part in sorted((run / "routing").rglob("*.parquet")):
        epoch = int(part.parent.name.split("=")[1])
        t = pq.read_table(part).to_pandas()
        first = route(tok, epoch, rng)  # (n,) top-1 expert of each token
        e0 = first[t["token_idx"].to_numpy()]
        t["expert"] = np.where(t["rank"] == 0, e0, (e0 + 1) % experts).astype(t["expert"].dtype)
        pq.write_table(pa.Table.from_pandas(t, preserve_index=False), part)


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> object:
    root = tmp_path_factory.mktemp("literature")
    _hand_run(root, "copy", lambda tok, e, rng: (tok["doc_id"].to_numpy() % 4))  # same expert within a document
    _hand_run(root, "random", lambda tok, e, rng: rng.choice(4, size=len(tok), p=[0.4, 0.3, 0.2, 0.1]), seed=1)
    _hand_run(root, "vocab", lambda tok, e, rng: tok["token_id"].to_numpy() % 4, top_k=2)
    _hand_run(root, "late", lambda tok, e, rng: (tok["token_id"].to_numpy() + (e == 2) * (tok.index.to_numpy() % 2)) % 4,
              epochs=3)
    return connect(root)


def test_copy_router_has_consecutive_rate_one(hand) -> None:
    df = A.bootstrap(A.consecutive, hand, "copy", n=100)
    assert (df["same_top1"] == 1.0).all() and (df["top1_in_next_top2"] == 1.0).all()
    assert (df["same_top1_lo"] == 1.0).all()
    assert df["same_top1_chance"].between(0.2, 0.6).all()  # sum p_i^2 of the documents' experts


def test_random_router_sits_at_chance_within_its_interval(hand) -> None:
    df = A.bootstrap(A.consecutive, hand, "random", n=200, by="sentence")
    pd.testing.assert_frame_equal(df[A.consecutive(hand, "random").columns], A.consecutive(hand, "random"))
    r = df.iloc[0]
    assert r["same_top1_lo"] <= r["same_top1_chance"] <= r["same_top1_hi"], r
    np.testing.assert_allclose(r["same_top1_chance"], 0.4**2 + 0.3**2 + 0.2**2 + 0.1**2, atol=0.02)
    assert r["top1_in_next_top2_lo"] <= r["top1_in_next_top2_chance"] <= r["top1_in_next_top2_hi"], r
    sat = A.bootstrap(A.saturation, hand, "random", n=200)  # epochs redrawn independently: chance
    assert ((sat["top1_match_lo"] <= sat["top1_match_chance"]) & (sat["top1_match_chance"] <= sat["top1_match_hi"])).all()


def test_fixed_router_is_saturated_and_never_fluctuates(hand) -> None:
    sat = A.saturation(hand, "vocab")
    assert (sat["top1_match"] == 1.0).all() and (sat["topk_overlap"] == 1.0).all()
    assert len(sat) == 2 and (sat["top1_match_chance"] < 0.5).all()
    fl = A.fluctuation(hand, "vocab")
    assert (fl["never_changed"] == 1.0).all() and (fl[["changing_after_20", "changing_after_80"]] == 0).all().all()


def test_late_change_is_still_fluctuating_after_80_percent(hand) -> None:
    fl = A.fluctuation(hand, "late").iloc[0]
    # odd token_idx change expert at epoch 2 (the last, progress 1.0); nothing changes at epoch 1
    np.testing.assert_allclose(fl["changing_after_80"], 0.5, atol=1e-12)
    np.testing.assert_allclose(fl["never_changed"], 0.5, atol=1e-12)
    dist = A.fluctuation(hand, "late", summary=False)
    assert dist["last_change"].tolist() == [-1, 2]


def test_token_function_router_has_vocabulary_share_one(hand) -> None:
    df = A.bootstrap(A.vocabulary, hand, "vocab", n=50, min_count=5)
    assert (df["mean_share"] == 1.0).all() and (df["token_share"] == 1.0).all() and (df["mean_share_lo"] == 1.0).all()
    assert (df["mean_share_chance"] < 0.8).all()
    top = A.vocabulary(hand, "vocab", summary=False, top=2, min_count=5)
    assert top.groupby("expert").size().max() <= 2 and (top["share"] == 1.0).all()


def test_bad_options_are_one_line_errors(hand) -> None:
    with pytest.raises(MoeLensError, match="within='word'; allowed: document, sentence"):
        A.consecutive(hand, "copy", within="word")
    with pytest.raises(MoeLensError, match="unknown run 'nope'"):
        A.saturation(hand, "nope")


def test_analyze_command_prints_the_registered_analysis(con, capsys) -> None:
    from io import StringIO

    from moe_lens.cli import main
    run = "conll2003-hybrid-seed1"
    assert main(["analyze", "consecutive", run, "--runs-dir", str(SAMPLE), "--format", "csv", "--within", "sentence"]) == 0
    got = pd.read_csv(StringIO(capsys.readouterr().out))
    np.testing.assert_allclose(got["same_top1"], A.consecutive(con, run, within="sentence")["same_top1"], **TOL)
    assert main(["analyze", "vocabulary", run, "--runs-dir", str(SAMPLE), "--format", "csv", "--bootstrap", "20"]) == 0
    got = pd.read_csv(StringIO(capsys.readouterr().out))
    assert {"mean_share_lo", "mean_share_hi", "units"} <= set(got.columns)
    assert main(["analyze", "agreement", run, "conll2003-hybrid-seed2", "--runs-dir", str(SAMPLE)]) == 0
    assert "matched_agreement" in capsys.readouterr().out
    assert main(["analyze", "fluctuation", run, "--runs-dir", str(SAMPLE), "--within", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fluctuation takes no --within" in err
    assert main(["analyze", "consecutive", run, "--runs-dir", str(SAMPLE), "--layer", "one"]) == 2
    assert "--layer='one': expected int" in capsys.readouterr().err


def test_probe_datasets_follow_the_dataset_rule(con) -> None:
    """wikitext2-load holds CoNLL and SQuAD replays recorded at one epoch: '*' gives each its own rows where the
    analysis can say something (consecutive, vocabulary), and no saturation/fluctuation row without two epochs."""
    cons = A.consecutive(con, "wikitext2-load", dataset="*")
    assert set(cons["dataset"]) == {"wikitext2", "conll2003", "squad"}
    assert set(A.saturation(con, "wikitext2-load", dataset="*")["dataset"]) == {"wikitext2"}
    assert set(A.fluctuation(con, "wikitext2-load", dataset="*")["dataset"]) == {"wikitext2"}
    with pytest.raises(MoeLensError, match="two recorded epochs"):
        A.fluctuation(con, "wikitext2-load", dataset="squad")
    own = A.consecutive(con, "wikitext2-load")
    pd.testing.assert_frame_equal(own, cons[cons["dataset"] == "wikitext2"].reset_index(drop=True))
