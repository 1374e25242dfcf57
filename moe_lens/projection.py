"""2-D projections of the recorded hidden states (PCA, and UMAP after PCA), cached as Parquet in the run.

The `hidden` table holds a fixed sample of hidden states entering the MoE layer (list<float32> of length
d_model) per (dataset, split, epoch, layer). `project` turns one such sample into 2-D coordinates with the
labels the app colours by: the token's top-1 `expert` and its `gate`, `pos_tag`, `freq_band`, `token`.

    PCA: centre X (n, d), thin SVD X = U S V^T, coordinates X V[:, :2] (Pearson 1901; numpy SVD).
    UMAP: PCA to min(50, d) dimensions first, then UMAP to 2 (McInnes et al. 2018), seeded.

Results are written once to the cache directory (`$MOE_LENS_CACHE`, else `~/.cache/moe-lens`), under
`projections/<run>-<hash of the run's absolute path>/dataset=D/split=S/epoch=E/layer=L/<method>.parquet`
(temporary name, then rename), so a reload reads a small file and a read-only runs directory is never
written. A projection already inside the run (`<run>/projections/...`, as the committed sample runs carry
them: `save(..., into_run=True)`) is read first. `umap` is imported only when a UMAP
projection is computed: its numba JIT costs ~45 s in a fresh process, and the PCA path needs none of it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moe_lens.data.paths import resolve_cache_dir
from moe_lens.errors import MoeLensError

METHODS = ("pca", "umap")
LABELS = ["token_idx", "expert", "gate", "pos_tag", "freq_band", "token"]

_KEYS_SQL = """
SELECT DISTINCT dataset, split, epoch, layer FROM hidden WHERE run = $run ORDER BY dataset, split, epoch, layer
"""
# One row per sampled token: its hidden state, its rank-0 routing at the same step, its annotations.
_SAMPLE_SQL = """
SELECT h.token_idx, r.expert, r.gate, t.pos_tag, t.freq_band, t.token, h.hidden
FROM hidden h
LEFT JOIN routing r ON r.run = h.run AND r.dataset = h.dataset AND r.split = h.split AND r.epoch = h.epoch
     AND r.layer = h.layer AND r.step = h.step AND r.token_idx = h.token_idx AND r.rank = 0
