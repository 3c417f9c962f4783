"""Highly variable genes (seurat_v3 over experiments) and training on them.

The reference is a direct dense numpy implementation of scanpy's ``seurat_v3`` procedure
(``scanpy/preprocessing/_highly_variable_genes.py``, ``_highly_variable_genes_seurat_v3``)
with a naive loess: one weighted quadratic fit (``np.polyfit``) per point over its
``floor(0.3 n)`` nearest neighbours.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import make_adata
from mars_scale.cli import main
from mars_scale.config import RunConfig, TrainConfig
from mars_scale.errors import ConfigError, InputError
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.model import Mars
from mars_scale.nn import ModelConfig
from mars_scale.preprocess import normalize_log1p
from mars_scale.stats import _loess_fit, highly_variable_genes
from mars_scale.store import open_store


def _naive_loess(x: np.ndarray, y: np.ndarray, span: float = 0.3) -> np.ndarray:
    n = len(x)
    q = int(np.floor(n * span))
    out = np.empty(n)
    for i in range(n):
        d = np.abs(x - x[i])
        near = np.argsort(d, kind="stable")[:q]
        dmax = d[near].max()
        w = (1 - (d[near] / dmax) ** 3) ** 3
        out[i] = np.polyfit(x[near] - x[i], y[near], 2, w=np.sqrt(w))[-1]
    return out


def _dense_seurat_v3(counts: np.ndarray, batch: np.ndarray, n_top: int) -> pd.DataFrame:
    """scanpy's seurat_v3 on a dense matrix, step by step."""
    norm_vars = []
    for b in pd.unique(batch):
        x = counts[batch == b].astype(np.float64)
        n = x.shape[0]
        mean, var = x.mean(0), x.var(0, ddof=1)
        not_const = var > 0
        est = np.zeros(x.shape[1])
        est[not_const] = _naive_loess(np.log10(mean[not_const]), np.log10(var[not_const]))
        reg_std = np.sqrt(10**est)
        clipped = np.minimum(x, reg_std * np.sqrt(n) + mean)
        norm_vars.append((n * mean**2 + (clipped**2).sum(0) - 2 * clipped.sum(0) * mean) / ((n - 1) * reg_std**2))
    norm_vars = np.stack(norm_vars)
    ranked = np.argsort(np.argsort(-norm_vars, axis=1, kind="stable"), axis=1, kind="stable").astype(float)
    nbatches = (ranked < n_top).sum(0)
    ranked[ranked >= n_top] = np.nan
    rank = np.ma.median(np.ma.masked_invalid(ranked), axis=0).filled(np.nan)
    df = pd.DataFrame({"rank": rank, "nbatches": nbatches, "variances_norm": norm_vars.mean(0)})
    order = df.sort_values(["rank", "nbatches"], ascending=[True, False], na_position="last", kind="stable").index
    df["highly_variable"] = False
    df.loc[order[:n_top], "highly_variable"] = True
    return df


@pytest.fixture
def counts_store(tmp_path):
    adata = make_adata(240, 150, n_experiments=3, seed=5)
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    store = ingest([path], tmp_path / "atlas.zarr",
                   config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))
    return store


def test_hvg_matches_a_dense_seurat_v3_reference(counts_store):
    store = open_store(counts_store)
    x = store.read_rows(0, store.n_cells).toarray().astype(np.float64)
    batch = np.asarray(store.obs_column("experiment")).astype(str)
    ref = _dense_seurat_v3(x, batch, 40)
    hvg = highly_variable_genes(store, n_top_genes=40, rows_per_block=37)  # blocks cut experiments
    np.testing.assert_array_equal(hvg.index, np.flatnonzero(ref["highly_variable"]))
    np.testing.assert_allclose(hvg.variances_norm, ref["variances_norm"], rtol=1e-6)
    np.testing.assert_array_equal(hvg.highly_variable_nbatches, ref["nbatches"])
    np.testing.assert_allclose(hvg.highly_variable_rank, ref["rank"], equal_nan=True)
    np.testing.assert_allclose(hvg.means, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(hvg.variances, x.var(0, ddof=1), rtol=1e-6)
    assert hvg.experiments == tuple(store.experiments)


def test_loess_interpolation_stays_close_to_the_direct_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=600)
    y = np.sin(x) + 0.3 * x**2 + rng.normal(scale=0.2, size=600)
    direct = _naive_loess(x, y)
    np.testing.assert_allclose(_loess_fit(x, y, span=0.3), direct, atol=1e-8)  # every value a vertex
    np.testing.assert_allclose(_loess_fit(x, y, span=0.3, n_vertices=128), direct, atol=5e-3)


@pytest.mark.skipif(importlib.util.find_spec("scanpy") is None or importlib.util.find_spec("skmisc") is None,
                    reason="scanpy and scikit-misc are not installed (optional cross-check)")
