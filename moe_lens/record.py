"""The Recorder: routing, router probabilities and sampled hidden states to Parquet, off the hot path.

The layout is docs/traces.md. On the training thread `add()` only detaches tensors and starts
their copies to (pinned, on CUDA) CPU memory with `non_blocking=True`, recording a CUDA event; it
never synchronises. A background thread waits on that event, turns the batch into Arrow columns
with numpy (no Python loop over tokens), buffers rows per partition, and at `flush()` (or every
`flush_rows` rows) writes ONE COMPLETE part file per partition: zstd Parquet written to a
temporary name, then renamed. A run killed at any moment therefore leaves only readable files
(a `ParquetWriter` kept open for a whole run would leave a footer-less, unreadable file).

The temp-then-rename writers (`write_table_atomic`, and `write_json_atomic` for run.json and config.json) are
in moe_lens/atomic.py, shared with rundir.py.
"""
from __future__ import annotations

import queue
import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from moe_lens.atomic import DiskFull, write_atomic, write_json_atomic, write_table_atomic  # noqa: F401  (re-exported)
from moe_lens.errors import MoeLensError

if TYPE_CHECKING:  # the type only: the recorder runs without the models (tests/test_import_layers.py)
    from moe_lens.models import MoETrace

TRACE_TABLES = ("routing", "probs", "hidden")


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """Start a device->host copy without waiting for it (pinned memory on CUDA)."""
    t = t.detach()
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


