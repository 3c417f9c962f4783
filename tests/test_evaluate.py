"""Leave-one-experiment-out evaluation on a tiny store, and the naming checks on real data."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import make_adata, shared_file
from mars_scale.cli import main
from mars_scale.config import RunConfig, TrainConfig
from mars_scale.errors import InputError
from mars_scale.evaluate import METHODS, leave_one_out, markdown_table, naming_report, write_report
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.metrics import clustering_metrics
from mars_scale.nn import ModelConfig

TINY = RunConfig(
    model=ModelConfig(hidden=(32,), n_latent=8),
    train=TrainConfig(pretrain_epochs=2, finetune_epochs=2, batch_size=128, min_steps_per_epoch=2, device="cpu"),
)


def _store(directory: Path, *, shuffle_held_out: str | None = None, name: str = "atlas.zarr") -> Path:
    adata = make_adata(300, 60, n_experiments=3, n_types=4, seed=21)
    adata.obs["experiment"] = pd.Categorical(np.repeat(["exp0", "exp1", "exp2"], [90, 110, 100]))
    # exp0 lacks type3: K must follow the held-out experiment's own number of types
    types = adata.obs["cell_type"].astype(str).to_numpy()
    types[:90][types[:90] == "type3"] = "type0"
    if shuffle_held_out is not None:  # permute the labels inside one experiment only
        mine = (adata.obs["experiment"] == shuffle_held_out).to_numpy()
        types[mine] = np.random.default_rng(0).permutation(types[mine])
    adata.obs["cell_type"] = pd.Categorical(types)
    directory.mkdir(parents=True, exist_ok=True)
    h5ad = directory / "cells.h5ad"
    adata.write_h5ad(h5ad)
    return ingest([h5ad], directory / name,
                  config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    store = _store(tmp_path_factory.mktemp("evaluate"))
    return store, leave_one_out(store, seeds=(0, 1), config=TINY, experiments=["exp0", "exp1"])


def test_leave_one_out_structure(evaluated):
    _, result = evaluated
    runs = result["runs"]
    assert [(r["experiment"], r["seed"]) for r in runs] == [("exp0", 0), ("exp0", 1), ("exp1", 0), ("exp1", 1)]
    assert {r["k"] for r in runs if r["experiment"] == "exp0"} == {3}  # exp0 holds 3 types
    assert {r["k"] for r in runs if r["experiment"] == "exp1"} == {4}
    for run in runs:
        assert set(run["metrics"]) == set(METHODS)
        for method in METHODS:
            assert run["metrics"][method] is not None, method
            assert set(run["metrics"][method]) == {"accuracy", "precision", "recall", "f1", "nmi", "ami", "ari"}
        assert run["n_cells"] == (90 if run["experiment"] == "exp0" else 110)
    assert set(result["summary"]) == {"exp0", "exp1"}
    assert set(result["overall"]) == set(METHODS)
    assert result["protocol"]["seeds"] == [0, 1] and result["protocol"]["k"] == "truth"


def test_leave_one_out_scores_naming_and_novelty(evaluated):
    _, result = evaluated
    for run in result["runs"]:
        naming = run["naming"]
        # every type of the held-out experiment occurs in another one: nothing is new
        assert naming["landmark_names"] == ["type0", "type1", "type2", "type3"]
        assert naming["new_types"] == [] and naming["new_called_novel"] is None and naming["novelty_auroc"] is None
        assert naming["n_known"] == run["n_cells"]
        # the per-type table adds up to the summary figures
        per_type = naming["per_type"]
        named = sum(t["named_right"] * t["n_cells"] for t in per_type.values())
        novel = sum(t["called_novel"] * t["n_cells"] for t in per_type.values())
        assert naming["known_name_accuracy"] == pytest.approx(named / run["n_cells"])
        assert naming["known_called_novel"] == pytest.approx(novel / run["n_cells"])
        assert 0 <= naming["integration_knn"] <= 1
        sizes = [c["n_cells"] for c in naming["clusters"]]
        assert sum(sizes) == run["n_cells"] and min(sizes) >= 10  # small landmarks merged, as annotate does
    for exp in ("exp0", "exp1"):
        values = [r["naming"]["known_name_accuracy"] for r in result["runs"] if r["experiment"] == exp]
        stat = result["summary"][exp]["naming"]["known_name_accuracy"]
        assert stat["n"] == 2 and stat["mean"] == pytest.approx(np.mean(values))
        assert result["summary"][exp]["naming"]["novelty_auroc"] is None
    assert result["overall_naming"]["known_name_accuracy"] == pytest.approx(
        np.mean([result["summary"][e]["naming"]["known_name_accuracy"]["mean"] for e in ("exp0", "exp1")]))
    # the comments are the cases where a baseline's mean ARI is above MARS's
    wins = [(e, m) for e, s in result["summary"].items() for m in ("kmeans_ae", "kmeans_pca")
            if s["methods"][m]["ari"]["mean"] > s["methods"]["mars"]["ari"]["mean"]]
    assert len(result["comments"]) == len(wins)


def test_metrics_agree_with_the_returned_assignments(evaluated):
    store, result = evaluated
    a_ranges = {"exp0": (0, 90), "exp1": (90, 200)}
    truth_all = ad.read_zarr(store).obs["cell_type"].astype(object).to_numpy()
    for run in result["runs"]:
        lo, hi = a_ranges[run["experiment"]]
        for method in METHODS:
            a = run["assignments"][method]
            assert ((a["index"] >= lo) & (a["index"] < hi)).all()
            assert list(a["truth"]) == list(truth_all[a["index"]])
            assert clustering_metrics(a["truth"], a["cluster"]) == pytest.approx(run["metrics"][method])
        # MARS and PCA cover every held-out cell; K clusters at most
        assert len(run["assignments"]["mars"]["index"]) == hi - lo
        assert run["assignments"]["mars"]["cluster"].max() < run["k"]
    # the summary is the mean and sample sd over seeds
    for exp in ("exp0", "exp1"):
        aris = [r["metrics"]["mars"]["ari"] for r in result["runs"] if r["experiment"] == exp]
        stat = result["summary"][exp]["methods"]["mars"]["ari"]
        assert stat["mean"] == pytest.approx(np.mean(aris)) and stat["sd"] == pytest.approx(np.std(aris, ddof=1))
    overall = np.mean([result["summary"][e]["methods"]["kmeans_pca"]["nmi"]["mean"] for e in ("exp0", "exp1")])
    assert result["overall"]["kmeans_pca"]["nmi"] == pytest.approx(overall)


def test_held_out_labels_do_not_influence_training(tmp_path, evaluated):
    """Permuting the labels inside the held-out experiment changes the scores, not the clusters."""
    _, result = evaluated
    shuffled = _store(tmp_path, shuffle_held_out="exp1")
    other = leave_one_out(shuffled, seeds=(0,), config=TINY, experiments=["exp1"])
    mine = next(r for r in result["runs"] if r["experiment"] == "exp1" and r["seed"] == 0)
    for method in METHODS:
        np.testing.assert_array_equal(other["runs"][0]["assignments"][method]["cluster"], mine["assignments"][method]["cluster"])


def test_reports_are_written(evaluated, tmp_path):
    _, result = evaluated
    paths = write_report(result, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["exp0"]["methods"]["mars"]["ari"]["n"] == 2
    assert "assignments" not in data["runs"][0]
    md = paths["markdown"].read_text()
    assert md == markdown_table(result)
    assert "| exp0 | 90 | 3 |" in md and "K-means on PCA" in md and "±" in md
    assert "known named right" in md and "| exp0 | – |" in md  # the naming table, no new type
    assert data["runs"][0]["naming"]["landmark_names"] == ["type0", "type1", "type2", "type3"]
    npz = np.load(paths["assignments"])
    np.testing.assert_array_equal(npz["exp1/1/mars/cluster"], result["runs"][3]["assignments"]["mars"]["cluster"])


def test_bad_arguments(evaluated):
    store, _ = evaluated
    with pytest.raises(InputError, match="unknown experiment 'nope'"):
        leave_one_out(store, seeds=(0,), config=TINY, experiments=["nope"])
    with pytest.raises(InputError, match="seeds"):
        leave_one_out(store, seeds=(), config=TINY)
    with pytest.raises(InputError, match="k must be"):
        leave_one_out(store, seeds=(0,), config=TINY, k=0)


def test_k_chosen_by_mars(evaluated):
    """k="auto": each run's K and clusters are those of Mars(n_clusters="auto") trained alone."""
    import dataclasses

    from mars_scale.landmarks import nearest
    from mars_scale.model import Mars

    store, _ = evaluated
    result = leave_one_out(store, seeds=(0,), config=TINY, experiments=["exp1"], k="auto")
    run = result["runs"][0]
    cfg = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, seed=0))
    alone = Mars(store, unannotated="exp1", n_clusters="auto", config=cfg).train()
    assert run["k"] == alone.plan.n_clusters == alone.state["n_clusters_choice"]["n_clusters"]
    index, z = alone.embed(experiments=["exp1"], device="cpu")
    assign, _ = nearest(z[np.argsort(index)], alone.unannotated_landmarks)
    np.testing.assert_array_equal(run["assignments"]["mars"]["cluster"], assign)
    assert len(np.unique(run["assignments"]["kmeans_pca"]["cluster"])) <= run["k"]
    assert result["protocol"]["k"] == "auto" and result["summary"]["exp1"]["k"] == run["k"]


