"""Synthetic runs in the exact trace layout of docs/traces.md, for tests, benchmarks and the app.

`write_synthetic_run` writes `config.json`, `run.json`, `metrics.parquet`, `tokens/`, `routing/`
(and optionally `probs/`, `hidden/`) with controllable routing, fully vectorised with numpy
(20 million routing rows take seconds).

The router of a synthetic run is a top-k router over logits (n, e):

    z = -skew * log(1 + j)                  a Zipf-like prior over experts j = 0..e-1
        + specialization * B[pos_tag(token)]  attribute-dependent routing (B ~ N(0, 1), (tags, e))
        + noise * eps_token + drift * eps_epoch     per-token noise, re-drawn in part each epoch
        + collapse bonus (20, 10, 5, ... on experts 0, 1, 2, ...) from `collapse_step` on
    dead experts: z = -inf

`router_probs = softmax(z)`, the k experts are the top-k of z (Shazeer et al. 2017 keep the top-k
of the noisy logits), the gate is `router_probs` renormalised over the k chosen (the top-1 probability
itself when k = 1, as in Switch, Fedus et al. 2021) and `entropy = -sum_j p_j log p_j` in nats.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moe_lens.config import RunConfig

POS_TAGS = ("NN", "NNP", "NNS", "VB", "VBD", "JJ", "RB", "IN", "DT", "PRP", "CD", "UNK")
NER_TAGS = ("O", "O", "O", "O", "B-PER", "I-PER", "B-LOC", "B-ORG", "I-ORG", "B-MISC")
FREQ_BANDS = ((10, "1-10"), (100, "11-100"), (1000, "101-1k"), (10000, "1k-10k"))


def write_synthetic_run(
    runs_dir: str | Path, run: str, *, num_tokens: int = 1000, num_experts: int = 8, top_k: int = 2,
    epochs: int = 2, steps_per_epoch: int = 10, layers: int = 1, seed: int = 0,
    dataset: str = "wikitext2", mode: str = "noisy_topk", splits: tuple[str, ...] = ("train", "valid"),
    skew: float = 0.0, dead_experts: int = 0, specialization: float = 1.0, noise: float = 1.0,
    drift: float = 0.5, collapse_step: int | None = None, drop_rate: float = 0.0,
    capacity_factor: float | None = None, vocab_size: int = 5000, with_probs: bool = False,
    with_hidden: bool = False, d_model: int = 8, status: str = "finished", rows_per_part: int = 2_000_000,
    chunk_tokens: int | None = None,
) -> Path:
    """Write one synthetic run under `runs_dir/run` and return its directory.

    Each split's token stream has `num_tokens` tokens. `train` routes the stream once per epoch in
    `steps_per_epoch` contiguous chunks (step = epoch * steps_per_epoch + chunk); `valid`/`test` route
    the whole stream at the last step of each epoch. Rows: splits x epochs x layers x num_tokens x top_k.
    `chunk_tokens=N` routes and writes each epoch N tokens at a time (own part files per chunk), so memory stays
    O(N) rows however long the stream (hundreds of millions of rows for benchmarks/bench_sql.py); the random
    draws then differ from the unchunked run of the same seed. None: the whole epoch at once (the default).
    """
    live = num_experts - dead_experts
    if not 1 <= top_k <= live:
        raise ValueError(f"top_k={top_k} with {live} live experts; allowed: 1..{live}")
    cfg = RunConfig.for_mode(mode, dataset=dataset, num_experts=num_experts, top_k=top_k,
                             capacity_factor=capacity_factor, epochs=epochs, d_model=d_model, seed=seed)
    root = Path(runs_dir) / run
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "config.json", {**cfg.to_dict(), "run": run, "versions": {"synthetic": "1"},
                                        "device": "cpu", "git_commit": None, "num_params": 0})
    rng = np.random.default_rng(seed)
    prior = -skew * np.log1p(np.arange(num_experts))
    prior[live:] = -np.inf
    bias = rng.standard_normal((layers, len(POS_TAGS), num_experts))
    loads = []
    for split in splits:
        tokens, pos_idx = _tokens(rng, num_tokens, vocab_size, dataset)  # pos_idx (n,) into POS_TAGS
        _write(tokens, root / "tokens" / f"dataset={dataset}" / f"split={split}" / "part-00000.parquet")
        eps_token = rng.standard_normal((layers, num_tokens, num_experts))
        for epoch in range(epochs):
            step_all = _steps(split, epoch, num_tokens, steps_per_epoch)
            part_dir = f"dataset={dataset}/split={split}/epoch={epoch}"
            counts, first_part = np.zeros(num_experts), 0
            for a in range(0, max(num_tokens, 1), chunk_tokens or max(num_tokens, 1)):  # one chunk unless chunk_tokens
                b = min(a + (chunk_tokens or num_tokens), num_tokens)
                step, parts = step_all[a:b], []
                for layer in range(layers):
                    z = prior + specialization * bias[layer][pos_idx[a:b]] + noise * eps_token[layer, a:b]
                    z = z + drift * rng.standard_normal(z.shape)
                    if collapse_step is not None:
                        bonus = 20.0 / 2.0 ** np.arange(num_experts)
                        z = z + np.where((step >= collapse_step)[:, None], bonus, 0.0)
                    z[:, live:] = -np.inf
                    parts.append(_route(rng, z, step, layer, top_k, drop_rate, with_probs, offset=a))
                routing = pa.concat_tables([p[0] for p in parts])
                n_parts = _write_parts(routing, root / "routing" / part_dir, rows_per_part, first_part)
                if with_probs:
                    _write_parts(pa.concat_tables([p[1] for p in parts]), root / "probs" / part_dir, rows_per_part,
                                 first_part)
                first_part += n_parts
                counts += np.bincount(parts[0][0]["expert"].to_numpy(), minlength=num_experts)
            if with_hidden:
                _write(_hidden(rng, num_tokens, layers, d_model, int(step_all[-1])), root / "hidden" / part_dir / "part-00000.parquet")
            if split != "train":
                loads.append(_loads(counts, int(step_all[-1]) if num_tokens else 0, epoch, split))
    _write_metrics(root, epochs, steps_per_epoch, loads)
    last = epochs * steps_per_epoch - 1
    _write_json(root / "run.json", {"status": status, "started_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T01:00:00+00:00",
                                    "finished_at": "2026-01-01T01:00:00+00:00" if status == "finished" else None,
                                    "step": last, "epoch": epochs - 1, "error": None})
    return root


def write_synthetic_ablation(run_dir: str | Path, *, split: str = "valid", effect: float = 0.05,
                             noise: float = 0.02, seed: int = 0) -> Path:
    """An `ablation/` table (moe_lens/ablate.py's layout) for a synthetic run: for each layer and expert of the
    run's last `split` epoch, every routed token; chose = the token was routed to the expert there; delta_loss =
    effect * (expert + 1) / e on the tokens that chose it, plus N(0, noise) on every token (so causal importance
    grows with the expert index, whatever the load). base_loss ~ U(1, 5). Returns the ablation directory."""
    root = Path(run_dir)
    rng = np.random.default_rng(seed)
    dataset = json.loads((root / "config.json").read_text())["dataset"]
    base = root / "routing" / f"dataset={dataset}" / f"split={split}"
    epoch = max(int(p.name.split("=")[1]) for p in base.glob("epoch=*"))
    r = pq.read_table(base / f"epoch={epoch}").to_pandas()
    e = int(r["expert"].max()) + 1
    out = root / "ablation" / f"dataset={dataset}" / f"split={split}"
    for layer, g in r.groupby("layer"):
        idx = np.sort(g["token_idx"].unique())
        base_loss = rng.uniform(1.0, 5.0, len(idx)).astype(np.float32)
        for expert in range(e):
            chose = np.isin(idx, g.loc[g["expert"] == expert, "token_idx"].to_numpy())
            delta = (effect * (expert + 1) / e * chose + noise * rng.standard_normal(len(idx))).astype(np.float32)
            n = len(idx)
            _write(pa.table({"token_idx": pa.array(idx, pa.int64()), "layer": pa.array(np.full(n, layer, np.int16)),
                             "expert": pa.array(np.full(n, expert, np.int16)), "epoch": pa.array(np.full(n, epoch, np.int32)),
                             "loss": pa.array(base_loss + delta), "base_loss": pa.array(base_loss),
                             "delta_loss": pa.array(delta), "chose": pa.array(chose)}),
                   out / f"part-L{layer}-E{expert}.parquet")
    return out


def _steps(split: str, epoch: int, n: int, steps_per_epoch: int) -> np.ndarray:
    """(n,) optimizer step at which each token of the stream is routed in `epoch`."""
    if split == "train":
        return epoch * steps_per_epoch + (np.arange(n, dtype=np.int64) * steps_per_epoch) // max(n, 1)
    return np.full(n, (epoch + 1) * steps_per_epoch - 1, dtype=np.int64)


def _route(rng: np.random.Generator, z: np.ndarray, step: np.ndarray, layer: int, k: int,
           drop_rate: float, with_probs: bool, offset: int = 0) -> tuple[pa.Table, pa.Table | None]:
    """Top-k routing of logits z (n, e) of tokens offset..offset+n-1 into n * k rows, token-major, rank 0 =
    largest gate."""
    n, e = z.shape
    top = np.argpartition(-z, k - 1, axis=1)[:, :k] if k < e else np.tile(np.arange(e), (n, 1))
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(z, top, 1), axis=1, kind="stable"), 1)  # (n, k)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)  # (n, e) router_probs
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)  # (n,)
    pk = np.take_along_axis(p, top, 1)  # (n, k)
    gate = pk if k == 1 else pk / pk.sum(axis=1, keepdims=True)
    token_idx = np.arange(offset, offset + n, dtype=np.int64)
    table = pa.table({
        "step": pa.array(np.repeat(step, k), pa.int64()),
        "token_idx": pa.array(np.repeat(token_idx, k), pa.int64()),
        "layer": pa.array(np.full(n * k, layer, np.int16)),
        "rank": pa.array(np.tile(np.arange(k, dtype=np.int8), n)),
        "expert": pa.array(top.reshape(-1).astype(np.int16)),
        "gate": pa.array(gate.reshape(-1).astype(np.float32)),
        "entropy": pa.array(np.repeat(entropy, k).astype(np.float32)),
        "dropped": pa.array(rng.random(n * k) < drop_rate),
    })
    probs = None
    if with_probs:
        values = pa.array(p.reshape(-1).astype(np.float32))
        probs = pa.table({"step": pa.array(step, pa.int64()), "token_idx": pa.array(token_idx),
                          "layer": pa.array(np.full(n, layer, np.int16)),
                          "router_probs": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * e), values)})
    return table, probs


def _tokens(rng: np.random.Generator, n: int, vocab_size: int, dataset: str) -> tuple[pa.Table, np.ndarray]:
    """The annotated token stream (n rows); optional columns only where the dataset has them."""
    ranks = np.arange(1, vocab_size + 1)
    zipf = 1.0 / ranks
    token_id = rng.choice(vocab_size, size=n, p=zipf / zipf.sum()).astype(np.int32)  # id 0 = most frequent
    vocab = pa.array([f"w{i}" for i in range(vocab_size)])
    pos_of_word = rng.integers(0, len(POS_TAGS), vocab_size)
    lengths = rng.integers(5, 31, size=n // 5 + 2)
    sent_id = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)[:n]
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    position = (np.arange(n) - starts[sent_id]).astype(np.int32)
    freq_rank = (token_id + 1).astype(np.int32)
    band = np.full(n, "10k+", dtype=object)
    for hi, name in reversed(FREQ_BANDS):
        band[freq_rank <= hi] = name
    cols = {
        "token_idx": pa.array(np.arange(n, dtype=np.int64)), "token_id": pa.array(token_id),
        "token": vocab.take(pa.array(token_id)), "pos_tag": pa.array(np.array(POS_TAGS, dtype=object)[pos_of_word[token_id]]),
        "freq_rank": pa.array(freq_rank), "freq_band": pa.array(band, pa.string()),
        "doc_id": pa.array((sent_id // 20).astype(np.int32)), "sent_id": pa.array(sent_id), "position": pa.array(position),
    }
    if dataset == "conll2003":
        cols["ner_tag"] = pa.array(np.array(NER_TAGS, dtype=object)[rng.integers(0, len(NER_TAGS), n)], pa.string())
    if dataset == "squad":
        cols["segment"] = pa.array(np.where(position < 8, "question", "context").astype(object), pa.string())
        cols["in_answer"] = pa.array((position >= 10) & (position < 13))
    return pa.table(cols), pos_of_word[token_id]


def _hidden(rng: np.random.Generator, n: int, layers: int, d: int, step: int) -> pa.Table:
    """A sample of hidden states: at most 1000 tokens per layer, list<float32> of length d."""
    idx = np.sort(rng.choice(n, size=min(n, 1000), replace=False)).astype(np.int64)
    m = len(idx) * layers
    values = pa.array(rng.standard_normal(m * d).astype(np.float32))
    return pa.table({"step": pa.array(np.full(m, step, np.int64)), "token_idx": pa.array(np.tile(idx, layers)),
                     "layer": pa.array(np.repeat(np.arange(layers, dtype=np.int16), len(idx))),
                     "hidden": pa.ListArray.from_arrays(pa.array(np.arange(m + 1, dtype=np.int32) * d), values)})


def _loads(counts: np.ndarray, step: int, epoch: int, split: str) -> pa.Table:
    """Per-expert share of layer-0 dispatches (`counts`, (e,)), as the recorder's `load` metric."""
    e = len(counts)
    return pa.table({"step": np.full(e, step, np.int64), "epoch": np.full(e, epoch, np.int32), "split": [split] * e,
                     "name": ["load"] * e, "layer": pa.array(np.zeros(e, np.int16)), "expert": pa.array(np.arange(e, dtype=np.int16)),
                     "value": counts / max(counts.sum(), 1.0)})


def _write_metrics(root: Path, epochs: int, spe: int, loads: list[pa.Table]) -> None:
    steps = np.arange(epochs * spe, dtype=np.int64)
    loss = 6.0 * np.exp(-steps / max(len(steps), 1)) + 4.0
    train = pa.table({"step": steps, "epoch": (steps // spe).astype(np.int32), "split": ["train"] * len(steps),
                      "name": ["loss"] * len(steps), "layer": pa.nulls(len(steps), pa.int16()),
                      "expert": pa.nulls(len(steps), pa.int16()), "value": loss})
    ends = steps[spe - 1::spe]
    vloss = loss[ends] + 0.2
    valid = [pa.table({"step": ends, "epoch": (ends // spe).astype(np.int32), "split": ["valid"] * len(ends),
                       "name": [name] * len(ends), "layer": pa.nulls(len(ends), pa.int16()),
                       "expert": pa.nulls(len(ends), pa.int16()), "value": v}) for name, v in (("loss", vloss), ("ppl", np.exp(vloss)))]
    _write(pa.concat_tables([train, *valid, *loads]), root / "metrics.parquet")


def _write_parts(table: pa.Table, directory: Path, rows_per_part: int, first: int = 0) -> int:
    """Write `table` as part files numbered from `first`; returns how many."""
    starts = range(0, max(table.num_rows, 1), rows_per_part)
    for i, start in enumerate(starts, first):
        _write(table.slice(start, rows_per_part), directory / f"part-{i:05d}.parquet")
    return len(starts)


def _write(table: pa.Table, path: Path) -> None:
    """Write to a temporary name, then rename (as the recorder does: readers never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)
