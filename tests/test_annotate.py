"""annotate: fields written into the store, agreement with an in-memory recomputation, refusal of
existing results, the writer lock, rollback on failure, and the h5ad export."""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import make_adata
from mars_scale.annotate import annotate, result_keys
from mars_scale.cli import main
from mars_scale.config import RunConfig, TrainConfig
from mars_scale.errors import InputError, StoreError
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.landmarks import nearest
from mars_scale.model import Mars
from mars_scale.naming import name_clusters
from mars_scale.nn import ModelConfig
from mars_scale.store import StoreLayout, open_store, store_lock

# the module (mars_scale.annotate is the function, as in scanpy)
annotate_module = importlib.import_module("mars_scale.annotate")
store_module = importlib.import_module("mars_scale.store")

TINY = RunConfig(
    model=ModelConfig(hidden=(32,), n_latent=8),
    train=TrainConfig(pretrain_epochs=2, finetune_epochs=3, batch_size=128, min_steps_per_epoch=2, seed=1, device="cpu"),
)
RESULT_COLUMNS = ["mars_cluster", "mars_cell_type", "mars_confidence", "mars_novelty", "mars_closest_type",
                  "mars_cluster_novelty"]


def _build_store(directory: Path, *, zarr_format: int = 3) -> Path:
    adata = make_adata(360, 80, n_experiments=3, seed=5)
    adata.obs["experiment"] = pd.Categorical(np.repeat(["exp0", "exp1", "exp2"], [110, 130, 120]))
    h5ad = directory / "cells.h5ad"
    adata.write_h5ad(h5ad)
    layout = StoreLayout(rows_per_chunk=64, zarr_format=zarr_format, chunks_per_shard=2)
    return ingest([h5ad], directory / f"atlas-v{zarr_format}.zarr",
                  config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1, layout=layout))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pristine store and a run directory with a tiny model trained on it (exp1 unannotated)."""
    directory = tmp_path_factory.mktemp("annotate")
    store = _build_store(directory)
    model = Mars(store, unannotated="exp1", n_clusters=5, config=TINY).train()
    run_dir = directory / "run"
    model.save(run_dir)
    return store, run_dir


@pytest.fixture
def store_copy(trained, tmp_path) -> tuple[Path, Path]:
    store, run_dir = trained
    target = tmp_path / "atlas.zarr"
    shutil.copytree(store, target)
    return target, run_dir


def _snapshot(path: Path) -> dict[str, str]:
    """Every file under the store with a hash of its bytes."""
    return {
        str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*")) if p.is_file()
    }


def test_annotate_writes_every_field_and_anndata_reads_them(store_copy):
    path, run_dir = store_copy
    result = annotate(path, run_dir, seed=0, device="cpu")
    adata = ad.read_zarr(path)
    a, b = open_store(path).experiment_ranges["exp1"]
    for column in RESULT_COLUMNS:
        assert column in adata.obs.columns
    obs = adata.obs
    assert isinstance(obs["mars_cluster"].dtype, pd.CategoricalDtype)
    assert isinstance(obs["mars_cell_type"].dtype, pd.CategoricalDtype)
    inside = np.zeros(adata.n_obs, dtype=bool)
    inside[a:b] = True
    assert obs["mars_cluster"][inside].notna().all() and obs["mars_cluster"][~inside].isna().all()
    assert obs["mars_cell_type"][inside].notna().all() and obs["mars_cell_type"][~inside].isna().all()
    for column in ("mars_confidence", "mars_novelty", "mars_cluster_novelty"):
        values = obs[column].to_numpy()
        assert np.isfinite(values[inside]).all() and np.isnan(values[~inside]).all()
        assert ((values[inside] >= 0) & (values[inside] <= 1)).all()
    assert set(obs["mars_cell_type"].cat.categories) <= {"type0", "type1", "type2", "type3", "novel"}
    x = adata.obsm["X_mars"]
    assert x.shape == (adata.n_obs, 8) and x.dtype == np.float32 and np.isfinite(x).all()
    record = adata.uns["mars"]
    names = [str(v) for v in record["names"]]
    probs = adata.obsm["mars_name_probabilities"]
    assert probs.shape == (adata.n_obs, len(names)) and probs.dtype == np.float32
    np.testing.assert_allclose(probs[inside].sum(1), 1.0, rtol=1e-5)
    assert np.isnan(probs[~inside]).all()
    closest = obs["mars_closest_type"][inside].astype(str).to_numpy()
    np.testing.assert_array_equal(closest, np.asarray(names)[probs[inside].argmax(1)])
    # the cluster novelty column repeats each cluster's value
    cluster_nov = dict(zip(record["clusters"], record["novelty"]))
    np.testing.assert_allclose(obs["mars_cluster_novelty"][inside].to_numpy(),
                               [cluster_nov[int(c)] for c in obs["mars_cluster"][inside]], rtol=1e-6)
    assert len(record["description"]) == result.naming.n_clusters
    n_clusters = result.naming.n_clusters
    assert record["unannotated"] == "exp1"
    assert np.asarray(record["top_names"]).shape == (n_clusters, 3)
    np.testing.assert_allclose(np.asarray(record["top_probabilities"]).sum(1) <= 1 + 1e-9, True)
    assert np.asarray(record["novelty"]).shape == (n_clusters,)
    assert len(record["unused_landmarks"]) + len(record["merged_landmarks"]) + n_clusters == 5
    assert record["model"] == str(Path(run_dir).resolve())
    assert '"n_latent": 8' in record["config"] and record["date"]
    assert result.written == tuple(f"obs/{c}" for c in RESULT_COLUMNS) + (
        "obsm/X_mars", "obsm/mars_name_probabilities", "uns/mars")
    assert not list(path.glob(".mars-scale-*"))  # no staging directory or lock left behind
    # the original columns are untouched and still first
    assert list(obs.columns[:4]) == ["experiment", "cell_type", "n_counts", "n_genes"]


def test_results_match_an_in_memory_recomputation(store_copy):
    path, run_dir = store_copy
    result = annotate(path, run_dir, seed=3, batch_size=50, device="cpu")  # batches cross chunks
    model = Mars.load(run_dir, path)
    index, z = model.embed(batch_size=97)
    adata = ad.read_zarr(path)
    np.testing.assert_allclose(adata.obsm["X_mars"][index], z, rtol=1e-5, atol=1e-5)
    a, b = open_store(path).experiment_ranges["exp1"]
    z_u = z[(index >= a) & (index < b)]
    assignment, _ = nearest(z_u, model.unannotated_landmarks)
    assignment, merged = annotate_module.merge_small_clusters(z_u, assignment, model.unannotated_landmarks, min_cells=10)
    assert merged.tolist() == list(result.merged_landmarks)
    stored = adata.obs["mars_cluster"].iloc[a:b].astype(int).to_numpy()
    np.testing.assert_array_equal(stored, assignment)
    # landmark radius: RMS distance of annotated cells to their own landmark
    landmarks, exps, types = model.annotated_landmarks
    obs = adata.obs
    radius = []
    for landmark, e, t in zip(landmarks, exps, types):
        mine = ((obs["experiment"] == e) & (obs["cell_type"] == t)).to_numpy()
        radius.append(np.sqrt(((adata.obsm["X_mars"][mine] - landmark) ** 2).sum(1).mean()))
    np.testing.assert_allclose(result.landmark_radius, radius, rtol=1e-4)
    cells = [int(((obs["experiment"] == e) & (obs["cell_type"] == t)).sum()) for e, t in zip(exps, types)]
    naming = name_clusters(z_u, assignment, landmarks, types, landmark_weights=cells,
                           max_cells_per_cluster=2000, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(obs["mars_cell_type"].iloc[a:b].astype(str).to_numpy(), naming.cell_type.astype(str))
    np.testing.assert_allclose(obs["mars_confidence"].iloc[a:b].to_numpy(), naming.confidence, rtol=1e-5)
    np.testing.assert_allclose(obs["mars_novelty"].iloc[a:b].to_numpy(), naming.cell_novelty, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(adata.obsm["mars_name_probabilities"][a:b], naming.cell_name_probabilities, rtol=1e-5)
    stored_top = [[str(v) for v in row] for row in adata.uns["mars"]["top_names"]]
    assert stored_top == naming.top_names.tolist()


def test_split_test_writes_a_part_as_a_cluster_of_its_own(store_copy, monkeypatch):
    """annotate(split_test=True): a part that the split test returns becomes its own cluster in
    obs, named novel, with its parent in uns (the test itself: tests/test_subpopulations.py)."""
    from mars_scale import subpopulations

    path, run_dir = store_copy
    seen = {}

    def one_part(store, rows, assignment, embedding, naming, **kwargs):
        seen["annotated"] = kwargs["annotated"]
        parent = naming.clusters[int(np.argmax(naming.n_cells))]
        members = np.flatnonzero(assignment == parent)
        new = int(naming.clusters.max()) + 1
        return [subpopulations.Part(
            cluster=parent, new_cluster=new, cells=members[: members.size // 2], novel=True,
            name=str(naming.compared_name[int(np.argmax(naming.n_cells))]), parent_name=None, dprime=6.0,
            other_dprime=2.0, reference_dprime=2.0, evidence=1.5, siblings=(), genes=("g1",))]

    monkeypatch.setattr(subpopulations, "find_parts", one_part)
    result = annotate(path, run_dir, seed=3, device="cpu", split_test=True)
    assert seen["annotated"] == ["exp0", "exp2"]
    adata = ad.read_zarr(path)
    a, b = open_store(path).experiment_ranges["exp1"]
    clusters = adata.obs["mars_cluster"].iloc[a:b].astype(int).to_numpy()
    new = int(result.naming.clusters.max())
    part = clusters == new
    assert 0 < part.sum() < (b - a)
    assert (adata.obs["mars_cell_type"].iloc[a:b].astype(str).to_numpy()[part] == "novel").all()
    record = adata.uns["mars"]
    part_of = dict(zip(np.asarray(record["clusters"]).tolist(), np.asarray(record["part_of"]).tolist()))
    assert part_of[new] >= 0 and all(v == -1 for c, v in part_of.items() if c != new)
    assert str(np.asarray(record["description"])[list(part_of).index(new)]).startswith(
        f"novel (split from cluster {part_of[new]})")


def test_merge_small_clusters_against_a_dense_reference():
    rng = np.random.default_rng(0)
    landmarks = np.array([[0.0, 0.0], [10.0, 0.0], [0.5, 0.0], [0.0, 9.0]], dtype=np.float32)
    z = np.vstack([rng.normal(landmarks[i], 0.2, size=(n, 2)) for i, n in enumerate([50, 40, 3, 0])]).astype(np.float32)
    assignment = np.argmin(((z[:, None] - landmarks[None]) ** 2).sum(-1), axis=1)
    new, merged = annotate_module.merge_small_clusters(z, assignment, landmarks, min_cells=10)
    small = np.bincount(assignment, minlength=4)
    assert merged.tolist() == [i for i in range(4) if 0 < small[i] < 10]
    moved = np.isin(assignment, merged)
    keep = np.flatnonzero(small >= 10)
    expected = keep[np.argmin(((z[moved][:, None] - landmarks[keep][None]) ** 2).sum(-1), axis=1)]
    np.testing.assert_array_equal(new[moved], expected)
    np.testing.assert_array_equal(new[~moved], assignment[~moved])
    same, none = annotate_module.merge_small_clusters(z, assignment, landmarks, min_cells=1)
    assert none.size == 0 and (same == assignment).all()


def test_existing_results_are_refused_without_overwrite_and_replaced_with_it(store_copy):
    path, run_dir = store_copy
    annotate(path, run_dir, device="cpu")
    before = _snapshot(path)
    with pytest.raises(StoreError, match=r"obs/mars_cluster already exists.*--overwrite"):
        annotate(path, run_dir, device="cpu")
    assert _snapshot(path) == before
    # everything novel: a threshold just above zero calls every cluster new
    annotate(path, run_dir, device="cpu", overwrite=True, novelty_threshold=1e-9)
    adata = ad.read_zarr(path)
    assert set(adata.obs["mars_cell_type"].dropna().unique()) == {"novel"}
    assert adata.uns["mars"]["novelty_threshold"] == pytest.approx(1e-9)
    assert list(adata.obs.columns).count("mars_cluster") == 1
    assert not list(path.glob(".mars-scale-*"))
    # another key does not collide
    annotate(path, run_dir, device="cpu", key_added="second")
    adata = ad.read_zarr(path)
    assert {"second_cluster", "mars_cluster"} <= set(adata.obs.columns) and "X_second" in adata.obsm


def test_a_concurrent_writer_is_refused_by_the_lock(store_copy):
    path, run_dir = store_copy
    before = _snapshot(path)
    with store_lock(path):
        locked = _snapshot(path)
        with pytest.raises(StoreError, match="another process"):
            annotate(path, run_dir, device="cpu")
        assert _snapshot(path) == locked
    assert _snapshot(path) == before


@pytest.mark.parametrize("where", ["naming", "first_move", "column_order"])
def test_a_failure_mid_write_leaves_the_store_as_before(store_copy, monkeypatch, where):
    path, run_dir = store_copy
    before = _snapshot(path)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    if where == "naming":
        monkeypatch.setattr(annotate_module, "name_clusters", boom)
    elif where == "first_move":
        monkeypatch.setattr(store_module, "_move", boom)
    else:
        monkeypatch.setattr(store_module, "write_obs_publication", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        annotate(path, run_dir, device="cpu")
    assert _snapshot(path) == before
    ad.read_zarr(path)


@pytest.mark.parametrize("fail_at", [1, 4, 6, 7])
def test_a_failed_overwrite_keeps_the_earlier_results(store_copy, monkeypatch, fail_at):
    path, run_dir = store_copy
    annotate(path, run_dir, device="cpu")
    before = _snapshot(path)
    old = ad.read_zarr(path)
    real_move = store_module._move
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError("interrupted")
        real_move(src, dst)

    monkeypatch.setattr(store_module, "_move", flaky)
    with pytest.raises(OSError, match="interrupted"):
        annotate(path, run_dir, device="cpu", overwrite=True, novelty_threshold=1e-9)
    assert _snapshot(path) == before
    again = ad.read_zarr(path)
    pd.testing.assert_frame_equal(again.obs, old.obs)
    np.testing.assert_array_equal(again.obsm["X_mars"], old.obsm["X_mars"])


def test_zarr_v2_store(tmp_path, trained):
    _, run_dir = trained
    path = _build_store(tmp_path, zarr_format=2)
    annotate(path, run_dir, device="cpu")
    adata = ad.read_zarr(path)
    assert set(RESULT_COLUMNS) <= set(adata.obs.columns) and "X_mars" in adata.obsm
    assert adata.obs["mars_cluster"].notna().sum() == 130


def test_export_writes_the_results_alone(store_copy, tmp_path):
    path, run_dir = store_copy
    out = tmp_path / "results.h5ad"
    result = annotate(path, run_dir, device="cpu", export=out)
    assert result.export == out and not list(tmp_path.glob(".results.h5ad*"))
    small = ad.read_h5ad(out)
    full = ad.read_zarr(path)
    assert small.n_vars == 0 and small.n_obs == full.n_obs
    assert list(small.obs_names) == list(full.obs_names)
    for column in ["experiment", "cell_type", *RESULT_COLUMNS]:
        pd.testing.assert_series_equal(small.obs[column], full.obs[column], check_categorical=False)
    np.testing.assert_array_equal(small.obsm["X_mars"], full.obsm["X_mars"])
    np.testing.assert_array_equal(small.obsm["mars_name_probabilities"], full.obsm["mars_name_probabilities"])
    assert list(small.uns["mars"]["obs_keys"]) == RESULT_COLUMNS
    with pytest.raises(InputError, match="results.h5ad: already exists"):
        annotate(path, run_dir, device="cpu", key_added="other", export=out)
    annotate(path, run_dir, device="cpu", overwrite=True, export=out, novelty_threshold=1e-9)
    assert set(ad.read_h5ad(out).obs["mars_cell_type"].dropna()) == {"novel"}


def test_bad_options_are_refused_before_any_work(store_copy):
    path, run_dir = store_copy
    before = _snapshot(path)
    with pytest.raises(InputError, match="reserved"):
        annotate(path, run_dir, key_added="mars_scale")
    with pytest.raises(InputError, match="key_added"):
        annotate(path, run_dir, key_added="a/b")
    with pytest.raises(InputError, match="space"):
        annotate(path, run_dir, space="tsne")
    with pytest.raises(InputError, match=".h5ad"):
        annotate(path, run_dir, export=path.parent / "out.csv")
    with pytest.raises(InputError, match="min_cluster_cells"):
        annotate(path, run_dir, min_cluster_cells=0)
    with pytest.raises(InputError, match="novelty_method"):
        annotate(path, run_dir, novelty_method="vote")
    assert _snapshot(path) == before
    assert result_keys("x") == {"obs": ["x_cluster", "x_cell_type", "x_confidence", "x_novelty", "x_closest_type",
                                        "x_cluster_novelty"],
                                "obsm": "X_x", "probabilities": "x_name_probabilities", "uns": "x"}


def test_cli_annotate_prints_the_cluster_table(store_copy):
    path, run_dir = store_copy
    runner = CliRunner()
    result = runner.invoke(main, ["annotate", str(path), "--model", str(run_dir), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "cluster" in result.output and "probability" in result.output and "novelty" in result.output
    assert "exp1: 130 cells" in result.output
    again = runner.invoke(main, ["annotate", str(path), "--model", str(run_dir)])
    assert again.exit_code == 2
    assert "already exists" in again.output and "Traceback" not in again.output


def test_cli_no_split_test_skips_the_split_test(store_copy, monkeypatch):
    from mars_scale import subpopulations

    path, run_dir = store_copy
    calls = []

    def record(*args, **kwargs):
        calls.append(1)
        return []

    monkeypatch.setattr(subpopulations, "find_parts", record)
    runner = CliRunner()
    off = runner.invoke(main, ["annotate", str(path), "--model", str(run_dir), "--device", "cpu", "--no-split-test"])
    assert off.exit_code == 0, off.output
    assert calls == []
    on = runner.invoke(main, ["annotate", str(path), "--model", str(run_dir), "--device", "cpu", "--overwrite"])
    assert on.exit_code == 0, on.output
    assert calls == [1]


def test_annotate_counts_how_the_embedding_confuses_names(store_copy, monkeypatch):
    """The confusion handed to the sibling step equals a dense count over the annotated cells'
    stored embedding; --no-siblings skips the step."""
    from mars_scale import subpopulations

    path, run_dir = store_copy
    seen = []

    def spy(store, rows, assignment, naming, confusion, **kwargs):
        seen.append((np.asarray(naming.names).astype(str), np.array(confusion)))
        return [], {}, []

    monkeypatch.setattr(subpopulations, "resolve_siblings", spy)
    annotate(path, run_dir, seed=3, batch_size=50, device="cpu")
    [(names, confusion)] = seen
    model = Mars.load(run_dir, path)
    landmarks, _, types = model.annotated_landmarks
    adata = ad.read_zarr(path)
    obs = adata.obs
    want = np.zeros_like(confusion)
    for i in np.flatnonzero((obs["experiment"] != "exp1").to_numpy() & obs["cell_type"].notna().to_numpy()):
        own = str(obs["cell_type"].iloc[i])
        nearest_name = types[int(np.argmin(((landmarks - adata.obsm["X_mars"][i]) ** 2).sum(1)))]
        want[list(names).index(own), list(names).index(nearest_name)] += 1
    np.testing.assert_array_equal(confusion, want)
    assert want.sum() == int(((obs["experiment"] != "exp1") & obs["cell_type"].notna()).sum())
    runner = CliRunner()
    off = runner.invoke(main, ["annotate", str(path), "--model", str(run_dir), "--device", "cpu", "--overwrite",
                               "--no-siblings"])
    assert off.exit_code == 0, off.output
    assert len(seen) == 1


def test_the_confusion_sample_is_a_fixed_share_of_rows_whatever_the_batches():
    rows = np.arange(200_000)
    kept = annotate_module._hashed_share(rows, 0.2)
    assert abs(kept.mean() - 0.2) < 0.005
    pieces = np.concatenate([annotate_module._hashed_share(rows[i:i + 777], 0.2) for i in range(0, rows.size, 777)])
    np.testing.assert_array_equal(pieces, kept)
    assert annotate_module._hashed_share(rows[:10], 1.0).all()