def test_hvg_agrees_with_scanpy(counts_store):  # pragma: no cover - optional
    import anndata as ad
    import scanpy as sc

    adata = ad.read_zarr(counts_store)
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=40, batch_key="experiment")
    ours = highly_variable_genes(open_store(counts_store), n_top_genes=40)
    theirs = np.flatnonzero(adata.var["highly_variable"].to_numpy())
    assert len(np.intersect1d(ours.index, theirs)) >= 38  # skmisc interpolates its loess


def test_hvg_bad_input(counts_store, tmp_path):
    store = open_store(counts_store)
    with pytest.raises(ConfigError, match="n_top_genes must be a positive integer"):
        highly_variable_genes(store, n_top_genes=0)
    with pytest.raises(ConfigError, match="train.n_top_genes must be >= 1"):
        TrainConfig(n_top_genes=0)
    adata = make_adata(60, 30, n_experiments=2, seed=1)
    adata.X.data = np.log1p(adata.X.data) + 0.37  # log-normalised values
    adata.write_h5ad(tmp_path / "lognorm.h5ad")
    lognorm = ingest([tmp_path / "lognorm.h5ad"], tmp_path / "lognorm.zarr",
                     config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))
    with pytest.raises(InputError, match="needs raw counts|selects genes from raw counts"):
        highly_variable_genes(open_store(lognorm), n_top_genes=10)


TINY = RunConfig(
    model=ModelConfig(hidden=(32,), n_latent=8),
    train=TrainConfig(pretrain_epochs=2, finetune_epochs=2, batch_size=512, min_steps_per_epoch=2, seed=3,
                      device="cpu", n_top_genes=40),
)


def test_model_trains_and_annotates_on_the_recorded_genes(counts_store, tmp_path):
    store = open_store(counts_store)
    model = Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "run")
    genes = highly_variable_genes(store, n_top_genes=40).index
    np.testing.assert_array_equal(model.state["gene_index"].numpy(), genes)
    shapes = [tuple(v.shape) for v in model.state["model"].values() if v.ndim == 2]
    assert any(40 in s for s in shapes) and not any(store.n_genes in s for s in shapes), shapes
    model.save(tmp_path / "run")
    loaded = Mars.load(tmp_path / "run", counts_store)
    np.testing.assert_array_equal(loaded.encoder.gene_index, genes)
    idx, z = loaded.embed(experiments=["exp0"])
    # the encoder by hand on the chosen columns of cells normalised over all their genes
    a, b = store.experiment_ranges["exp0"]
    block = store.read_rows(a, b)
    values = normalize_log1p(block.indptr, block.indices, block.data, target_sum=1e4, kind="counts",
                             dtype=np.float32)
    block.data = values
    sub = block[:, genes].tocsr()
    sub.sort_indices()
    x = torch.sparse_csr_tensor(torch.from_numpy(sub.indptr.astype(np.int64)), torch.from_numpy(sub.indices.astype(np.int64)),
                                torch.from_numpy(sub.data), size=sub.shape)
    with torch.no_grad():
        expected = loaded.encoder(x).numpy()
    np.testing.assert_array_equal(idx, np.arange(a, b))
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-5)
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"n_genes": 40' in summary


def test_train_cli_n_top_genes(counts_store, tmp_path):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nhidden = [16]\nn_latent = 4\n[train]\npretrain_epochs = 1\nfinetune_epochs = 1\n")
    args = ["train", str(counts_store), "--unannotated", "exp1", "--n-clusters", "3", "--config", str(cfg),
            "--device", "cpu"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "run"), "--n-top-genes", "25"])
    assert r.exit_code == 0, r.output
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=False)
    assert len(state["gene_index"]) == 25 and state["config"]["train"]["n_top_genes"] == 25
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "bad"), "--n-top-genes", "0"])
    assert r.exit_code == 2 and "n_top_genes must be >= 1" in r.stderr
    r = CliRunner().invoke(main, ["train", "--help"])
    assert "--n-top-genes" in r.output and "default: 25" in r.output


def test_stored_count_sums_match_x_and_a_store_without_them_gives_the_same_genes(counts_store, tmp_path):
    import shutil

    from mars_scale.stats import _count_sums, _stored_count_sums

    store = open_store(counts_store)
    names = list(store.experiments)
    stored = _stored_count_sums(store, names)
    read = _count_sums(store, [store.experiment_ranges[n] for n in names], rows_per_block=50)
    for (s1, s2), (r1, r2) in zip(stored, read):
        np.testing.assert_allclose(s1, r1, rtol=1e-12)
        np.testing.assert_allclose(s2, r2, rtol=1e-12)
    older = tmp_path / "older.zarr"  # as ingested before the sums were kept
    shutil.copytree(counts_store, older)
    for name in ("mars_counts_sum", "mars_counts_sumsq"):
        shutil.rmtree(older / "varm" / name)
    assert _stored_count_sums(open_store(older), names) is None
    np.testing.assert_array_equal(highly_variable_genes(open_store(older), n_top_genes=40).index,
                                  highly_variable_genes(store, n_top_genes=40).index)
