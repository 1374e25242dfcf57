"""`--record-tokens` and `--epoch-steps`: small trace sets (sample_runs) that still join and never duplicate."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from moe_lens.store import connect
from moe_lens.train import train
from tests.test_train_e2e import check_traces, tiny_cfg

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dataset", ["conll2003", "wikitext2"])
def test_record_tokens_keeps_a_prefix_of_eval_and_only_referenced_train_tokens(real_data_dir: Path, tmp_path: Path,
                                                                              dataset: str) -> None:
    cfg = tiny_cfg(real_data_dir, tmp_path, dataset, "noisy_topk", epochs=2, epoch_steps=4, record_every=2,
                   record_tokens=300, max_eval_batches=None, hidden_sample=40, hidden_bf16=True)  # fmt: skip
    run_dir = train(cfg, progress=False)
    run = run_dir.name
    check_traces(tmp_path, run, cfg)  # every routing row joins tokens; rows = tokens x k per batch
    con = connect(tmp_path)
    valid = con.execute("SELECT epoch, max(token_idx), count(DISTINCT token_idx) FROM routing "
                        "WHERE split = 'valid' GROUP BY epoch ORDER BY epoch").fetchall()  # fmt: skip
    assert [v[0] for v in valid] == [0, 1]
    assert all(v[1] < 300 and v[2] == 300 for v in valid)  # the first 300 tokens, all of them
    assert con.execute("SELECT count(*) FROM tokens WHERE split = 'valid'").fetchall()[0][0] == 300
    # train: exactly the tokens of the recorded batches, each once, across several flushes
    train_tokens = con.execute("SELECT count(*), count(DISTINCT token_idx) FROM tokens WHERE split = 'train'").fetchall()[0]
    routed = con.execute("SELECT count(DISTINCT token_idx) FROM routing WHERE split = 'train'").fetchall()[0][0]
    assert train_tokens[0] == train_tokens[1] == routed > 0
    parts = list((run_dir / "tokens" / f"dataset={dataset}" / "split=train").glob("part-*.parquet"))
    assert len(parts) == 2  # one per epoch: CoNLL reshuffles, the LM's short epochs continue the stream
    hidden = con.execute("SELECT epoch, count(*), max(token_idx) FROM hidden GROUP BY epoch").fetchall()
    assert all(h[1] == 40 and h[2] < 300 for h in hidden)
    values = np.concatenate(con.execute("SELECT hidden FROM hidden").df()["hidden"].map(np.asarray).tolist())
    assert values.dtype == np.float32 and np.abs(values).max() > 0
    assert not (values.view(np.uint32) & 0xFFFF).any()  # bfloat16 precision: the low mantissa bits are zero
    steps = json.loads((run_dir / "config.json").read_text())["steps_per_epoch"]
    assert steps == 4 and json.loads((run_dir / "run.json").read_text())["step"] == 8
    metrics = con.execute("SELECT DISTINCT step FROM metrics WHERE split = 'valid' ORDER BY step").fetchall()
    assert [m[0] for m in metrics] == [4, 8]


def test_lazy_train_tokens_survive_resume_without_duplicates(real_data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(real_data_dir, tmp_path, "conll2003", "load", epochs=1, epoch_steps=3, record_every=1,
                   record_tokens=100)  # fmt: skip
    run_dir = train(cfg, progress=False)
    before = sum(pq.read_metadata(f).num_rows for f in (run_dir / "tokens").rglob("part-*.parquet"))
    from dataclasses import replace
    run_dir = train(replace(cfg, epochs=2), resume=True, progress=False)
    con = connect(tmp_path)
    n, distinct = con.execute("SELECT count(*), count(DISTINCT (split, token_idx)) FROM tokens").fetchall()[0]
    assert n == distinct > before
    check_traces(tmp_path, run_dir.name, cfg)


def test_tokens_parts_keep_only_the_dictionary_values_they_use(tmp_path: Path) -> None:
    """A slice of a split's token table carried the whole vocabulary into every part file (~170 KB each on
    CoNLL); compact_dictionaries keeps the used values, in order, with the same Arrow types and metadata."""
    import pandas as pd
    import pyarrow as pa

    from moe_lens.record import compact_dictionaries

    vocab = [f"w{i}" for i in range(5000)]
    df = pd.DataFrame({"token_idx": np.arange(6),
                       "token": pd.Categorical.from_codes(np.array([7, 3, 7, 4999, 3, 0], dtype=np.int16), vocab),
                       "pos_tag": pd.Categorical.from_codes(np.array([1, -1, 0, 1, 1, -1], dtype=np.int8), ["NN", "VB"]),
                       "band": pd.Categorical.from_codes(np.zeros(6, dtype=np.int8), ["a", "b"], ordered=True),
                       "empty": pd.Categorical.from_codes(np.full(6, -1, dtype=np.int8), pd.Index([], dtype="str"))})
    full = pa.Table.from_pandas(df, preserve_index=False)
    part = pa.concat_tables([full.slice(0, 2), full.take([2, 3, 4, 5])])  # two chunks, as the recorder's flush
    got = compact_dictionaries(part)
    assert got.schema == part.schema and got.schema.metadata == part.schema.metadata
    assert got.column("token").chunk(0).dictionary.to_pylist() == ["w0", "w3", "w7", "w4999"]
    assert got.column("band").type.ordered and got.column("band").chunk(0).dictionary.to_pylist() == ["a"]
    pd.testing.assert_frame_equal(got.to_pandas().astype(str), part.to_pandas().astype(str))
    assert got.column("pos_tag").null_count == 2 and got.column("empty").null_count == 6
    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    pq.write_table(got, small, compression="zstd")
    pq.write_table(part, big, compression="zstd")
    assert len(pq.read_table(small).column("token").chunk(0).dictionary) == 4  # the file holds 4 words, not 5000
    assert len(pq.read_table(big).column("token").chunk(0).dictionary) == 5000
    assert small.stat().st_size < big.stat().st_size