def test_cli_evaluate(evaluated, tmp_path):
    store, _ = evaluated
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[model]\nhidden = [32]\nn_latent = 8\n"
        "[train]\npretrain_epochs = 1\nfinetune_epochs = 1\nbatch_size = 128\n"
    )
    runner = CliRunner()
    out = tmp_path / "eval"
    result = runner.invoke(main, ["evaluate", str(store), "--leave-one-out", "--seeds", "1", "--experiment", "exp2",
                                  "--config", str(config), "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "| exp2 | 100 | 4 |" in result.output
    assert (out / "evaluation.json").exists() and (out / "evaluation.md").exists()
    refused = runner.invoke(main, ["evaluate", str(store), "--seeds", "1"])
    assert refused.exit_code == 2 and "--leave-one-out" in refused.output and "--annotation" in refused.output
    bad_k = runner.invoke(main, ["evaluate", str(store), "--leave-one-out", "--n-clusters", "many"])
    assert bad_k.exit_code == 2 and "--n-clusters" in bad_k.output
    stored = runner.invoke(main, ["evaluate", str(store), "--annotation", "mars", "--n-clusters", "auto"])
    assert stored.exit_code == 2 and "--n-clusters" in stored.output


# ---------------------------------------------------------------------------------- real data
# cellbench_3cl_3protocols_panel: three cell lines in each of three protocols. CELseq2 is held
# out; its types all occur in 10x and Drop-seq.

REAL = "cellbench_3cl_3protocols_panel.h5ad"
REAL_CONFIG = RunConfig(train=TrainConfig(device="cpu"))
# Measured with the default configuration: ARI 1, name accuracy 1.000 with every type shared;
# with H2228 removed from the annotated experiments its cluster is called novel and the known
# ones keep their names (matching, mars_scale.naming; benchmarks/novelty.py).


def _real_store(directory: Path, *, hold_out: str, remove_type: str | None = None) -> Path:
    adata = ad.read_h5ad(shared_file(REAL))
    if remove_type is not None:  # drop the type from every annotated experiment
        drop = (adata.obs["cell_type"] == remove_type) & (adata.obs["experiment"] != hold_out)
        adata = adata[~drop.to_numpy()].copy()
    directory.mkdir(parents=True, exist_ok=True)
    h5ad = directory / "cells.h5ad"
    adata.write_h5ad(h5ad)
    return ingest([h5ad], directory / "atlas.zarr",
                  config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=5))


def test_names_of_shared_types_on_real_data(tmp_path, record_property):
    store = _real_store(tmp_path, hold_out="CELseq2")
    report = naming_report(store, unannotated="CELseq2", config=REAL_CONFIG, seed=0)
    record_property("name_accuracy", report["name_accuracy"])
    record_property("best_name_accuracy", report["best_name_accuracy"])
    print(f"name accuracy (CELseq2 held out, all types shared): {report['name_accuracy']:.3f} "
          f"(most probable names {report['best_name_accuracy']:.3f}), ARI {report['ari']:.3f}")
    assert report["novel_types"] == []
    assert report["ari"] > 0.9 and report["best_name_accuracy"] >= 0.9
    assert report["name_accuracy"] >= 0.9


def test_a_removed_type_is_flagged_novel_on_real_data(tmp_path, record_property):
    store = _real_store(tmp_path, hold_out="CELseq2", remove_type="H2228")
    report = naming_report(store, unannotated="CELseq2", config=REAL_CONFIG, seed=0)
    per_type = report["per_type"]
    record_property("novelty_removed", per_type["H2228"]["novelty"])
    print("novelty per true type:", {t: round(v["novelty"], 3) for t, v in per_type.items()})
    assert report["novel_types"] == ["H2228"]
    assert report["ari"] > 0.9
    assert per_type["H2228"]["is_novel"] and per_type["H2228"]["label"] == "novel"
    # and the known types keep their names (otherwise "novel" would be said of everything)
    for t in ("H1975", "HCC827"):
        assert per_type[t]["majority_fraction"] > 0.9
        assert not per_type[t]["is_novel"] and per_type[t]["label"] == t, per_type[t]
