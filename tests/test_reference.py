"""Reusing a trained reference (--reference-only, --from) and several unannotated experiments at once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import adjusted_rand_score

from conftest import make_adata
from mars_scale.cli import main
from mars_scale.config import ModelConfig, RunConfig, TrainConfig
from mars_scale.errors import CheckpointMismatchError, InputError
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.landmarks import choose_n_clusters, groups_reached, kmeans, nearest
from mars_scale.model import Mars
from mars_scale.store import open_store

TINY = RunConfig(
    model=ModelConfig(hidden=(32,), n_latent=8),
    train=TrainConfig(pretrain_epochs=2, finetune_epochs=3, batch_size=64, min_steps_per_epoch=2, seed=3, device="cpu"),
)
TOML = "[model]\nhidden = [32]\nn_latent = 8\n[train]\npretrain_epochs = 2\nfinetune_epochs = 2\nbatch_size = 64\n"


def _store(tmp_path: Path, *, sizes=(90, 80, 110, 100, 120), n_genes=50, unlabelled=("exp0",), name="atlas") -> Path:
    """Experiments exp0, exp1, ... of the given sizes; the ``unlabelled`` ones carry no cell types
    (new experiments), and the truth of every cell is kept in obs['truth']."""
    adata = make_adata(sum(sizes), n_genes, n_experiments=len(sizes), n_types=3, seed=7)
    names = np.repeat([f"exp{i}" for i in range(len(sizes))], sizes)
    adata.obs["experiment"] = pd.Categorical(names)
    adata.obs["truth"] = adata.obs["cell_type"].astype(str)
    types = adata.obs["cell_type"].astype(object).to_numpy()
    types[np.isin(names, unlabelled)] = np.nan
    adata.obs["cell_type"] = pd.Categorical(types)
    path = tmp_path / f"{name}.h5ad"
    adata.write_h5ad(path)
    return ingest([path], tmp_path / f"{name}.zarr",
                  config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))


def _truth(store, experiment: str) -> np.ndarray:
    a, b = store.experiment_ranges[experiment]
    codes, cats = store.categorical_codes("truth", a, b)
    return np.asarray(cats, dtype=object)[codes]


def test_a_run_from_a_reference_reuses_its_network_and_has_the_full_runs_shape(tmp_path):
    path = _store(tmp_path)
    store = open_store(path)
    ref = Mars(path, reference_only=True, config=TINY).train(run_dir=tmp_path / "ref")
    ref.save(tmp_path / "ref")
    assert ref.is_trained and ref.unannotated_landmarks is None
    assert ref.plan.annotated == ("exp1", "exp2", "exp3", "exp4")  # the labelled experiments only
    assert [h["phase"] for h in ref.history][:2] == ["pretrain", "pretrain"]
    assert {h["phase"] for h in ref.history} <= {"pretrain", "warmup"}

    query = Mars(path, unannotated="exp0", n_clusters=3, config=TINY, reference=tmp_path / "ref")
    assert query.config.train.annotated_cells_per_epoch == 90  # a sample of the reference of the query's size
    query.train(run_dir=tmp_path / "run").save(tmp_path / "run")
    full = Mars(path, unannotated="exp0", n_clusters=3, config=TINY).train()
    # no pretraining, no warm-up; fine-tuning stopped once the clusters were stable
    assert [h["phase"] for h in query.history] == ["finetune"] and query.history[0]["stable"]
    assert query.unannotated_landmarks.shape == full.unannotated_landmarks.shape
    for got, want in zip(query.annotated_landmarks, full.annotated_landmarks):
        assert np.shape(got) == np.shape(want)
    assert query.annotated_landmarks[1:] == full.annotated_landmarks[1:]
    # the landmarks were initialised by K-means on the reference's embedding of the new cells
    index, z = Mars.load(tmp_path / "ref", path).embed(experiments=["exp0"], device="cpu")
    result = kmeans(z, 3, seed=TINY.train.seed, n_init=TINY.train.kmeans_n_init)
    assignment, _ = nearest(z, result.centroids)
    init = query.state["kmeans_init"]
    np.testing.assert_array_equal(init["index"].numpy(), index)
    np.testing.assert_array_equal(init["cluster"].numpy(), assignment)
    assert query.state["reference"] == str(tmp_path / "ref" / "model.pt")
    # the query's network started from the reference's, then moved
    ref_w, query_w = ref.state["model"], query.state["model"]
    assert set(ref_w) == set(query_w) and any(not torch.equal(ref_w[k], query_w[k]) for k in ref_w)
    # the model annotates like any other
    r = CliRunner().invoke(main, ["annotate", str(path), "--model", str(tmp_path / "run"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    codes, _ = store.categorical_codes("mars_cluster", *store.experiment_ranges["exp0"])
    assert (np.asarray(codes) >= 0).all()


def test_auto_k_from_a_reference_is_the_choice_on_the_references_embedding(tmp_path):
    """A query with n_clusters="auto": K is the silhouette's best on the reference's embedding
    of the new cells, raised to the reference types they reach, computed here independently."""
    path = _store(tmp_path)
    Mars(path, reference_only=True, config=TINY).train(run_dir=tmp_path / "ref").save(tmp_path / "ref")
    ref = Mars.load(tmp_path / "ref", path)
    query = Mars(path, unannotated="exp0", n_clusters="auto", config=TINY, reference=tmp_path / "ref").train()
    _, z = ref.embed(experiments=["exp0"], device="cpu")
    values, _, types = ref.annotated_landmarks
    codes = np.unique(np.asarray(types), return_inverse=True)[1]
    floor = groups_reached(z, np.asarray(values), codes, min_points=10)  # 1% of 90 cells is below 10
    want = choose_n_clusters(z, k_max=len(z) // 10, seed=TINY.train.seed, floor=floor)
    choice = query.state["n_clusters_choice"]
    assert (choice["n_clusters"], choice["best_silhouette"], choice["reference_types_reached"]) == (
        want.n_clusters, want.best, want.floor)
    assert query.plan.n_clusters == want.n_clusters == len(query.unannotated_landmarks)


def test_from_refuses_a_reference_that_does_not_fit(tmp_path):
    path = _store(tmp_path)
    Mars(path, reference_only=True, config=TINY).train(run_dir=tmp_path / "ref").save(tmp_path / "ref")
    other = _store(tmp_path, n_genes=45, name="other")
    cfg = tmp_path / "c.toml"
    cfg.write_text(TOML)
    base = ["train", "--unannotated", "exp0", "--n-clusters", "3", "--config", str(cfg), "--device", "cpu"]
    r = CliRunner().invoke(main, [base[0], str(other), *base[1:], "--from", str(tmp_path / "ref"), "-o", str(tmp_path / "r1")])
    assert r.exit_code == 2 and "genes do not match" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(main, [base[0], str(path), *base[1:], "--from", str(tmp_path / "ref"), "--n-top-genes", "20",
                                  "-o", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "--n-top-genes 20" in r.stderr, r.output
    r = CliRunner().invoke(main, [base[0], str(path), *base[1:], "--from", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r3")])
    assert r.exit_code == 2 and "no such checkpoint" in r.stderr, r.output
    r = CliRunner().invoke(main, ["train", str(path), "--reference-only", "--unannotated", "exp0", "-o", str(tmp_path / "r4")])
    assert r.exit_code == 2 and "--reference-only takes no --unannotated" in r.output
    # an experiment the reference was trained on as annotated cannot be the new one
    with pytest.raises(InputError, match="'exp1' is annotated in the reference"):
        Mars(path, unannotated="exp1", n_clusters=3, config=TINY, reference=tmp_path / "ref")
    # a finished run is not a reference
    Mars(path, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "full").save(tmp_path / "full")
    with pytest.raises(CheckpointMismatchError, match="not a finished reference"):
        Mars(path, unannotated="exp0", n_clusters=3, config=TINY, reference=tmp_path / "full")
    for r in ("r1", "r2", "r3", "r4"):
        assert not (tmp_path / r / "model.pt").exists()


def test_two_unannotated_experiments_share_the_landmarks_and_are_scored_each(tmp_path):
    from mars_scale.evaluate import annotation_markdown, score_annotation

    path = _store(tmp_path, unlabelled=())  # their labels are the truth, unseen by training
    cfg = tmp_path / "c.toml"
    cfg.write_text(TOML)
    r = CliRunner().invoke(main, ["train", str(path), "--unannotated", "exp0", "--unannotated", "exp4",
                                  "--n-clusters", "3", "-o", str(tmp_path / "run"), "--config", str(cfg), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    model = Mars.load(tmp_path / "run", path)
    assert model.plan.unannotated == ("exp0", "exp4") and model.plan.annotated == ("exp1", "exp2", "exp3")
    assert int(model.state["landmark_usage"].sum()) == 90 + 120  # both experiments chose landmarks
    r = CliRunner().invoke(main, ["annotate", str(path), "--model", str(tmp_path / "run"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    store = open_store(path)
    clusters = {}
    for name in ("exp0", "exp4"):
        codes, cats = store.categorical_codes("mars_cluster", *store.experiment_ranges[name])
        assert (np.asarray(codes) >= 0).all()
        clusters[name] = np.asarray(cats, dtype=object)[codes]
    for name in ("exp1", "exp2", "exp3"):
        codes, _ = store.categorical_codes("mars_cluster", *store.experiment_ranges[name])
        assert (np.asarray(codes) < 0).all()
    result = score_annotation(path, key_added="mars")
    assert result["unannotated"] == ["exp0", "exp4"] and set(result["per_experiment"]) == {"exp0", "exp4"}
    for name in ("exp0", "exp4"):  # each experiment against its own labels
        truth = _truth(store, name)
        assert result["metrics"]["ari"][name] == pytest.approx(adjusted_rand_score(truth, clusters[name]))
        assert result["per_experiment"][name]["unannotated"] == name
    assert "| exp4 |" in annotation_markdown(result)
    from mars_scale.plotting import plot

    paths = {p.name for p in plot(path, output_dir=tmp_path / "figures", max_cells=200, n_neighbors=10)}
    assert {"umap_cluster.png", "confusion_cluster.png", "confusion_name.png"} <= paths


def test_a_query_stops_fine_tuning_when_its_new_cells_keep_their_landmarks(tmp_path, monkeypatch):
    import mars_scale.train

    path = _store(tmp_path)
    Mars(path, reference_only=True, config=TINY).train(run_dir=tmp_path / "ref").save(tmp_path / "ref")
    runs = {}
    for stable in (1.0, 0.0):  # every epoch stable (stops after the first), none (runs them all)
        monkeypatch.setattr(mars_scale.train, "QUERY_STABLE", stable)
        runs[stable] = Mars(path, unannotated="exp0", n_clusters=3, config=TINY, reference=tmp_path / "ref").train()
    once, every = runs[1.0], runs[0.0]
    assert [h["stable"] for h in once.history] == [True]
    assert [h["stable"] for h in every.history] == [False, False, False]
    assert once.history[0]["changed"] == every.history[0]["changed"]  # the same first epoch
    # "changed" after the first epoch: the final network's nearest landmarks against the K-means initialisation
    index, z = once.embed(experiments=["exp0"], device="cpu")
    assignment, _ = nearest(z, once.unannotated_landmarks)
    init = once.state["kmeans_init"]
    np.testing.assert_array_equal(init["index"].numpy(), index)
    assert once.history[0]["changed"] == pytest.approx(np.mean(assignment != init["cluster"].numpy()))
    np.testing.assert_array_equal(once.state["landmark_usage"].numpy(), np.bincount(assignment, minlength=3))
    assert once.state.get("query_assignment") is None  # a training-only state, not kept in the model
    index, z = every.embed(experiments=["exp0"], device="cpu")
    assignment, _ = nearest(z, every.unannotated_landmarks)
    np.testing.assert_array_equal(every.state["landmark_usage"].numpy(), np.bincount(assignment, minlength=3))


@pytest.mark.parametrize("stable", [None, 0.0])
def test_a_query_reads_the_reference_once_and_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, stable):
    import mars_scale.train
    from mars_scale.loader import Loader

    if stable is not None:  # never stable: all epochs, so the resume starts a new one
        monkeypatch.setattr(mars_scale.train, "QUERY_STABLE", stable)
    path = _store(tmp_path)
    Mars(path, reference_only=True, config=TINY).train(run_dir=tmp_path / "ref").save(tmp_path / "ref")
    passes = []  # the experiments of every pass a loader starts over the store
    iterate = Loader.__iter__
    monkeypatch.setattr(Loader, "__iter__", lambda self: passes.append(tuple(self.experiments)) or iterate(self))
    query = Mars(path, unannotated="exp0", n_clusters=3, config=TINY, reference=tmp_path / "ref")
    query.train(run_dir=tmp_path / "run")
    annotated = ("exp1", "exp2", "exp3", "exp4")
    # the sample of the reference is drawn once; every epoch's class means and annotated batches come from memory
    assert passes.count(annotated) == 1 and set(passes) == {annotated, ("exp0",)}
    assert passes.count(("exp0",)) >= len(query.history)
    # a query stopped after an epoch and resumed (without --from) ends as the uninterrupted one
    part = Mars(path, unannotated="exp0", n_clusters=3, config=TINY, reference=tmp_path / "ref")
    part.train(run_dir=tmp_path / "part", stop_after_epoch=1)
    assert not part.is_trained
    resumed = Mars(path, unannotated="exp0", n_clusters=3, config=part.config).train(run_dir=tmp_path / "part", resume=True)
    assert resumed.state["reference"] == query.state["reference"]
    np.testing.assert_array_equal(resumed.unannotated_landmarks, query.unannotated_landmarks)
    for key, value in query.state["model"].items():
        torch.testing.assert_close(resumed.state["model"][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("cap, steps", [(None, 7), (128, 2)])
def test_a_reference_pretrains_on_at_most_annotated_cells_per_epoch(tmp_path, monkeypatch, cap, steps):
    """A reference's pretraining sees every annotated experiment; annotated_cells_per_epoch caps
    an epoch as in the later phases (410 annotated cells in batches of 64: 7 steps, or 2)."""
    from mars_scale import train as train_module

    path = _store(tmp_path)
    calls = []
    real = train_module.reconstruction_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "reconstruction_loss", counted)
    config = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, annotated_cells_per_epoch=cap))
    ref = Mars(path, reference_only=True, config=config).train()
    assert len(calls) == TINY.train.pretrain_epochs * steps
    assert [h["phase"] for h in ref.history].count("pretrain") == TINY.train.pretrain_epochs
