"""Naming and novelty scores: the metric definitions, a stored annotation, the removed-type protocol."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import adjusted_rand_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from conftest import make_adata
from mars_scale.annotate import annotate
from mars_scale.cli import main
from mars_scale.config import RunConfig, TrainConfig
from mars_scale.errors import InputError
from mars_scale.evaluate import (
    _hidden_type_store,
    baseline_comments,
    leave_one_out,
    leave_type_out,
    markdown_table,
    naming_metrics,
    score_annotation,
    write_report,
)
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.model import Mars
from mars_scale.nn import ModelConfig
from mars_scale.store import StoreLayout, open_store

TINY = RunConfig(
    model=ModelConfig(hidden=(32,), n_latent=8),
    train=TrainConfig(pretrain_epochs=2, finetune_epochs=3, batch_size=128, min_steps_per_epoch=2, device="cpu"),
)
TINY_TOML = (
    "[model]\nhidden = [32]\nn_latent = 8\n"
    "[train]\npretrain_epochs = 1\nfinetune_epochs = 1\nbatch_size = 128\n"
)


def _store(directory: Path, *, new_type_in_exp2: bool = False, unlabelled_exp2: bool = False,
           zarr_format: int = 3) -> Path:
    """300 cells, 60 genes; exp0 (90 cells) lacks type3; optionally type3 only in exp2."""
    adata = make_adata(300, 60, n_experiments=3, n_types=4, seed=21)
    adata.obs["experiment"] = pd.Categorical(np.repeat(["exp0", "exp1", "exp2"], [90, 110, 100]))
    types = adata.obs["cell_type"].astype(object).to_numpy()
    limit = 200 if new_type_in_exp2 else 90
    types[:limit][types[:limit] == "type3"] = "type0"
    if unlabelled_exp2:
        types[200:] = np.nan
    adata.obs["cell_type"] = pd.Categorical(types)
    directory.mkdir(parents=True, exist_ok=True)
    h5ad = directory / "cells.h5ad"
    adata.write_h5ad(h5ad)
    return ingest([h5ad], directory / "atlas.zarr",
                  config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1,
                                      layout=StoreLayout(zarr_format=zarr_format)))


def _snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _one_line_error(result, *patterns):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in result.output
    for p in patterns:
        assert p in err, err


# ------------------------------------------------------------------------------ the definitions


def test_naming_metrics_by_hand():
    truth = np.array(["A", "A", "A", "B", "B", "N", "N", "N", None, "A"], dtype=object)
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 1, 2, 3])
    cell_type = np.array(["A", "A", "A", "B", "B", "novel", "novel", "B", "novel", "novel"], dtype=object)
    novelty = np.array([0.1, 0.2, 0.1, 0.3, 0.2, 0.9, 0.8, 0.4, 0.7, 0.6])
    info = {0: {"label": "A", "description": "A (0.90)"}, 2: {"label": "novel", "description": "novel, closest to B"}}
    m = naming_metrics(truth, clusters, cell_type, novelty, cell_type == "novel", ["A", "B"], cluster_info=info)
    # known cells 0-4 and 9: only cell 9 is called novel, and it is the only one misnamed
    assert (m["n_labelled"], m["n_known"], m["n_new"], m["new_types"]) == (9, 6, 3, ["N"])
    assert m["known_called_novel"] == pytest.approx(1 / 6)
    assert m["known_name_accuracy"] == pytest.approx(5 / 6)
    assert m["new_called_novel"] == pytest.approx(2 / 3)
    # new scores 0.9, 0.8, 0.4 against known 0.1, 0.2, 0.1, 0.3, 0.2, 0.6: 17 of 18 pairs ordered
    assert m["novelty_auroc"] == pytest.approx(17 / 18)
    # N = {5, 6, 7}; cluster 2 = {5, 6, 8} shares 2 of 4, cluster 1 = {3, 4, 7} 1 of 5
    assert m["new_jaccard"] == {"N": pytest.approx(0.5)} and m["new_jaccard_mean"] == pytest.approx(0.5)
    labelled = np.array([t is not None for t in truth])
    assert m["ari"] == pytest.approx(adjusted_rand_score(truth[labelled].astype(str), clusters[labelled]))
    a, n = m["per_type"]["A"], m["per_type"]["N"]
    assert (a["n_cells"], a["known"], a["called_novel"], a["named_right"]) == (4, True, 0.25, 0.75)
    assert (a["majority_cluster"], a["majority_fraction"], a["cluster_description"]) == (0, 0.75, "A (0.90)")
    assert (n["known"], n["named_right"], n["majority_cluster"], n["cluster_label"]) == (False, None, 2, "novel")
    assert n["called_novel"] == pytest.approx(2 / 3)
    # per-cell outputs: closest type right for known cells 0, 1, 3, 9 of 0-4 and 9; right calls
    # (known named their type: 0-4; new called novel: 5, 6) against wrong ones (7, 9); cell 8
    # has no label
    closest = np.array(["A", "A", "B", "A", "B", "B", "A", "B", "A", "A"], dtype=object)
    confidence = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.4, 0.55, 0.1, 0.65])
    m = naming_metrics(truth, clusters, cell_type, novelty, cell_type == "novel", ["A", "B"],
                       closest_type=closest, confidence=confidence)
    assert m["known_closest_accuracy"] == pytest.approx(4 / 6)
    # right: 0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.4; wrong: 0.55, 0.65; pairs ordered: 2 + 2 + 2 + 1 + 0
    # + 2 + 0 = 9 of 14
    assert m["confidence_auroc"] == pytest.approx(9 / 14)
    assert m["known_closest_accuracy"] is not None and naming_metrics(
        truth, clusters, cell_type, novelty, cell_type == "novel", ["A", "B"])["confidence_auroc"] is None
    with pytest.raises(InputError, match="confidence has 3 entries"):
        naming_metrics(truth, clusters, cell_type, novelty, cell_type == "novel", ["A", "B"], confidence=confidence[:3])
    # without new cells, the new-type metrics are undefined, not zero
    known_only = naming_metrics(truth[:5], clusters[:5], cell_type[:5], novelty[:5], np.zeros(5, bool), ["A", "B"])
    assert known_only["novelty_auroc"] is None and known_only["new_called_novel"] is None
    assert known_only["new_jaccard_mean"] is None and known_only["known_called_novel"] == 0.0


def test_baseline_comments_say_when_a_baseline_beats_mars():
    def stat(mean):
        return {"ari": {"mean": mean, "sd": 0.0, "min": mean, "max": mean, "n": 2}}

    result = {
        "protocol": {"kind": "leave-one-experiment-out", "seeds": [0, 1]},
        "summary": {
            "exp0": {"n_cells": 10, "k": 2, "methods": {"mars": stat(0.6), "kmeans_ae": stat(0.5), "kmeans_pca": stat(0.8)}},
            "exp1": {"n_cells": 10, "k": 2, "methods": {"mars": stat(0.9), "kmeans_ae": stat(0.95), "kmeans_pca": stat(0.9)}},
        },
        "overall": {},
    }
    lines = baseline_comments(result)
    assert lines == [
        "K-means on PCA beats MARS on exp0: ARI 0.800 against 0.600 (mean of 2 seeds)",
        "K-means on AE beats MARS on exp1: ARI 0.950 against 0.900 (mean of 2 seeds)",
    ]
    md = markdown_table(result)
    assert all(f"- {line}" in md for line in lines)
    result["summary"]["exp0"]["methods"]["mars"] = stat(0.85)
    result["summary"]["exp1"]["methods"]["mars"] = stat(0.95)  # a tie is no win
    assert baseline_comments(result) == [] and "beats MARS" not in markdown_table(result)


# ------------------------------------------------------------------------ a stored annotation


@pytest.fixture(scope="module")
def annotated(tmp_path_factory):
    """exp2 held out and annotated; type3 occurs in exp2 only (a new type)."""
    path = _store(tmp_path_factory.mktemp("annotated"), new_type_in_exp2=True)
    model = Mars(path, unannotated="exp2", n_clusters=4, config=TINY).train()
    annotate(path, model, key_added="mars", seed=0, device="cpu")
    return path


def test_score_annotation_matches_an_independent_computation(annotated):
    before = _snapshot(annotated)
    result = score_annotation(annotated, key_added="mars")
    assert _snapshot(annotated) == before  # nothing written

    adata = ad.read_zarr(annotated)
    held = (adata.obs["experiment"] == "exp2").to_numpy()
    obs = adata.obs[held]
    truth = obs["cell_type"].astype(str).to_numpy()
    cluster = obs["mars_cluster"].astype(str).to_numpy()
    predicted = obs["mars_cell_type"].astype(str).to_numpy()
    record = adata.uns["mars"]
    novel = {str(c) for c, flag in zip(record["clusters"], record["is_novel"]) if flag}
    called = np.isin(cluster, list(novel))
    np.testing.assert_array_equal(called, predicted == "novel")
    reference_types = set(adata.obs.loc[~held, "cell_type"].astype(str))
    known = np.isin(truth, list(reference_types))
    assert set(truth[~known]) == {"type3"} and known.any()

    m = result["metrics"]
    assert result["unannotated"] == "exp2" and m["new_types"] == ["type3"]
    assert m["ari"] == pytest.approx(adjusted_rand_score(truth, cluster))
    assert m["known_called_novel"] == pytest.approx(called[known].mean())
    assert m["known_name_accuracy"] == pytest.approx((predicted[known] == truth[known]).mean())
    assert m["new_called_novel"] == pytest.approx(called[~known].mean())
    assert m["novelty_auroc"] == pytest.approx(roc_auc_score(~known, obs["mars_novelty"].to_numpy()))
    table = pd.crosstab(cluster, truth == "type3")
    jaccard = max(table.loc[c, True] / (table.loc[c].sum() + (truth == "type3").sum() - table.loc[c, True])
                  for c in table.index if True in table.columns)
    assert m["new_jaccard"]["type3"] == pytest.approx(jaccard)
    z = adata.obsm["X_mars"]
    ref = ~held
    knn = KNeighborsClassifier(n_neighbors=15).fit(z[ref], adata.obs["cell_type"].astype(str).to_numpy()[ref])
    assert m["integration_knn"] == pytest.approx((knn.predict(z[held][known]) == truth[known]).mean())
    closest = obs["mars_closest_type"].astype(str).to_numpy()
    assert m["known_closest_accuracy"] == pytest.approx((closest[known] == truth[known]).mean())
    right = np.where(known, predicted == truth, called)
    if right.all() or not right.any():
        assert m["confidence_auroc"] is None
    else:
        assert m["confidence_auroc"] == pytest.approx(roc_auc_score(right, obs["mars_confidence"].to_numpy()))
    t3 = result["per_type"]["type3"]
    assert t3["n_cells"] == int((truth == "type3").sum()) and not t3["known"]
    assert t3["called_novel"] == pytest.approx(called[truth == "type3"].mean())
    majority = pd.Series(cluster[truth == "type3"]).value_counts().index[0]
    assert str(t3["majority_cluster"]) == majority
    assert t3["cluster_description"] == dict(zip(map(str, record["clusters"]), record["description"]))[majority]


def test_an_annotation_without_per_cell_outputs_is_scored_without_them(annotated, tmp_path):
    import shutil

    import zarr

    copy = tmp_path / "older.zarr"
    shutil.copytree(annotated, copy)
    obs = zarr.open_group(copy / "obs", mode="r+")
    del obs["mars_closest_type"], obs["mars_confidence"]  # as an annotation of an earlier version
    m = score_annotation(copy, key_added="mars")["metrics"]
    assert m["known_closest_accuracy"] is None and m["confidence_auroc"] is None
    full = score_annotation(annotated, key_added="mars")["metrics"]
    assert full["known_closest_accuracy"] is not None
    assert (m["ari"], m["known_name_accuracy"]) == (full["ari"], full["known_name_accuracy"])


def test_cli_scores_a_stored_annotation(annotated, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["evaluate", str(annotated), "--annotation", "mars", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "known cells called novel" in result.stdout and "| type3 |" in result.stdout
    data = json.loads((out / "evaluation.json").read_text())
    assert data["protocol"]["kind"] == "annotation" and data["metrics"]["new_types"] == ["type3"]
    assert (out / "evaluation.md").read_text() in result.stdout
    assert not (out / "assignments.npz").exists()


def test_a_missing_annotation_or_truth_is_one_line_and_exit_2(annotated, tmp_path):
    runner = CliRunner()
    _one_line_error(runner.invoke(main, ["evaluate", str(annotated), "--annotation", "other", "-o", str(tmp_path / "o")]),
                    "no annotation under key 'other'", "obs/other_cluster")
    refused = runner.invoke(main, ["evaluate", str(annotated), "--annotation", "mars", "--seeds", "2"])
    assert refused.exit_code == 2 and "--seeds" in refused.output
    # an experiment without labels cannot be scored
    path = _store(tmp_path / "unlabelled", unlabelled_exp2=True)
    model = Mars(path, unannotated="exp2", n_clusters=3, config=TINY).train()
    annotate(path, model, key_added="mars", seed=0, device="cpu")
    with pytest.raises(InputError, match="'exp2' .* has no cell_type labels"):
        score_annotation(path)


# ------------------------------------------------------------------------ the removed-type protocol


@pytest.fixture(scope="module")
def plain_store(tmp_path_factory):
    return _store(tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_hiding_a_type_keeps_every_cell_and_links_x(plain_store, tmp_path, zarr_format):
    if zarr_format == 2:
        plain_store = _store(tmp_path / "v2", zarr_format=2)
    store = open_store(plain_store)
    before = _snapshot(plain_store)
    (tmp_path / "hidden").mkdir()
    hidden = open_store(_hidden_type_store(store, "exp1", "type1", tmp_path / "hidden"))
    assert (tmp_path / "hidden" / "atlas.zarr" / "X").is_symlink()
    assert hidden.n_cells == store.n_cells and hidden.experiment_ranges == store.experiment_ranges
    np.testing.assert_array_equal(hidden.read_rows(0, store.n_cells).toarray(), store.read_rows(0, store.n_cells).toarray())
    old, categories = store.categorical_codes("cell_type")
    new, _ = hidden.categorical_codes("cell_type")
    t = categories.index("type1")
    a, b = store.experiment_ranges["exp1"]
    inside = np.zeros(store.n_cells, dtype=bool)
    inside[a:b] = True
    np.testing.assert_array_equal(new[inside], old[inside])  # the held-out experiment keeps its labels
    assert (new[~inside & (old == t)] == -1).all() and (old[~inside] == t).any()
    np.testing.assert_array_equal(new[old != t], old[old != t])
    assert _snapshot(plain_store) == before


def test_removed_type_protocol_scores_the_hidden_type_as_new(plain_store, tmp_path):
    exp0 = ad.read_zarr(plain_store).obs.query("experiment == 'exp0'")["cell_type"].astype(str).value_counts()
    expected = sorted(t for t, n in exp0.items() if n >= 30)
    assert 0 < len(expected) < 3  # a threshold that keeps some types of exp0 and not others
    before = _snapshot(plain_store)
    work = tmp_path / "work"
    work.mkdir()
    result = leave_type_out(plain_store, "all", seeds=(0,), config=TINY, experiments=["exp0"], min_type_cells=30,
                            workdir=work)
    assert result["protocol"]["scenarios"] == [f"exp0 without {t}" for t in expected]
    assert [r["removed"] for r in result["runs"]] == expected
    for run in result["runs"]:
        t, naming = run["removed"], run["naming"]
        assert t not in naming["landmark_names"]
        assert naming["new_types"] == [t] and naming["n_new"] == exp0[t]
        assert not naming["per_type"][t]["known"] and naming["per_type"][t]["named_right"] is None
        assert naming["new_called_novel"] is not None and naming["novelty_auroc"] is not None
        assert naming["known_called_novel"] is not None and naming["integration_knn"] is not None
        assert run["k"] == 3  # the held-out experiment's own number of types
        assert set(run["metrics"]) == {"mars", "kmeans_ae", "kmeans_pca"}
    assert result["summary"][f"exp0 without {expected[0]}"]["new_types"] == [expected[0]]
    assert _snapshot(plain_store) == before and list(work.iterdir()) == []  # temporary stores removed
    md = markdown_table(result)
    assert f"| exp0 without {expected[0]} | {expected[0]} |" in md
    paths = write_report(result, tmp_path / "out")
    npz = np.load(paths["assignments"])
    assert f"exp0/-{expected[0]}/0/mars/cluster" in npz.files


def test_removed_type_errors(plain_store):
    with pytest.raises(InputError, match="unknown cell type 'typeX'"):
        leave_type_out(plain_store, ["typeX"], config=TINY)
    with pytest.raises(InputError, match="no held-out experiment holds cell type 'type3'"):
        leave_type_out(plain_store, ["type3"], config=TINY, experiments=["exp0"])  # exp0 lacks type3


def test_cli_remove_type(plain_store, tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY_TOML)
    out = tmp_path / "eval"
    runner = CliRunner()
    result = runner.invoke(main, ["evaluate", str(plain_store), "--remove-type", "type1", "--experiment", "exp1",
                                  "--experiment", "exp2", "--config", str(config), "--device", "cpu", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "| exp1 without type1 |" in result.stdout and "| exp2 without type1 |" in result.stdout
    assert "2 trainings" in result.stderr and "first training took" in result.stderr  # the cost estimate
    data = json.loads((out / "evaluation.json").read_text())
    assert data["protocol"]["kind"] == "removed-type" and data["protocol"]["seeds"] == [0]
    for line in data["comments"]:  # every case where a baseline beats MARS is said
        assert f"- {line}" in result.stdout
    _one_line_error(runner.invoke(main, ["evaluate", str(plain_store), "--remove-type", "typeX", "-o", str(out)]),
                    "unknown cell type 'typeX'")
    both = runner.invoke(main, ["evaluate", str(plain_store), "--remove-type", "type1", "--leave-one-out"])
    assert both.exit_code == 2 and "only one of" in both.output


# ---------------------------------------------------------------------------------- real data


def test_removed_type_protocol_on_real_data(tmp_path):
    """CELseq2 held out, H2228 hidden (not dropped) from 10x and Drop-seq: called new, the rest named.

    Measured with the default configuration (seed 0, 11-13 s on 2 busy cores): ARI 1, H2228 all called
    novel, the two known lines all named right, novelty AUROC 1.
    """
    from test_evaluate import REAL_CONFIG, _real_store

    store = _real_store(tmp_path, hold_out="CELseq2")
    result = leave_type_out(store, ["H2228"], seeds=(0,), config=REAL_CONFIG, experiments=["CELseq2"])
    run = result["runs"][0]
    naming = run["naming"]
    assert naming["landmark_names"] == ["H1975", "HCC827"] and naming["new_types"] == ["H2228"]
    assert run["metrics"]["mars"]["ari"] > 0.9
    assert naming["new_called_novel"] >= 0.9 and naming["novelty_auroc"] >= 0.9
    assert naming["known_called_novel"] <= 0.1 and naming["known_name_accuracy"] >= 0.9
    assert naming["per_type"]["H2228"]["cluster_label"] == "novel"


def test_a_one_type_reference_on_real_data(tmp_path):
    """Pancreas, batch_1 held out, every beta cell dropped from batch_4 and batch_5: the reference
    holds one type (ductal). The margin score called the held-out ductal cells new there (a
    single name leaves only the distance in radii); the matching rule keeps them ductal and
    calls the beta cells new.

    Measured with the default configuration (seed 0; benchmarks/novelty.py): ARI 0.980, known
    cells called novel 0.02, beta cells called novel 1.000.
    """
    import anndata as ad

    from conftest import shared_file
    from test_evaluate import REAL_CONFIG

    adata = ad.read_h5ad(shared_file("pancreas_3studies_beta_ductal_mini.h5ad"))
    drop = ((adata.obs["cell_type"] == "beta") & (adata.obs["experiment"] != "batch_1")).to_numpy()
    adata[~drop].copy().write_h5ad(tmp_path / "cells.h5ad")
    store = ingest([tmp_path / "cells.h5ad"], tmp_path / "atlas.zarr",
                   config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=5))
    result = leave_one_out(store, seeds=(0,), config=REAL_CONFIG, experiments=["batch_1"])
    naming = result["runs"][0]["naming"]
    assert naming["landmark_names"] == ["ductal"] and naming["new_types"] == ["beta"]
    assert naming["new_called_novel"] >= 0.9 and naming["novelty_auroc"] >= 0.9
    assert naming["known_called_novel"] <= 0.1 and naming["known_name_accuracy"] >= 0.9