LEFT JOIN tokens t ON t.run = h.run AND t.dataset = h.dataset AND t.split = h.split AND t.token_idx = h.token_idx
WHERE h.run = $run AND h.dataset = $dataset AND h.split = $split AND h.epoch = $epoch AND h.layer = $layer
ORDER BY h.token_idx
"""


def hidden_keys(con: duckdb.DuckDBPyConnection, run: str) -> pd.DataFrame:
    """The (dataset, split, epoch, layer) combinations with recorded hidden states for `run` (maybe empty)."""
    return con.execute(_KEYS_SQL, {"run": run}).df()


def hidden_sample(con: duckdb.DuckDBPyConnection, run: str, *, dataset: str, split: str, epoch: int,
                  layer: int = 0) -> tuple[np.ndarray, pd.DataFrame]:
    """X (n, d) float32 and the n rows of LABELS for one recorded sample; MoeLensError if there is none."""
    df = con.execute(_SAMPLE_SQL, dict(run=run, dataset=dataset, split=split, epoch=epoch, layer=layer)).df()
    if df.empty:
        raise MoeLensError(f"no hidden states for run {run!r}, {dataset}/{split}, epoch {epoch}, layer {layer}")
    lengths = df["hidden"].map(len)
    if lengths.nunique() != 1:
        raise MoeLensError(f"hidden states of run {run!r} have mixed lengths {sorted(lengths.unique())[:5]}")
    x = np.stack(df["hidden"].to_numpy()).astype(np.float32)  # (n, d)
    return x, df[LABELS].reset_index(drop=True)


def pca(x: np.ndarray, dim: int = 2) -> np.ndarray:
    """(n, d) -> (n, dim): centred data on its top principal axes (thin SVD); zero columns pad dim > rank."""
    xc = x.astype(np.float64) - x.mean(axis=0, keepdims=True)  # (n, d)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)  # vt (min(n, d), d)
    out = xc @ vt[:dim].T  # (n, <=dim)
    if out.shape[1] < dim:
        out = np.pad(out, ((0, 0), (0, dim - out.shape[1])))
    # SVD signs are arbitrary: make the largest-magnitude coordinate of each axis positive, so reruns agree
    flip = np.sign(out[np.abs(out).argmax(axis=0), np.arange(dim)])
    return (out * np.where(flip == 0, 1.0, flip)).astype(np.float32)


def umap_2d(x: np.ndarray, *, pca_dim: int = 50, seed: int = 0) -> np.ndarray:
    """(n, d) -> (n, 2): PCA to min(pca_dim, d, n) dimensions, then UMAP (imported here, lazily)."""
    import umap  # numba JIT: ~45 s the first time in a process

    z = pca(x, min(pca_dim, x.shape[1], x.shape[0]))
    n_neighbors = max(2, min(15, len(x) - 1))
    return umap.UMAP(n_components=2, n_neighbors=n_neighbors, random_state=seed).fit_transform(z).astype(np.float32)


def _key_path(*, dataset: str, split: str, epoch: int, layer: int, method: str) -> Path:
    return Path(f"dataset={dataset}") / f"split={split}" / f"epoch={epoch}" / f"layer={layer}" / f"{method}.parquet"


def run_cache_path(run_dir: str | Path, **key) -> Path:
    """Where a projection shipped inside its run directory lives (read, written only with into_run=True)."""
    return Path(run_dir) / "projections" / _key_path(**key)


def cache_path(run_dir: str | Path, **key) -> Path:
    """Where the projection of one sample is cached in the cache directory (one folder per run path)."""
    run_dir = Path(run_dir).resolve()
    tag = hashlib.sha256(str(run_dir).encode()).hexdigest()[:12]
    return resolve_cache_dir("projections") / f"{run_dir.name}-{tag}" / _key_path(**key)


def cached(run_dir: str | Path, **key) -> pd.DataFrame | None:
    """The cached projection (in the run first, then the cache directory), or None when absent or unreadable."""
    for path in (run_cache_path(run_dir, **key), cache_path(run_dir, **key)):
        try:
            if path.exists():
                return pq.read_table(path).to_pandas()
        except (OSError, pa.ArrowInvalid):
            continue
    return None


def compute(x: np.ndarray, labels: pd.DataFrame, method: str) -> pd.DataFrame:
    """LABELS plus `x`, `y` for one sample; `method` is 'pca' or 'umap'."""
    if method not in METHODS:
        raise MoeLensError(f"unknown projection method {method!r}; allowed: {', '.join(METHODS)}")
    xy = pca(x) if method == "pca" else umap_2d(x)  # (n, 2)
    return labels.assign(x=xy[:, 0], y=xy[:, 1])


def save(df: pd.DataFrame, run_dir: str | Path, *, into_run: bool = False, **key) -> Path:
    """Write a projection to the cache directory, or into the run with `into_run` (temporary name, then rename)."""
    path = run_cache_path(run_dir, **key) if into_run else cache_path(run_dir, **key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def project(con: duckdb.DuckDBPyConnection, run_dir: str | Path, *, dataset: str, split: str, epoch: int,
            layer: int = 0, method: str = "pca", into_run: bool = False) -> pd.DataFrame:
    """The cached projection of one sample, computing and caching it first if needed (`into_run`: see save)."""
    key = dict(dataset=dataset, split=split, epoch=epoch, layer=layer, method=method)
    df = cached(run_dir, **key)
    if df is None:
        x, labels = hidden_sample(con, Path(run_dir).name, dataset=dataset, split=split, epoch=epoch, layer=layer)
        df = compute(x, labels, method)
        save(df, run_dir, into_run=into_run, **key)
    return df