class Recorder:
    def __init__(self, run_dir: str | Path, *, record_probs: bool = False, flush_rows: int = 2_000_000,
                 hidden_bf16: bool = False, ddp_rank: int | None = None) -> None:
        """`ddp_rank`: under torchrun, this process's rank; its part files go to `ddp_rank=R/` partitions."""
        self.run_dir = Path(run_dir)
        self.ddp_rank = ddp_rank
        self.record_probs = record_probs
        self.hidden_bf16 = hidden_bf16  # round hidden states to bfloat16 precision (still float32 columns)
        self.flush_rows = flush_rows
        self._queue: queue.Queue = queue.Queue(maxsize=32)  # bounded: back-pressure, bounded memory
        self._buffers: dict[tuple[str, str, str, int], list[pa.Table]] = {}
        self._rows: dict[tuple[str, str, str, int], int] = {}
        self._error: BaseException | None = None
        self._limits: dict[tuple[str, str], int] = {}  # (dataset, split) -> keep token_idx < limit
        self._lazy: dict[tuple[str, str], tuple[pa.Table, np.ndarray]] = {}  # tokens table, rows written
        self.last_step: dict[tuple[str, str], int] = {}  # (dataset, split) -> step label of its last add()
        self._thread = threading.Thread(target=self._work, name="moe-lens-recorder", daemon=True)
        self._thread.start()

    # ---- training thread -------------------------------------------------------------------
    def write_tokens(self, tokens: pd.DataFrame, dataset: str, split: str, *, limit: int | None = None,
                     lazy: bool = False) -> None:
        """The annotated token table of a split, written once (skipped if already there).

        `limit`: only the first `limit` tokens are kept, here and in every trace of this split added later.
        `lazy`: nothing is written now; each flush writes the rows of the tokens that recorded batches
        referenced since the last one (never a row twice, also across `--resume`).
        """
        directory = self._dir("tokens", dataset, split)
        path = directory / "part-00000.parquet"
        if limit is not None:
            self._limits[(dataset, split)] = limit
        if path.exists() and not lazy:  # written by an earlier start of this run (--resume)
            return
        table = pa.Table.from_pandas(tokens.drop(columns=["dataset", "split"], errors="ignore"), preserve_index=False)
        if lazy:
            done = np.zeros(table.num_rows, dtype=bool)
            for f in directory.glob("part-*.parquet"):
                done[pq.read_table(f, columns=["token_idx"]).column(0).to_numpy()] = True
            self._lazy[(dataset, split)] = (table, done)
            return
        if limit is not None:
            table = table.filter(pc.less(table["token_idx"], limit))
        write_table_atomic(compact_dictionaries(table), path)

    def add(self, traces: list[MoETrace], *, dataset: str, split: str, epoch: int, step: int,
            hidden_keep: torch.Tensor | None = None) -> None:
        """Queue one batch's routing. `hidden_keep`: (N,) bool over the split's token_idx, the hidden sample."""
        self._raise_if_failed()
        self.last_step[(dataset, split)] = step
        items = []
        for tr in traces:
            r = tr.routing
            host = {"token_idx": tr.token_idx, "expert": r.expert_idx, "gate": r.gate, "entropy": tr.stats.entropy}
            if r.dropped is not None:
                host["dropped"] = r.dropped
            if self.record_probs:
                host["probs"] = r.router_probs
            if hidden_keep is not None:
                host["hidden"] = tr.hidden
            host.update(getattr(tr, "extra", None) or {})  # (n,) columns of captured runs: word_idx, subword, shared_gate
            items.append((tr.layer, {k: _to_host(v) for k, v in host.items()}))
        event = None
        if any(tr.token_idx.is_cuda for tr in traces):
            event = torch.cuda.Event()
            event.record()
        keep = hidden_keep.cpu() if hidden_keep is not None else None  # built once per split on the host
        self._queue.put(("add", (dataset, split, epoch, step, items, event, keep)))

    def flush(self) -> None:
        """Write every buffered partition as a complete part file; returns when they are on disk."""
        done = threading.Event()
        self._queue.put(("flush", done))
        while not done.wait(0.5):
            self._raise_if_failed()
        self._raise_if_failed()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._queue.put(("stop", None))
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if isinstance(self._error, MoeLensError):  # e.g. DiskFull: already one line naming the file
            raise self._error
        if self._error is not None:
            raise RuntimeError(f"recorder failed: {self._error}") from self._error

    # ---- background thread -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            kind, payload = self._queue.get()
            try:
                if kind == "stop":
                    return
                if kind == "flush":
                    self._write_all()
                    payload.set()
                    continue
                self._ingest(*payload)
            except BaseException as e:  # surfaced on the training thread at its next call
                self._error = e
                if kind == "flush":
                    payload.set()

    def _ingest(self, dataset: str, split: str, epoch: int, step: int, items: list, event: Any,
                keep: torch.Tensor | None) -> None:
        if event is not None:
            event.synchronize()  # the copies started by add() are complete
        limit = self._limits.get((dataset, split))
        lazy = self._lazy.get((dataset, split))
        for layer, host in items:
            arrays = {k: v.numpy() for k, v in host.items()}
            if limit is not None:
                sel = arrays["token_idx"] < limit
                arrays = {k: v[sel] for k, v in arrays.items()}
            token_idx = arrays["token_idx"]
            if len(token_idx) == 0:
                continue
            if lazy is not None:
                table, done = lazy
                new = np.unique(token_idx[~done[token_idx]])
                if len(new):
                    done[new] = True
                    self._append("tokens", dataset, split, None, table.take(new))
            self._append("routing", dataset, split, epoch, routing_rows(arrays, step, layer))
            if "probs" in arrays:
                rows = _list_rows(token_idx, step, layer, "router_probs", arrays["probs"])
                for name in ("word_idx", "subword"):  # a captured run's probs join its tokens like its routing
                    if name in arrays:
                        rows = rows.append_column(name, pa.array(arrays[name]))
                self._append("probs", dataset, split, epoch, rows)
            if keep is not None:
                sel = keep.numpy()[token_idx]  # (n,) rows whose token is in the fixed sample
                if sel.any():
                    h = arrays["hidden"][sel].astype(np.float32)  # (m, d)
                    if self.hidden_bf16:  # keep sign, exponent and 7 mantissa bits: zstd then halves the size
                        h = (h.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
                    rows = _list_rows(token_idx[sel], step, layer, "hidden", h)
                    self._append("hidden", dataset, split, epoch, rows)

    def _append(self, table: str, dataset: str, split: str, epoch: int | None, rows: pa.Table) -> None:
        key = (table, dataset, split, epoch)
        self._buffers.setdefault(key, []).append(rows)
        self._rows[key] = self._rows.get(key, 0) + rows.num_rows
        if table != "tokens" and self._rows[key] >= self.flush_rows:
            self._write(key)

    def _write_all(self) -> None:
        for key in list(self._buffers):  # _write puts a split's pending tokens before its traces
            self._write(key)

    def _write(self, key: tuple[str, str, str, int | None]) -> None:
        table, dataset, split, epoch = key
        if table != "tokens" and ("tokens", dataset, split, None) in self._buffers:
            self._write(("tokens", dataset, split, None))
        parts = self._buffers.pop(key, [])
        self._rows.pop(key, None)
        if not parts:
            return
        directory = self._dir(table, dataset, split)
        if table == "tokens":
            first = int(parts[0].column("token_idx")[0].as_py())
            write_table_atomic(compact_dictionaries(pa.concat_tables(parts)),
                               directory / f"part-t{first:09d}-{uuid.uuid4().hex[:8]}.parquet")
            return
        first_step = int(parts[0].column("step")[0].as_py())
        path = self._dir(table, dataset, split, epoch) / f"part-{first_step:09d}-{uuid.uuid4().hex[:8]}.parquet"
        write_table_atomic(pa.concat_tables(parts), path)

    def _dir(self, table: str, dataset: str, split: str, epoch: int | None = None) -> Path:
        """table/dataset=D/split=S[/epoch=E][/ddp_rank=R]: the hive partition of this process's part files."""
        d = self.run_dir / table / f"dataset={dataset}" / f"split={split}"
        if epoch is not None:
            d = d / f"epoch={epoch}"
        return d / f"ddp_rank={self.ddp_rank}" if self.ddp_rank is not None else d


def compact_dictionaries(table: pa.Table) -> pa.Table:
    """`table` with each dictionary column keeping only the values its rows use, in their order, with the same
    index type. A slice or take of a split's token table otherwise carries its whole dictionary (the vocabulary,
    ~170 KB) into every tokens part file. Same rows, same Arrow types, same schema metadata."""
    table = table.unify_dictionaries().combine_chunks()
    cols = []
    for col in table.columns:
        if not pa.types.is_dictionary(col.type) or col.num_chunks == 0 or len(col.chunk(0).dictionary) == 0:
            cols.append(col)
            continue
        arr = col.chunk(0)  # (n,) DictionaryArray
        idx = arr.indices.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (n,), 0 at nulls
        valid = arr.indices.is_valid().to_numpy(zero_copy_only=False)  # (n,)
        used = np.unique(idx[valid]).astype(np.int64)  # (u,) ascending: the dictionary's own order
        remap = np.zeros(len(arr.dictionary), dtype=np.int64)  # (d,)
        remap[used] = np.arange(len(used))
        new_idx = pa.array(remap[idx], type=arr.indices.type, mask=~valid)
        cols.append(pa.DictionaryArray.from_arrays(new_idx, arr.dictionary.take(pa.array(used)), ordered=arr.type.ordered))
    return pa.Table.from_arrays(cols, schema=table.schema)


_KNOWN = ("token_idx", "expert", "gate", "entropy", "dropped", "probs", "hidden")


def routing_rows(a: dict[str, np.ndarray], step: int, layer: int) -> pa.Table:
    """One row per (token, slot) with an expert: (n, s) routing -> columns of docs/traces.md. Any other (n,)
    array of `a` (a captured run's word_idx, subword, shared_gate) becomes a column repeated on each slot."""
    expert = a["expert"]  # (n, s)
    n, s = expert.shape
    valid = (expert >= 0).reshape(-1)  # (n*s,) expert_choice leaves empty slots
    dropped = a["dropped"].reshape(-1) if "dropped" in a else np.zeros(n * s, dtype=bool)
    cols = {
        "step": np.full(n * s, step, dtype=np.int64),
        "token_idx": np.repeat(a["token_idx"].astype(np.int64), s),
        "layer": np.full(n * s, layer, dtype=np.int16),
        "rank": np.tile(np.arange(s, dtype=np.int8), n),
        "expert": expert.reshape(-1).astype(np.int16),
        "gate": a["gate"].reshape(-1).astype(np.float32),
        "entropy": np.repeat(a["entropy"].astype(np.float32), s),
        "dropped": dropped,
    }
    cols |= {k: np.repeat(v, s) for k, v in a.items() if k not in _KNOWN}
    return pa.table({k: v[valid] for k, v in cols.items()})


def _list_rows(token_idx: np.ndarray, step: int, layer: int, name: str, values: np.ndarray) -> pa.Table:
    n, width = values.shape
    flat = pa.array(values.astype(np.float32).reshape(-1))
    return pa.table({
        "step": np.full(n, step, dtype=np.int64),
        "token_idx": token_idx.astype(np.int64),
        "layer": np.full(n, layer, dtype=np.int16),
        name: pa.FixedSizeListArray.from_arrays(flat, width).cast(pa.list_(pa.float32())),
    })


def clear_partition(run_dir: Path, dataset: str, split: str, epoch: int) -> None:
    """Delete one (dataset, split, epoch) partition of every trace table (every rank's) before it is recorded again."""
    for table in TRACE_TABLES:
        part = run_dir / table / f"dataset={dataset}" / f"split={split}" / f"epoch={epoch}"
        if part.is_dir():
            shutil.rmtree(part)
