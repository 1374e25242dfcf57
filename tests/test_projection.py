"""moe_lens.projection: PCA against an independent eigendecomposition, the Parquet cache, and (slow) a real UMAP."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moe_lens import projection, store
from moe_lens.synthetic import write_synthetic_run


def test_pca_matches_covariance_eigenvectors() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))  # (n, d), correlated
    xy = projection.pca(x)  # (n, 2)
    assert xy.shape == (500, 2)
    w, v = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))  # ascending eigenvalues
    ref = (x - x.mean(0)) @ v[:, ::-1][:, :2]
    for j in range(2):  # equal up to the sign of each axis
        assert np.allclose(np.abs(np.corrcoef(xy[:, j], ref[:, j])[0, 1]), 1.0, atol=1e-5)
        assert np.isclose(xy[:, j].var(), w[::-1][j], rtol=1e-4)
    assert np.array_equal(projection.pca(x), xy)  # deterministic signs
    assert projection.pca(x[:1]).shape == (1, 2)  # rank below 2: zero-padded


def _run(tmp_path: Path) -> tuple[Path, dict]:
    write_synthetic_run(tmp_path, "r", num_tokens=800, with_hidden=True, d_model=16)
    con = store.connect(tmp_path)
    k = projection.hidden_keys(con, "r")
    assert list(k.columns) == ["dataset", "split", "epoch", "layer"] and len(k) == 4  # 2 splits x 2 epochs
    return tmp_path / "r", dict(dataset="wikitext2", split="valid", epoch=1, layer=0)


def test_project_caches_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOE_LENS_CACHE", str(cache))
    run_dir, key = _run(tmp_path)
    con = store.connect(tmp_path)
    x, labels = projection.hidden_sample(con, "r", **key)
    assert x.shape == (len(labels), 16) and labels["expert"].notna().all()  # valid: routed at the hidden step
    df = projection.project(con, run_dir, **key, method="pca")
    path = projection.cache_path(run_dir, **key, method="pca")
    assert path.exists() and str(path).startswith(str(cache / "projections"))
    assert not (run_dir / "projections").exists()  # the run directory is never written
    assert np.allclose(df[["x", "y"]].to_numpy(), projection.pca(x))
    path.write_bytes(b"not parquet")  # a broken cache is recomputed, not an error
    assert projection.cached(run_dir, **key, method="pca") is None
    with pytest.raises(Exception, match="no hidden states"):
        projection.hidden_sample(con, "r", **{**key, "epoch": 9})


def test_read_only_runs_dir_projects_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MOE_LENS_CACHE", str(cache))
    run_dir, key = _run(tmp_path)
    con = store.connect(tmp_path)
    x, _ = projection.hidden_sample(con, "r", **key)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if cache not in p.parents)
    for p in [run_dir, *run_dir.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    try:
        df = projection.project(con, run_dir, **key, method="pca")
    finally:
        for p in [run_dir, *run_dir.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
    assert np.allclose(df[["x", "y"]].to_numpy(), projection.pca(x))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if cache not in p.parents and p != cache) == before
    written = list((cache / "projections").rglob("pca.parquet"))
    assert len(written) == 1 and written[0] == projection.cache_path(run_dir, **key, method="pca")


def test_projection_shipped_in_the_run_is_read_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))
    run_dir, key = _run(tmp_path)
    con = store.connect(tmp_path)
    shipped = projection.project(con, run_dir, **key, method="pca", into_run=True)
    assert projection.run_cache_path(run_dir, **key, method="pca").exists()
    monkeypatch.setattr(projection, "compute", lambda *a, **k: pytest.fail("recomputed although shipped"))
    assert projection.project(con, run_dir, **key, method="pca").equals(shipped)
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_umap_projection_for_real(tmp_path: Path) -> None:
    run_dir, key = _run(tmp_path)
    df = projection.project(store.connect(tmp_path), run_dir, **key, method="umap")
    assert np.isfinite(df[["x", "y"]].to_numpy()).all() and len(df) == 800
    assert projection.cache_path(run_dir, **key, method="umap").exists()
