"""Append experiments to a store (``ingest --append``) and ingest on a dask cluster (``--workers``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_adata, shared_file
from mars_scale.append import append
from mars_scale.cli import main
from mars_scale.errors import InputError
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.store import StoreLayout, open_store
from mars_scale.verify import verify_store

CONFIG = IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=0)


def _files(store: Path) -> dict[str, bytes]:
    return {p.relative_to(store).as_posix(): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p.name != ".mars-scale.lock"}


def _content(path: Path) -> dict:
    """What a reader sees: X, obs (as strings), var, varm and the experiments."""
    store = open_store(path)
    adata = ad.read_zarr(path)
    return {
        "X": store.read_rows(0, store.n_cells).toarray(),
        "obs": {c: adata.obs[c].astype(str).to_numpy() for c in adata.obs.columns},
        "obs_names": adata.obs_names.to_numpy(),
        "var": {c: adata.var[c].to_numpy() for c in ("n_cells", "mean", "std")},
        "genes": adata.var_names.to_numpy(),
        "varm": {k: np.asarray(v) for k, v in adata.varm.items()},
        "experiments": store.experiment_ranges,
    }


def _assert_same(a: dict, b: dict, *, rtol: float = 0.0) -> None:
    assert a["experiments"] == b["experiments"]
    np.testing.assert_array_equal(a["genes"], b["genes"])
    np.testing.assert_array_equal(a["X"], b["X"])
    np.testing.assert_array_equal(a["obs_names"], b["obs_names"])
    assert a["obs"].keys() == b["obs"].keys()
    for c in a["obs"]:
        np.testing.assert_array_equal(a["obs"][c], b["obs"][c], err_msg=c)
    np.testing.assert_array_equal(a["var"]["n_cells"], b["var"]["n_cells"])
    for c in ("mean", "std"):
        np.testing.assert_allclose(a["var"][c], b["var"][c], rtol=rtol, atol=0, err_msg=c)
    assert a["varm"].keys() == b["varm"].keys()
    for k in a["varm"]:
        np.testing.assert_array_equal(a["varm"][k], b["varm"][k])


@pytest.fixture(scope="module")
def panel_parts(tmp_path_factory):
    """The real 3-protocol panel split in two files: A (10x, CEL-seq2) and B (Drop-seq)."""
    d = tmp_path_factory.mktemp("panel")
    adata = ad.read_h5ad(shared_file("cellbench_3cl_3protocols_panel.h5ad"))
    in_b = (adata.obs["experiment"] == "Dropseq").to_numpy()
    assert (adata.X[~in_b] > 0).sum(axis=0).min() > 0  # every gene is in A: A alone keeps them all
    adata[~in_b].copy().write_h5ad(d / "A.h5ad")
    adata[in_b].copy().write_h5ad(d / "B.h5ad")
    return d / "A.h5ad", d / "B.h5ad"


def test_ingest_then_append_equals_ingest_together(tmp_path, panel_parts):
    a, b = panel_parts
    together = ingest([a, b], tmp_path / "ab.zarr", config=CONFIG)
    store = ingest([a], tmp_path / "a.zarr", config=CONFIG)
    result = append([b], store, config=CONFIG)
    assert result.experiments == {"Dropseq": 225} and result.absent_genes == {"Dropseq": 0}
    # the moments are merged exactly (Chan's update); only the order of float64 sums differs
    _assert_same(_content(together), _content(store), rtol=1e-12)
    assert verify_store(store).n_cells == 1394
    assert open_store(store).summary()["experiments"][2]["appended"] == 1


def test_append_leaves_full_shards_as_they_were(tmp_path):
    layout = StoreLayout(rows_per_chunk=16, chunks_per_shard=2)
    first, second = tmp_path / "first.h5ad", tmp_path / "second.h5ad"
    adata = make_adata(400, 300, n_experiments=2, seed=3, density_boost=4.0)
    adata.obs["experiment"] = adata.obs["experiment"].cat.rename_categories({"exp0": "e0", "exp1": "e1"})
    adata.write_h5ad(first)
    other = make_adata(150, 300, n_experiments=1, seed=4, density_boost=4.0)
    other.obs["experiment"] = other.obs["experiment"].cat.rename_categories({"exp0": "e2"})
    other.var_names = adata.var_names
    other.write_h5ad(second)
    config = IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=0, layout=layout)
    store = ingest([first], tmp_path / "s.zarr", config=config)
    shards = sorted((store / "X" / "data" / "c").iterdir(), key=lambda p: int(p.name))
    assert len(shards) > 2
    before = {p.name: (p.stat().st_ino, p.read_bytes()) for p in shards}
    append([second], store, config=config)
    after = {p.name: (p.stat().st_ino, p.read_bytes()) for p in (store / "X" / "data" / "c").iterdir()}
    full = [p.name for p in shards[:-1]]  # the last shard was partial: completed in a copy
    assert all(after[name] == before[name] for name in full)  # the same files (inodes), unchanged
    together = ingest([first, second], tmp_path / "t.zarr", config=config)
    np.testing.assert_array_equal(open_store(together).read_rows(0, 550).toarray(),
                                  open_store(store).read_rows(0, 550).toarray())
    verify_store(store)


def test_append_maps_genes_onto_the_store(tmp_path):
    adata = make_adata(200, 50, n_experiments=1, seed=5)
    adata.write_h5ad(tmp_path / "a.h5ad")
    new = make_adata(120, 50, n_experiments=1, seed=6)
    names = list(adata.var_names[10:]) + [f"new{i}" for i in range(10)]  # 10 absent, 10 dropped
    new.var_names = names
    new.write_h5ad(tmp_path / "b.h5ad")
    config = IngestConfig(label_key="cell_type", min_cells=0)
    store = ingest([tmp_path / "a.h5ad"], tmp_path / "s.zarr", config=config)
    genes = list(open_store(store).gene_ids)
    result = append([tmp_path / "b.h5ad"], store, config=config)
    assert result.absent_genes == {"b": sum(g not in names for g in genes)}
    assert result.dropped_genes == {"b.h5ad": 10}
    opened = open_store(store)
    a, b = opened.experiment_ranges["b"]
    rows = opened.read_rows(a, b).toarray()
    dense = np.asarray(new.X.todense())
    keep = (dense.sum(axis=1) > 0)
    expected = np.zeros((int(keep.sum()), len(genes)), dtype=np.float32)
    for j, g in enumerate(genes):
        if g in names:
            expected[:, j] = dense[keep, names.index(g)]
    np.testing.assert_array_equal(rows, expected)
    assert opened.summary()["experiments"][1]["absent_genes"] == result.absent_genes["b"]


def test_append_refuses_an_existing_experiment_and_changes_nothing(tmp_path):
    adata = make_adata(100, 40, n_experiments=1, seed=1)
    adata.write_h5ad(tmp_path / "a.h5ad")
    runner = CliRunner()
    store = tmp_path / "s.zarr"
    assert runner.invoke(main, ["ingest", str(tmp_path / "a.h5ad"), "-o", str(store)]).exit_code == 0
    before = _files(store)
    result = runner.invoke(main, ["ingest", str(tmp_path / "a.h5ad"), "-o", str(store), "--append"])
    assert result.exit_code == 2, result.output
    assert "already has experiment 'a'" in result.output
    assert _files(store) == before
    assert not list(tmp_path.glob(".s.zarr.append-*"))


def test_info_shows_appended_experiments(tmp_path, panel_parts):
    a, b = panel_parts
    runner = CliRunner()
    store = str(tmp_path / "s.zarr")
    keys = ["--experiment-key", "experiment", "--label-key", "cell_type"]
    assert runner.invoke(main, ["ingest", str(a), "-o", store, *keys]).exit_code == 0
    out = runner.invoke(main, ["ingest", str(b), "-o", store, "--append", *keys])
    assert out.exit_code == 0, out.output
    assert "appended Dropseq: 225 cells" in out.output
    text = runner.invoke(main, ["info", store]).output
    line = next(x for x in text.splitlines() if x.strip().startswith("Dropseq"))
    assert "appended (1)" in line
    assert "appended" not in next(x for x in text.splitlines() if x.strip().startswith("10x"))


# ---------------------------------------------------------------------------------------------
# a kill at each step of an append leaves the store as it was (or, after the commit, complete)

KILL_DRIVER = textwrap.dedent("""
    import os, signal, sys
    import mars_scale.append as A
    import mars_scale.store as S
    from mars_scale.ingest import IngestConfig

    store, new, where = sys.argv[1], sys.argv[2], sys.argv[3]
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if where.startswith("flush"):  # in the middle of writing the rows: the n-th write unit
        n, original, calls = int(where[5:]), S.AppendArray._flush, [0]
        def flush(self):
            calls[0] += 1
            if calls[0] == n:
                die()
            original(self)
        S.AppendArray._flush = flush
    else:
        step = A._step
        A._step = lambda name: die() if name == where else step(name)
    A.append([new], store, config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=0))
