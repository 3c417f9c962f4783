"""Ingest: the store matches the input and a dense reference of its statistics."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from conftest import make_adata, shared_file
from mars_scale.errors import ConfigError, InputError, StoreError
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.stats import compute_stats
from mars_scale.store import SPEC_VERSION, StoreLayout, open_store


def dense_reference(adata: ad.AnnData, *, min_cells: int = 5):
    """Filter genes, normalise to 1e4, log1p, per-gene mean and std (numpy, dense)."""
    x = np.asarray(adata.X.toarray() if sp.issparse(adata.X) else adata.X, dtype=np.float64)
    keep = (x > 0).sum(axis=0) >= min_cells
    x = x[:, keep]
    totals = x.sum(axis=1, keepdims=True)
    y = np.log1p(x / np.where(totals > 0, totals, 1) * 1e4)
    return keep, x, y.mean(axis=0), y.std(axis=0, ddof=1)


@pytest.mark.parametrize(
    "name",
    [
        "mesc_kolodziejczyk2015_mini.h5ad",
        "pancreas_3studies_beta_ductal_mini.h5ad",
        "cellbench_3cl_3protocols_panel.h5ad",
        "cellbench_celseq2_dropseq.h5ad",
    ],
)
def test_real_data_roundtrip_and_stats(tmp_path, name):
    src = shared_file(name)
    out = ingest(
        [src], tmp_path / "a.zarr",
        config=IngestConfig(experiment_key="experiment", label_key="cell_type"),
    )
    store = ad.read_zarr(out)  # anndata opens it
    adata = ad.read_h5ad(src)
    keep, x, mean, std = dense_reference(adata)
    assert list(store.var_names) == list(adata.var_names[keep])
    ref = adata[store.obs_names, store.var_names]
    assert (store.X != ref.X).nnz == 0  # the counts read back exactly
    assert sp.issparse(store.X) and store.X.format == "csr"
    np.testing.assert_array_equal(
        store.obs["cell_type"].astype(str).values, ref.obs["cell_type"].astype(str).values
    )
    np.testing.assert_allclose(store.var["mean"].values, mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(store.var["std"].values, std, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(store.var["n_cells"].values, (x > 0).sum(axis=0))
    np.testing.assert_allclose(store.obs["n_counts"].values, ref.X.sum(axis=1).A1, rtol=1e-6)
    atlas = open_store(out)
    assert atlas.spec_version == SPEC_VERSION
    # cells are grouped by experiment and the ranges say where
    for exp, (a, b) in atlas.experiment_ranges.items():
        assert (store.obs["experiment"].iloc[a:b] == exp).all()
        assert b - a == (adata.obs["experiment"] == exp).sum()
    # the kind of values is recorded per experiment: pancreas batch_5 holds expected counts
    kinds = dict(zip(atlas.experiments, atlas.meta["experiment_kinds"]))
    for exp in atlas.experiments:
        x = ref[(ref.obs["experiment"] == exp).to_numpy()].X.data
        assert kinds[exp] == ("counts" if np.all(x == np.floor(x)) else "noninteger_counts")
    if name.startswith("pancreas"):
        assert kinds == {"batch_1": "counts", "batch_4": "counts", "batch_5": "noninteger_counts"}


def test_interleaved_experiments_are_grouped(tmp_path):
    adata = make_adata(400, 60, n_experiments=3, seed=1)
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()  # interleave
    path = tmp_path / "mixed.h5ad"
    adata.write_h5ad(path)
    out = ingest(
        [path], tmp_path / "a.zarr", config=IngestConfig(experiment_key="experiment", label_key="cell_type")
    )
    store = ad.read_zarr(out)
    atlas = open_store(out)
    exps = store.obs["experiment"].astype(str).values
    assert (exps[:-1] <= exps[1:]).all() or len(set(zip(exps[:-1], exps[1:]))) <= 3
    for exp, (a, b) in atlas.experiment_ranges.items():
        assert (exps[a:b] == exp).all()
    ref = adata[store.obs_names, store.var_names]
    np.testing.assert_array_equal(store.X.toarray(), ref.X.toarray())


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_input_layouts_give_the_same_store(tmp_path, layout, dtype):
    adata = make_adata(200, 50, seed=2)
    reference = ingest([_write(tmp_path / "ref.h5ad", adata)], tmp_path / "ref.zarr")
    x = adata.X.astype(dtype)
    adata.X = {"csr": x.tocsr(), "csc": x.tocsc(), "dense": x.toarray()}[layout]
    out = ingest([_write(tmp_path / "ref2.h5ad", adata)], tmp_path / "b.zarr")
    a, b = ad.read_zarr(reference), ad.read_zarr(out)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(a.var["std"].values, b.var["std"].values)


def _write(path, adata):
    adata.write_h5ad(path)
    return path


def test_files_are_experiments_and_genes_align(tmp_path):
    a = make_adata(100, 40, seed=3)
    b = make_adata(120, 40, seed=4)
    b.var_names = [f"gene{j + 10}" for j in range(40)]  # genes 10..49
    pa, pb = _write(tmp_path / "donorA.h5ad", a), _write(tmp_path / "donorB.h5ad", b)
    inter = open_store(ingest([pa, pb], tmp_path / "i.zarr", config=IngestConfig(min_cells=0)))
    union = open_store(ingest([pa, pb], tmp_path / "u.zarr", config=IngestConfig(min_cells=0, genes="union")))
    assert inter.experiments == ["donorA", "donorB"]
    assert inter.experiment_ranges == {"donorA": (0, 100), "donorB": (100, 220)}
    assert list(inter.gene_ids) == [f"gene{j}" for j in range(10, 40)]
    assert list(union.gene_ids) == [f"gene{j}" for j in range(50)]
    full = ad.read_zarr(union.path)
    # donorB has no gene0..9: zeros there
    assert full.X[100:, :10].nnz == 0
    np.testing.assert_array_equal(full.X[100:, 10:50].toarray(), b.X.toarray())
    # no labels given: everything unannotated
    assert inter.summary()["experiments"][0]["annotated_fraction"] == 0.0


def test_gene_key_and_layer(tmp_path):
    a = make_adata(80, 30, seed=5)
    a.var["symbol"] = [f"SYM{j}" for j in range(30)]
    a.layers["counts"] = a.X.copy()
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))
    p = _write(tmp_path / "a.h5ad", a)
    atlas = open_store(ingest([p], tmp_path / "a.zarr", config=IngestConfig(gene_key="symbol", layer="counts", min_cells=0)))
    assert list(atlas.gene_ids) == [f"SYM{j}" for j in range(30)]
    assert atlas.input_kind == "counts"
    np.testing.assert_array_equal(atlas.read_rows(0, 80).toarray(), a.layers["counts"].toarray())


def test_lognorm_input_is_detected(tmp_path):
    a = make_adata(80, 30, seed=6)
    x = a.X.toarray()
    a.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32))
    atlas = open_store(ingest([_write(tmp_path / "l.h5ad", a)], tmp_path / "l.zarr", config=IngestConfig(min_cells=0)))
    assert atlas.input_kind == "lognorm"
    store = ad.read_zarr(atlas.path)
    # statistics of lognorm stores are over the values as given
    np.testing.assert_allclose(store.var["mean"].values, a.X.toarray().mean(0), rtol=1e-6)


def test_lognorm_mixed_with_counts_is_refused(tmp_path):
    a = make_adata(50, 20, seed=7)
    b = a.copy()
    b.X = sp.csr_matrix(np.log1p(b.X.toarray()) + 0.01)
    with pytest.raises(InputError, match="log-normalised"):
        ingest([_write(tmp_path / "a.h5ad", a), _write(tmp_path / "b.h5ad", b)], tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_quality_filters(tmp_path):
    a = make_adata(100, 40, seed=8)
    x = a.X.toarray()
    x[:5] = 0
    x[:5, :2] = 1  # 5 cells with 2 counts in 2 genes
    x[:, 39] = 0
    x[7, 39] = 3  # a gene in a single cell
    a.X = sp.csr_matrix(x)
    atlas = open_store(
        ingest([_write(tmp_path / "q.h5ad", a)], tmp_path / "q.zarr", config=IngestConfig(min_genes=3, min_cells=2))
    )
    assert atlas.n_cells == 95
    assert "gene39" not in set(atlas.gene_ids)
    # the totals used for normalisation are over the kept genes
    store = ad.read_zarr(atlas.path)
    np.testing.assert_allclose(store.obs["n_counts"].values, store.X.sum(1).A1)


def test_overwrite_and_atomicity(tmp_path, small_h5ad):
    out = tmp_path / "a.zarr"
    ingest([small_h5ad], out)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputError, match="already exists"):
        ingest([small_h5ad], out)
    bad = make_adata(50, 120, seed=9)
    bad.X = bad.X.toarray()
    bad.X[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        ingest([small_h5ad, _write(tmp_path / "bad.h5ad", bad)], out, overwrite=True)
    # the failed overwrite left the old store alone and no temporary behind
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == sorted(before + ["bad.h5ad"])
    assert open_store(out).n_cells == 300
    ingest([small_h5ad], out, overwrite=True, config=IngestConfig(min_counts=1e9 * 0 + 50))
    assert open_store(out).n_cells < 300


def test_zarr_v2_layout_reads_the_same(tmp_path, small_h5ad):
    v3 = open_store(ingest([small_h5ad], tmp_path / "v3.zarr"))
    v2 = open_store(ingest([small_h5ad], tmp_path / "v2.zarr", config=IngestConfig(layout=StoreLayout(zarr_format=2, rows_per_chunk=64))))
    assert v2.root.metadata.zarr_format == 2
    np.testing.assert_array_equal(v2.read_rows(10, 250).toarray(), v3.read_rows(10, 250).toarray())
    assert ad.read_zarr(v2.path).n_obs == 300


def test_compute_stats_matches_ingest(tmp_path, small_store):
    atlas = open_store(small_store)
    moments = compute_stats(atlas, rows_per_block=37)
    np.testing.assert_allclose(moments.mean, atlas.var_column("mean"), rtol=1e-12)
    np.testing.assert_allclose(moments.std, atlas.var_column("std"), rtol=1e-10)
    np.testing.assert_array_equal(moments.n_cells, atlas.var_column("n_cells"))


def test_compute_stats_on_dask_distributed_matches_exactly(small_store):
    distributed = pytest.importorskip("distributed")
    atlas = open_store(small_store)
    local = compute_stats(atlas, rows_per_block=50)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            remote = compute_stats(atlas, rows_per_block=50, client=client)
    np.testing.assert_array_equal(local.mean, remote.mean)
    np.testing.assert_array_equal(local.m2, remote.m2)


def test_open_store_refuses_other_versions(tmp_path, small_store):
    root = zarr.open_group(small_store, mode="r+")
    spec = dict(root.attrs["mars-scale"])
    root.attrs["mars-scale"] = {**spec, "encoding-version": "9.0.0"}
    with pytest.raises(StoreError, match="upgrade mars_scale"):
        open_store(small_store)
    root.attrs["mars-scale"] = {**spec, "encoding-version": "0.0.1"}
    with pytest.raises(StoreError, match="not supported"):
        open_store(small_store)
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "nothing.zarr")


def test_info_summary(small_store):
    s = open_store(small_store).summary()
    adata = make_adata()
    assert s["n_cells"] == 300 and len(s["experiments"]) == 3
    counts = adata.obs.groupby("experiment", observed=True).size()
    assert {e["name"]: e["n_cells"] for e in s["experiments"]} == counts.to_dict()
    exp0 = adata.obs[adata.obs.experiment == "exp0"].cell_type.value_counts()
    assert s["experiments"][0]["cell_types"] == {k: int(v) for k, v in exp0.items() if v}
    assert s["nnz"] == ad.read_zarr(small_store).X.nnz


# -- metadata carried over, unlabelled values, layer hint, AnnData .zarr inputs (issue 18) ---------


def _with_metadata(adata: ad.AnnData, seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    n = adata.n_obs
    adata.obs["singlet"] = rng.random(n) < 0.7
    adata.obs["wells"] = rng.integers(1, 3, n).astype(np.int64)
    adata.obs["score"] = np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n))
    adata.obs["barcode"] = [f"bc{seed}_{i}" for i in range(n)]
    adata.obs["donor"] = pd.Categorical(rng.choice(["d1", "d2", f"d{seed + 3}"], n))
    adata.obs["n_genes"] = 7  # a name of the store's own: kept as n_genes_input
    adata.var["symbol"] = [f"SYM{j}" for j in range(adata.n_vars)]
    adata.var["chromosome"] = pd.Categorical(rng.choice(["1", "2", "X"], adata.n_vars))
    adata.var["length"] = rng.integers(100, 5000, adata.n_vars)
    return adata


def test_obs_and_var_columns_are_carried_over_with_their_types(tmp_path):
    a = _with_metadata(make_adata(150, 40, n_experiments=2, seed=1), 1)
    b = _with_metadata(make_adata(120, 40, n_experiments=2, seed=2), 2)
    del b.obs["score"]  # missing from one file: missing values there
    b.obs["experiment"] = pd.Categorical(np.where(b.obs["experiment"] == "exp0", "exp1", "exp0"))  # interleaved
    a.X[:5] = 0  # dropped by the cell filter
    a.write_h5ad(tmp_path / "a.h5ad")
    b.write_h5ad(tmp_path / "b.h5ad")
    out = ingest([tmp_path / "a.h5ad", tmp_path / "b.h5ad"], tmp_path / "s.zarr",
                 config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))
    stored = ad.read_zarr(out)
    # the reference: anndata's outer concatenation, filtered cells dropped, grouped by experiment
    ref = ad.concat([a, b], join="outer")
    ref.obs_names_make_unique()
    ref.obs.index = list(a.obs_names) + list(b.obs_names)
    ref = ref[np.asarray(ref.X.sum(1)).ravel() > 0]
    ref = ref[np.argsort(ref.obs["experiment"].astype(str).to_numpy(), kind="stable")]
    assert list(stored.obs_names) == list(ref.obs_names)
    assert stored.obs["singlet"].dtype == bool and stored.obs["wells"].dtype == np.int64
    assert stored.obs["score"].dtype == np.float64 and isinstance(stored.obs["donor"].dtype, pd.CategoricalDtype)
    for col in ("singlet", "wells", "barcode", "donor"):
        np.testing.assert_array_equal(stored.obs[col].astype(str).to_numpy(), ref.obs[col].astype(str).to_numpy())
    np.testing.assert_array_equal(stored.obs["score"].to_numpy(), ref.obs["score"].astype(float).to_numpy())
    assert stored.obs["score"].isna().sum() == ref.obs["score"].isna().sum() >= len(b.obs) - 5
    assert set(stored.obs["donor"].cat.categories) == {"d1", "d2", "d4", "d5"}
    assert (stored.obs["n_genes_input"] == 7).all() and (stored.obs["n_genes"] > 0).all()
    assert "experiment" in stored.obs and "cell_type" in stored.obs
    # var: the first file's values for the genes kept
    np.testing.assert_array_equal(stored.var["symbol"].to_numpy(), a.var.loc[stored.var_names, "symbol"].to_numpy())
    np.testing.assert_array_equal(stored.var["length"].to_numpy(), a.var.loc[stored.var_names, "length"].to_numpy())
    assert stored.var["length"].dtype == np.int64 and isinstance(stored.var["chromosome"].dtype, pd.CategoricalDtype)
    assert open_store(out).n_cells == stored.n_obs  # the store still opens
    # per-experiment count sums for gene selection, from the interleaved input
    x = np.asarray(ref[:, stored.var_names].X.toarray(), dtype=np.float64)
    for e, name in enumerate(open_store(out).experiments):
        rows = (ref.obs["experiment"] == name).to_numpy()
        np.testing.assert_allclose(stored.varm["mars_counts_sum"][:, e], x[rows].sum(0))
        np.testing.assert_allclose(stored.varm["mars_counts_sumsq"][:, e], (x[rows] ** 2).sum(0))


def test_real_data_obs_columns_round_trip(tmp_path):
    src = shared_file("cellbench_celseq2_dropseq.h5ad")
    out = ingest([src], tmp_path / "s.zarr", config=IngestConfig(experiment_key="experiment", label_key="cell_type"))
    stored, source = ad.read_zarr(out), ad.read_h5ad(src)
    source = source[stored.obs_names]
    for col in ("singlet", "qc_outlier", "demuxlet_cls", "cell_line_annotation", "cells_sorted_per_well",
                "original_barcode"):
        assert stored.obs[col].dtype == source.obs[col].dtype, col
        np.testing.assert_array_equal(stored.obs[col].to_numpy(), source.obs[col].to_numpy())
    assert int(stored.obs["singlet"].sum()) == 1021
    np.testing.assert_array_equal(stored.var["n_experiments_present"].to_numpy(),
                                  source.var.loc[stored.var_names, "n_experiments_present"].to_numpy())


def test_unlabeled_values_mark_unannotated_cells(tmp_path):
    from click.testing import CliRunner

    from mars_scale.cli import main

    adata = make_adata(200, 40, n_experiments=2, seed=3)
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    labels[:10], labels[10:20], labels[20:25] = "Unknown", "NA", "doublet"
    adata.obs["cell_type"] = pd.Categorical(labels)
    adata.write_h5ad(tmp_path / "in.h5ad")
    out = ingest([tmp_path / "in.h5ad"], tmp_path / "s.zarr",
                 config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))
    store = open_store(out)
    assert "Unknown" not in store.cell_types and "NA" not in store.cell_types and "doublet" in store.cell_types
    codes, _ = store.categorical_codes("cell_type", 0, store.n_cells)
    assert int((codes < 0).sum()) == 20
    r = CliRunner().invoke(main, ["ingest", str(tmp_path / "in.h5ad"), "-o", str(tmp_path / "c.zarr"),
                                  "--experiment-key", "experiment", "--label-key", "cell_type", "--min-cells", "1",
                                  "--unlabeled-values", "doublet", "--unlabeled-values", "NA"])
    assert r.exit_code == 0, r.output
    store = open_store(tmp_path / "c.zarr")
    assert "doublet" not in store.cell_types and "Unknown" in store.cell_types and "NA" not in store.cell_types


def test_normalised_x_with_a_counts_layer_suggests_the_layer(tmp_path, caplog):
    adata = make_adata(100, 30, n_experiments=2, seed=4)
    adata.layers["counts"] = adata.X.copy()
    x = adata.X.copy()
    x.data = np.log1p(x.data * 1.7)
    adata.X = x
    adata.write_h5ad(tmp_path / "in.h5ad")
    with caplog.at_level("WARNING", logger="mars_scale.ingest"):
        ingest([tmp_path / "in.h5ad"], tmp_path / "s.zarr", config=IngestConfig(experiment_key="experiment"))
    assert "pass --layer counts" in caplog.text
    out = ingest([tmp_path / "in.h5ad"], tmp_path / "c.zarr", config=IngestConfig(experiment_key="experiment", layer="counts"))
    assert open_store(out).input_kind == "counts"


def test_anndata_zarr_inputs(tmp_path):
    adata = _with_metadata(make_adata(150, 40, n_experiments=2, seed=6), 6)
    adata.write_h5ad(tmp_path / "in.h5ad")
    adata.write_zarr(tmp_path / "in.zarr")
    config = IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1)
    from_h5ad = ad.read_zarr(ingest([tmp_path / "in.h5ad"], tmp_path / "a.zarr", config=config))
    from_zarr = ad.read_zarr(ingest([tmp_path / "in.zarr"], tmp_path / "b.zarr", config=config))
    assert (from_h5ad.X != from_zarr.X).nnz == 0
    pd.testing.assert_frame_equal(from_h5ad.obs, from_zarr.obs)
    pd.testing.assert_frame_equal(from_h5ad.var, from_zarr.var)
    (tmp_path / "plain").mkdir()
    with pytest.raises(InputError, match="plain: is a directory but not a zarr store"):
        ingest([tmp_path / "plain"], tmp_path / "c.zarr", config=config)


@pytest.mark.parametrize(
    "make",
    [lambda: StoreLayout(rows_per_chunk=0), lambda: StoreLayout(zarr_format=4),
     lambda: IngestConfig(genes="all"), lambda: IngestConfig(min_cells=-1)],
)
def test_option_errors_are_config_errors(make):
    with pytest.raises(ConfigError, match="must be"):
        make()