""")


@pytest.mark.parametrize("where", ["flush1", pytest.param("flush6", marks=pytest.mark.slow),
                                   pytest.param("cloned", marks=pytest.mark.slow), "written",
                                   pytest.param("sealed", marks=pytest.mark.slow), "exchanged"])
def test_append_killed_at_each_step_leaves_a_whole_store(tmp_path, panel_parts, where):
    a, b = panel_parts
    store = ingest([a], tmp_path / "s.zarr", config=CONFIG)
    old = _content(store)
    old_files = _files(store)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(store), str(b), where], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    if where == "exchanged":  # killed after the commit: the new store, whole
        new = ingest([a, b], tmp_path / "ab.zarr", config=CONFIG)
        _assert_same(_content(new), _content(store), rtol=1e-12)
    else:
        assert _files(store) == old_files
        _assert_same(old, _content(store))
    verify_store(store)
    if where != "exchanged":  # the next append removes the leftovers and succeeds
        append([b], store, config=CONFIG)
        assert not list(tmp_path.glob(".s.zarr.append-*"))
        assert open_store(store).experiments == ["10x", "CELseq2", "Dropseq"]


# ---------------------------------------------------------------------------------------------
# ingest on a dask cluster


def test_ingest_with_two_workers_is_byte_identical(tmp_path, panel_parts):
    a, b = panel_parts
    serial = ingest([a, b], tmp_path / "serial.zarr", config=CONFIG)
    parallel = ingest([a, b], tmp_path / "parallel.zarr", config=CONFIG, workers=2)
    assert _files(parallel) == _files(serial)


def test_interleaved_experiments_with_two_workers_are_byte_identical(tmp_path):
    adata = make_adata(500, 40, n_experiments=3, seed=7)
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()  # experiments interleaved
    adata.write_h5ad(tmp_path / "mixed.h5ad")
    serial = ingest([tmp_path / "mixed.h5ad"], tmp_path / "serial.zarr", config=CONFIG)
    parallel = ingest([tmp_path / "mixed.h5ad"], tmp_path / "parallel.zarr", config=CONFIG, workers=2)
    assert _files(parallel) == _files(serial)


def test_workers_and_scheduler_together_are_refused(tmp_path):
    make_adata(50, 20, n_experiments=1).write_h5ad(tmp_path / "a.h5ad")
    result = CliRunner().invoke(main, ["ingest", str(tmp_path / "a.h5ad"), "-o", str(tmp_path / "s.zarr"),
                                       "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"])
    assert result.exit_code == 2 and "not both" in result.output
    assert not (tmp_path / "s.zarr").exists()


def test_append_to_an_annotated_store_extends_the_results_with_missing_values(tmp_path, panel_parts):
    import zarr
    from anndata.io import write_elem

    from mars_scale.store import chunk_codecs, column_array, commit_elements, seal, store_lock, write_attrs, write_categorical

    a, b = panel_parts
    store = ingest([a], tmp_path / "s.zarr", config=CONFIG)
    opened = open_store(store)
    n, (lo, hi) = opened.n_cells, opened.experiment_ranges["CELseq2"]
    staging = store / ".mars-scale-staging-test"
    obs = zarr.open_group(staging / "obs", mode="w")
    codes = np.arange(hi - lo) % 3
    write_categorical(obs, "mars_cluster", n, (lo, hi), codes, ["0", "1", "2"], chunk=256)
    column_array(obs, "mars_confidence", n, np.float32, np.nan, chunk=256)[lo:hi] = 0.5
    obsm = zarr.open_group(staging / "obsm", mode="w")
    emb = obsm.create_array("mars_embedding", shape=(n, 4), dtype=np.float32, chunks=(256, 4), fill_value=np.nan,
                            **chunk_codecs(3))
    emb[lo:hi] = 1.0
    write_elem(zarr.open_group(staging / "uns", mode="w"), "mars",
               {"unannotated": "CELseq2", "date": "2026-12-06", "model": "run/"})
    elements = [("obs", "mars_cluster"), ("obs", "mars_confidence"), ("obsm", "mars_embedding"), ("uns", "mars")]
    with store_lock(store):
        for group, name in elements:
            seal(staging / group / name)
            write_attrs(staging / group / name, {"mars-scale-run": "r1"})
        commit_elements(store, staging, elements, obs_columns=["mars_cluster", "mars_confidence"], run=("mars", "r1"))
    import shutil
    shutil.rmtree(staging)

    append([b], store, config=CONFIG)
    adata = ad.read_zarr(store)
    assert adata.n_obs == n + 225
    cluster = adata.obs["mars_cluster"]
    np.testing.assert_array_equal(cluster.iloc[lo:hi].astype(int).to_numpy(), codes)
    assert cluster.iloc[n:].isna().all() and cluster.iloc[:lo].isna().all()
    conf = adata.obs["mars_confidence"].to_numpy()
    assert (conf[lo:hi] == 0.5).all() and np.isnan(conf[n:]).all()
    assert np.isnan(adata.obsm["mars_embedding"][n:]).all() and (adata.obsm["mars_embedding"][lo:hi] == 1).all()
    root = zarr.open_group(store, mode="r")
    assert root["obs/mars_cluster"].attrs["mars-scale-run"] == "r1"
    summary = open_store(store).summary()
    assert summary["annotation_runs"][0]["experiments"] == ["CELseq2"]
    assert [e["annotation_runs"] for e in summary["experiments"]] == [[], ["mars"], []]
    verify_store(store)


def test_ingest_on_a_running_scheduler_closes_its_inputs(tmp_path, panel_parts):
    from dask.distributed import LocalCluster

    import importlib

    ingest_module = importlib.import_module("mars_scale.ingest")
    a, b = panel_parts
    serial = ingest([a, b], tmp_path / "serial.zarr", config=CONFIG)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        out = ingest([a, b], tmp_path / "cluster.zarr", config=CONFIG, scheduler=cluster.scheduler_address)
    assert _files(out) == _files(serial)
    assert ingest_module._WORKER_SOURCES == {}  # the in-process worker closed the files it opened
