"""The split test for populations the reference lacks (mars_scale.subpopulations), and the
naming of such parts (name_clusters(decided=...)), on small stores with a known answer."""

from __future__ import annotations

import anndata as ad
import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from mars_scale.errors import InputError
from mars_scale.naming import name_clusters, name_confusion
from mars_scale.preprocess import normalized_rows
import mars_scale.subpopulations as subpopulations
from mars_scale.subpopulations import (bimodal_threshold, bimodality, excess_variance_genes, find_parts,
                                       name_with_parts, own_share, resolve_siblings)

N_GENES = 300
EXPERIMENTS = ("ref1", "ref2", "query")


def _brute_force_bimodality(values):
    """Every split of the sorted values with at least 3 on each side, by the definition."""
    x = np.sort(values)
    best = None
    for k in range(3, x.size - 2):
        low, high = x[:k], x[k:]
        sse = ((low - low.mean()) ** 2).sum() + ((high - high.mean()) ** 2).sum()
        if best is None or sse < best[0]:
            spread = np.sqrt((low.var() * low.size + high.var() * high.size) / x.size)
            best = (sse, (high.mean() - low.mean()) / spread, (low.mean() + high.mean()) / 2)
    return best[1], best[2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bimodality_is_the_best_two_means_split(seed):
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.normal(0, 1, 40), rng.normal(rng.uniform(0, 6), 1, 25)])
    dprime, cut = bimodality(rng.permutation(values))
    want_dprime, want_cut = _brute_force_bimodality(values)
    assert dprime == pytest.approx(want_dprime, rel=1e-9)
    assert cut == pytest.approx(want_cut, rel=1e-9)


def test_bimodality_separates_two_populations_from_one():
    rng = np.random.default_rng(3)
    one = rng.normal(0, 1, 400)
    two = np.concatenate([rng.normal(0, 1, 200), rng.normal(6, 1, 200)])
    assert bimodality(one)[0] < bimodal_threshold(400) <= bimodality(two)[0]
    assert bimodality(np.arange(5.0))[0] == 0.0  # too few values to split
    # the threshold is never below MIN_DPRIME and falls with the sample size
    assert bimodal_threshold(20) > bimodal_threshold(200) >= 3.5
    assert bimodal_threshold(5) == np.inf
    assert bimodal_threshold(1000, floor=4.5) == 4.5 and bimodal_threshold(10, floor=4.5) == 6.33


def test_excess_variance_genes_rank_variance_against_genes_of_similar_mean():
    rng = np.random.default_rng(4)
    mean = np.concatenate([rng.uniform(0.1, 5.0, 200), [0.0, 0.0]])
    variance = mean * rng.uniform(0.9, 1.1, mean.size)  # a Poisson-like trend
    variance[7] = mean[7] * 3.0  # raised for its mean
    variance[-2] = 1.0  # not expressed: never taken
    top = excess_variance_genes(mean, variance, 1, n_bins=10)
    assert top.tolist() == [7]
    assert np.argmax(variance) != 7  # the raw variance would take a highly expressed gene
    # an independent computation of the score: bins of equal size by mean, robust z in each
    expressed = np.flatnonzero(mean > 0)
    bins = np.array_split(expressed[np.argsort(mean[expressed], kind="stable")], 10)
    score = np.full(mean.size, -np.inf)
    for b in bins:
        med = np.median(variance[b])
        score[b] = (variance[b] - med) / np.median(np.abs(variance[b] - med))
    np.testing.assert_array_equal(excess_variance_genes(mean, variance, 30, n_bins=10),
                                  np.sort(np.argsort(-score, kind="stable")[:30]))
    # asking for more genes than are expressed gives every expressed gene, sorted
    np.testing.assert_array_equal(excess_variance_genes(mean, variance, 500), expressed)


def test_a_split_counts_only_when_each_half_finds_it_in_the_other(monkeypatch):
    # 200 cells, two populations 8 apart on gene 0, noise elsewhere: the split on gene 0 replicates
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1, (200, 40))
    x[:100, 0] += 8.0
    cells = sp.csr_matrix(x - x.min())
    found = subpopulations._split(cells, n_genes=40, n_components=5, min_part_cells=10,
                                  rng=np.random.default_rng(0))
    assert found is not None and found["margin"] >= 1.0
    # a direction that only one half yields (here: gene 0, then a noise gene) is not a split
    directions = iter([np.eye(40)[0], np.eye(40)[1]])
    monkeypatch.setattr(subpopulations, "_two_means_direction", lambda *a, **k: next(directions))
    assert subpopulations._split(cells, n_genes=40, n_components=5, min_part_cells=10,
                                 rng=np.random.default_rng(0)) is None


def _log_normalised(counts):
    return sp.csr_matrix(np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4))


def _cluster_counts(rng, *, library, profiles):
    """Poisson counts of cells with the given library sizes and per-cell gene profiles."""
    counts = rng.poisson(library[:, None] * profiles).astype(np.float64)
    counts[counts.sum(axis=1) == 0, 0] = 1.0
    return counts


def test_a_split_along_the_cells_quality_is_not_a_type(monkeypatch):
    # one type, a third of its cells sequenced 7 times less deeply (damaged or empty-ish cells):
    # they detect fewer genes, which makes them a second mode; a subtype with the same depth is not
    rng = np.random.default_rng(0)
    profile = rng.gamma(0.5, 1.0, 200)
    profile /= profile.sum()
    shallow = np.arange(300) < 100
    library = np.where(shallow, 300.0, 2000.0) * rng.lognormal(0.0, 0.3, 300)
    damaged = _log_normalised(_cluster_counts(rng, library=library, profiles=np.tile(profile, (300, 1))))
    subtype_profile = profile.copy()
    subtype_profile[:25] *= 4.0
    subtype_profile /= subtype_profile.sum()
    subtype = _log_normalised(_cluster_counts(rng, library=2000.0 * rng.lognormal(0.0, 0.3, 300),
                                              profiles=np.where(shallow[:, None], subtype_profile, profile)))
    options = {"n_genes": 100, "n_components": 10, "min_part_cells": 10}
    assert subpopulations._split(damaged, rng=np.random.default_rng(1), **options) is None
    found = subpopulations._split(subtype, rng=np.random.default_rng(1), **options)
    assert found is not None
    side = np.asarray(subtype[:, found["genes"]] @ found["w"] > found["cut"]).ravel()
    assert (side == shallow).mean() > 0.95 or (side != shallow).mean() > 0.95
    # without the quality check the shallow cells are a split: the check is what stops it
    monkeypatch.setattr(subpopulations, "QUALITY_SHARE", np.inf)
    split = subpopulations._split(damaged, rng=np.random.default_rng(1), **options)
    assert split is not None
    side = np.asarray(damaged[:, split["genes"]] @ split["w"] > split["cut"]).ravel()
    assert (side == shallow).mean() > 0.9 or (side != shallow).mean() > 0.9


def test_quality_shift_matches_a_dense_reference():
    rng = np.random.default_rng(2)
    counts = rng.poisson(rng.uniform(0.05, 3.0, (80, 30))).astype(np.float64)
    counts[:, 0] += 1.0
    counts[:30, 1] += rng.poisson(20.0, 30)  # column 1 mitochondrial: raised in the first 30 cells
    cells = _log_normalised(counts)
    side = np.zeros(80, dtype=bool)
    side[:30] = True

    def standardised(q):
        a, b = q[side], q[~side]
        pooled = np.sqrt((a.var() * a.size + b.var() * b.size) / q.size)
        return abs(a.mean() - b.mean()) / pooled

    detected = np.log1p((counts > 0).sum(axis=1))
    mito_share = counts[:, [1, 4]].sum(axis=1) / counts.sum(axis=1)
    assert subpopulations._quality_shift(cells, side) == pytest.approx(standardised(detected), rel=1e-9)
    assert subpopulations._quality_shift(cells, side, np.array([1, 4])) == pytest.approx(
        max(standardised(detected), standardised(mito_share)), rel=1e-5)
    assert standardised(mito_share) > standardised(detected)  # the mitochondrial share decides here


def test_mitochondrial_genes_are_the_mt_prefixed_names():
    genes = ["MT-CO1", "CD3E", "mt-Nd1", "MTOR", "ENSG00000198804", "Mt-Atp6"]
    np.testing.assert_array_equal(subpopulations.mitochondrial_genes(genes), [0, 2, 5])
    assert subpopulations.mitochondrial_genes(["A", "B"]).size == 0


def test_normalized_rows_matches_a_dense_reference(small_store):
    from mars_scale.store import open_store

    store = open_store(small_store)
    rows = np.array([0, 3, 4, 100, 101, 250, store.n_cells - 1])
    got = normalized_rows(store, rows, block_rows=16).toarray()
    counts = store.read_rows(0, store.n_cells).toarray()[rows].astype(np.float64)
    target = float(store.meta.get("preprocessing", {}).get("target_sum", 1e4))
    want = np.log1p(counts / counts.sum(axis=1, keepdims=True) * target)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert normalized_rows(store, np.zeros(0, dtype=np.int64)).shape == (0, store.n_genes)
    with pytest.raises(InputError, match="sorted"):
        normalized_rows(store, np.array([5, 2]))


# ------------------------------------------------------------------------------------------
# a small atlas: types A, B, C in two annotated experiments; the query holds A, B, C and A2, a
# subtype of A (A's programme plus 25 genes raised), which the embedding below cannot see.


def _atlas(tmp_path, *, reference_a2: str | None, fold: float = 12.0, condition: bool = False,
           a_condition: str | None = None):
    """``reference_a2``: None (A2 only in the query), "as A" (A2 cells in the reference,
    labelled A) or "own" (A2 in the reference with its own label). ``condition``: every other
    cell of every type and experiment has 30 genes up 8-fold (a stimulation within each
    experiment). ``a_condition``: the same stimulation of A's (and A2's) cells only (a
    response of one lineage): "separate", in every other such cell of the query and in all of
    ref2's (a stimulated run; ref1 is the control run); "within", in every other such cell of
    every experiment."""
    from mars_scale.ingest import IngestConfig, ingest

    rng = np.random.default_rng(0)
    base = rng.lognormal(-0.5, 0.8, N_GENES)
    programmes = {t: rng.lognormal(0.0, 1.0, N_GENES) for t in "ABC"}
    programmes["A2"] = programmes["A"].copy()
    programmes["A2"][rng.choice(N_GENES, 25, replace=False)] *= fold
    stimulated = np.ones(N_GENES)
    if condition or a_condition is not None:
        stimulated[np.random.default_rng(7).choice(N_GENES, 30, replace=False)] = 8.0
    cells, obs = [], []
    for e in EXPERIMENTS:
        shift = rng.lognormal(0.0, 0.2, N_GENES)  # a batch effect per experiment
        types = ["A"] * 150 + ["B"] * 150 + ["C"] * 150
        if e == "query" or reference_a2 is not None:
            types += ["A2"] * 120
        for i, t in enumerate(types):
            mu = base * programmes[t] * shift * rng.lognormal(0.0, 0.2) * 3.0
            if condition and i % 2 or a_condition and t in ("A", "A2") and (
                    e == "ref2" and a_condition == "separate" or (e == "query" or a_condition == "within") and i % 2):
                mu = mu * stimulated
            cells.append(rng.poisson(mu))
            label = t if (e == "query" or t != "A2" or reference_a2 == "own") else "A"
            obs.append((e, label))
    obs = pd.DataFrame(obs, columns=["experiment", "cell_type"], index=[f"c{i}" for i in range(len(obs))])
    obs = obs.astype("category")
    adata = ad.AnnData(sp.csr_matrix(np.asarray(cells, dtype=np.float32)), obs=obs,
                       var=pd.DataFrame(index=[f"g{j}" for j in range(N_GENES)]))
    h5ad = tmp_path / "cells.h5ad"
    adata.write_h5ad(h5ad)
    return ingest([h5ad], tmp_path / "atlas.zarr",
                  config=IngestConfig(experiment_key="experiment", label_key="cell_type"))


def _embedding(labels, rng):
    """An embedding that knows A, B and C and puts A2 within A's spread, a little off A's place
    (the network maps cells like the reference's A onto A; A2 deviates)."""
    centres = {"A": [0.0, 0.0], "A2": [0.8, 0.0], "B": [10.0, 0.0], "C": [0.0, 10.0]}
    return np.asarray([centres[t] for t in labels]) + rng.normal(0, 1.0, (len(labels), 2))


def _query_naming(store):
    rng = np.random.default_rng(1)
    a, b = store.experiment_ranges["query"]
    codes, cats = store.categorical_codes("cell_type", 0, store.n_cells)
    labels = np.asarray(cats, dtype=object)[codes]
    z = _embedding(labels, rng)
    ref = np.arange(store.n_cells) < a
    names = sorted(set(labels[ref]))
    landmarks = np.stack([z[ref & (labels == n)].mean(axis=0) for n in names])
    truth = labels[a:b]
    clusters = np.select([np.isin(truth, ["A", "A2"]), truth == "B"], [0, 1], 2)  # A and A2 merged

    def name(assignment, decided):
        return name_clusters(z[a:b], assignment, landmarks, names, decided=decided, rng=0)

    return name, clusters, z[a:b], truth


def test_a_subtype_the_reference_lacks_is_split_off_and_called_new(tmp_path):
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None))
    name, clusters, z, truth = _query_naming(store)
    before = name(clusters, None)
    assert not before.is_novel.any()  # the embedding alone calls A2 "A"
    naming, assignment, parts = name_with_parts(name, store, np.arange(*store.experiment_ranges["query"]), clusters, z,
                                                annotated=["ref1", "ref2"])
    assert len(parts) == 1 and parts[0].cluster == 0 and parts[0].name == "A" and parts[0].novel
    part = np.zeros(truth.size, dtype=bool)
    part[parts[0].cells] = True
    # the part is A2, nearly exactly, and it alone is called new
    assert (truth[part] == "A2").mean() > 0.95 and part[truth == "A2"].mean() > 0.95
    novel = naming.cell_is_novel
    assert novel[truth == "A2"].mean() > 0.95 and novel[truth != "A2"].mean() < 0.02
    j = int(np.flatnonzero(naming.clusters == parts[0].new_cluster)[0])
    assert naming.part_of[j] == int(np.flatnonzero(naming.clusters == 0)[0])
    assert naming.compared_name[j] == "A" and naming.is_novel[j]
    assert naming.describe(j).startswith("novel (split from cluster 0), closest to A (")
    assert np.array_equal(assignment[part], np.full(part.sum(), parts[0].new_cluster))
    # the remaining clusters keep their names
    for t, c in (("B", 1), ("C", 2)):
        assert naming.label[int(np.flatnonzero(naming.clusters == c)[0])] == t


def test_no_part_when_the_reference_holds_both_populations_under_one_name(tmp_path):
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2="as A"))
    name, clusters, z, truth = _query_naming(store)
    parts = find_parts(store, np.arange(*store.experiment_ranges["query"]), clusters, z, name(clusters, None),
                       annotated=["ref1", "ref2"])
    assert parts == []


def test_two_known_siblings_in_one_cluster_are_split_and_both_named(tmp_path):
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2="own"))
    name, clusters, z, truth = _query_naming(store)
    before = name(clusters, None)
    assert "A2" in set(before.names)  # a reference name, at A's place in this embedding: A's sibling
    assert (before.cell_type[truth == "A2"] == "A2").mean() < 0.05 or (before.cell_type[truth == "A"] == "A").mean() < 0.05
    rows = np.arange(*store.experiment_ranges["query"])
    naming, assignment, parts = name_with_parts(name, store, rows, clusters, z, annotated=["ref1", "ref2"])
    assert len(parts) == 1 and not parts[0].novel and {parts[0].name, parts[0].parent_name} == {"A", "A2"}
    for t in ("A", "A2", "B", "C"):
        assert (naming.cell_type[truth == t] == t).mean() > 0.95, t
    assert not naming.cell_is_novel.any()


def test_name_confusion_matches_a_dense_count():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(200, 3)).astype(np.float32)
    landmarks = rng.normal(size=(5, 3)).astype(np.float32)
    landmark_names = np.array([0, 0, 1, 2, 2])
    own = rng.integers(-1, 3, 200)  # -1: a label that is no landmark name
    got = name_confusion(z, own, landmarks, landmark_names, 3)
    want = np.zeros((3, 3), dtype=np.int64)
    for cell, label in zip(z, own):
        if label >= 0:
            nearest = int(np.argmin([np.sum((cell - lm) ** 2) for lm in landmarks]))
            want[label, landmark_names[nearest]] += 1
    np.testing.assert_array_equal(got, want)
    halves = name_confusion(z[:90], own[:90], landmarks, landmark_names, 3) + name_confusion(
        z[90:], own[90:], landmarks, landmark_names, 3)
    np.testing.assert_array_equal(halves, want)


def _placed(store, centres, *, noise):
    """Every cell of ``store`` at its type's centre plus Gaussian noise: the query's row range,
    the labels, the embedding, the reference's names and their landmarks (the means of their
    reference cells)."""
    rng = np.random.default_rng(1)
    a, b = store.experiment_ranges["query"]
    codes, cats = store.categorical_codes("cell_type", 0, store.n_cells)
    labels = np.asarray(cats, dtype=object)[codes]
    z = np.asarray([centres[t] for t in labels]) + rng.normal(0, noise, (len(labels), 2))
    ref = np.arange(store.n_cells) < a
    names = sorted(set(labels[ref]))
    landmarks = np.stack([z[ref & (labels == n)].mean(axis=0) for n in names])
    return (a, b), labels, z, names, landmarks


def _sibling_setting(tmp_path, fold=2.5):
    """A and A2 both in the reference under their own names, 25 genes apart (2.5-fold), and an
    embedding that cannot tell them apart; the query's A and A2 cells in one cluster (0), B and C
    in clusters 1 and 2."""
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2="own", fold=fold))
    centres = {"A": [0.0, 0.0], "A2": [0.3, 0.0], "B": [10.0, 0.0], "C": [0.0, 10.0]}
    (a, b), labels, z, names, landmarks = _placed(store, centres, noise=1.0)
    ref = np.arange(store.n_cells) < a
    own = np.searchsorted(names, labels[ref].astype(str))
    confusion = name_confusion(z[ref], own, landmarks, np.arange(len(names)), len(names))
    truth = labels[a:b]
    clusters = np.select([np.isin(truth, ["A", "A2"]), truth == "B"], [0, 1], 2)

    def name(assignment, decided):
        return name_clusters(z[a:b], assignment, landmarks, names, decided=decided, rng=0)

    return store, name, clusters, z[a:b], truth, confusion


def test_siblings_the_embedding_confuses_are_named_on_expression(tmp_path):
    store, name, clusters, z, truth, confusion = _sibling_setting(tmp_path)
    rows = np.arange(*store.experiment_ranges["query"])
    assert np.trace(confusion[:2, :2]) / confusion[:2, :2].sum() < 0.8  # the embedding confuses A and A2
    before = name(clusters, None)
    wrong = [(before.cell_type[truth == t] == t).mean() for t in ("A", "A2")]
    assert min(wrong) < 0.7
    parts, renamed, resolved = resolve_siblings(store, rows, clusters, before, confusion, annotated=["ref1", "ref2"])
    assert parts and all(not p.novel and p.accuracy > 0.9 and set(p.siblings) == {"A", "A2"} for p in parts)
    assert len(parts) == 1 and parts[0].cluster == 0
    kept = renamed[0]  # the cluster takes the name most of its cells get
    assert {parts[0].name, kept} == {"A", "A2"} and kept == parts[0].parent_name
    naming, assignment, _ = name_with_parts(name, store, rows, clusters, z, annotated=["ref1", "ref2"],
                                            confusion=confusion)
    for t in ("A", "A2", "B", "C"):
        assert (naming.cell_type[truth == t] == t).mean() > 0.9, t
    assert not naming.cell_is_novel.any()
    # each part holds the cells its classifier called by the part's name, moved out of their cluster
    for p in parts:
        assert (truth[p.cells] == p.name).mean() > 0.9
    # per cell, the siblings' share of the kernel's probability follows the classifier: the
    # closest name agrees with the name, rows still sum to 1, the confidence is that name's share
    [(cells, group, proba)] = resolved
    assert set(group) == {"A", "A2"} and proba.shape == (cells.size, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert (naming.cell_closest[cells] == naming.cell_type[cells]).mean() > 0.9
    assert (before.cell_closest[cells] == truth[cells]).mean() < 0.7
    np.testing.assert_allclose(naming.cell_name_probabilities.sum(axis=1), 1.0, rtol=1e-5)
    names = list(naming.names)
    own = naming.cell_name_probabilities[np.arange(truth.size), [names.index(t) for t in naming.cell_type]]
    np.testing.assert_allclose(naming.confidence, own * (1 - naming.cell_novelty), rtol=1e-5)
    # per cluster, the same: each resolved cluster's siblings share its kernel total on them by
    # the classifier's mean over its cells, so its description gives its own name the most
    unresolved = name(assignment, None)  # the kernel alone, the same clusters
    group_cols = [names.index(g) for g in group]
    for j, c in enumerate(naming.clusters):
        mine = np.isin(cells, np.flatnonzero(assignment == c))
        if not mine.any():
            np.testing.assert_allclose(naming.name_probabilities[j], unresolved.name_probabilities[j])
            continue
        total = unresolved.name_probabilities[j, group_cols].sum()
        np.testing.assert_allclose(naming.name_probabilities[j, group_cols], total * proba[mine].mean(axis=0),
                                   rtol=1e-6)
        assert naming.best_name[j] == naming.label[j]
        assert naming.describe(j).startswith(f"{naming.label[j]} (")


def test_siblings_are_resolved_in_a_mixed_cluster_even_where_the_embedding_separates_them(tmp_path):
    store, name, clusters, z, truth, confusion = _sibling_setting(tmp_path)
    rows = np.arange(*store.experiment_ranges["query"])
    separated = np.diag(confusion.sum(axis=1))  # every annotated cell nearest its own name
    # the new cells of A and A2 share cluster 0: its name fits about half of them, so the
    # classifier (right for > 0.9 on left-out experiments) names them, whatever the embedding
    # did on the annotated cells
    before = name(clusters, None)
    parts, named, resolved = resolve_siblings(store, rows, clusters, before, separated, annotated=["ref1", "ref2"])
    assert len(parts) == 1 and parts[0].cluster == 0 and len(resolved) == 1
    assert {parts[0].name, named[0]} == {"A", "A2"}
    # clusters that keep A and A2 apart: each name fits its cluster, nothing is resolved, and
    # every cluster judged keeps its name
    pure = np.select([truth == "A", truth == "A2", truth == "B"], [0, 3, 1], 2)
    before = name(pure, None)
    parts, named, resolved = resolve_siblings(store, rows, pure, before, separated, annotated=["ref1", "ref2"])
    assert parts == [] and resolved == []
    assert named == {c: before.label[j] for j, c in enumerate(before.clusters) if before.label[j] in ("A", "A2")}
    # one annotated experiment: no experiment to leave out, so no classifier to trust
    assert resolve_siblings(store, rows, clusters, name(clusters, None), confusion,
                            annotated=["ref1"]) == ([], {}, [])
    with pytest.raises(ValueError, match="confusion must be"):
        resolve_siblings(store, rows, clusters, before, confusion[:2, :2], annotated=["ref1", "ref2"])


def test_own_share_corrects_the_classifier_s_errors():
    # two names, a classifier right for 0.9 of each: a cluster where it says "0" for 0.62 of
    # the cells holds (0.62 - 0.1) / 0.8 = 0.65 of name 0
    confusion = np.array([[0.9, 0.1], [0.1, 0.9]])
    assert own_share(np.array([62, 38]), confusion, 0) == pytest.approx(0.65)
    assert own_share(np.array([90, 10]), confusion, 0) == pytest.approx(1.0)  # one name, however it errs
    assert own_share(np.array([0, 0]), confusion, 1) == 1.0
    # three names: the shares that explain the counts exactly
    confusion = np.array([[0.8, 0.15, 0.05], [0.1, 0.85, 0.05], [0.0, 0.1, 0.9]])
    m = np.array([0.5, 0.3, 0.2])
    assert own_share(1000 * confusion.T @ m, confusion, 2) == pytest.approx(0.2)


def test_known_sides_are_the_labelled_names_the_split_separates():
    """A split is known structure when two reference names lie on its two sides, in the same
    order and at least half its gap apart in every annotated experiment holding both."""
    from mars_scale.subpopulations import _known_sides

    medians = {"e1": {"A": 0.0, "A2": 2.0, "B": 0.3}, "e2": {"A": 0.5, "A2": 2.2}, "e3": {"B": 1.0}}
    assert _known_sides(medians, gap=2.0) == ("A", "A2")  # A-A2 is 2.0 and 1.7 apart; B-A2 only 1.7
    assert _known_sides(medians, gap=4.0) is None  # less than half of a gap of 4
    flipped = {"e1": {"A": 0.0, "A2": 2.0}, "e2": {"A": 2.0, "A2": 0.0}}
    assert _known_sides(flipped, gap=2.0) is None  # the order changes between experiments
    assert _known_sides({"e1": {"A": 0.0}, "e2": {"A2": 3.0}}, gap=2.0) is None  # never together
    assert _known_sides({"e1": {"A2": 0.0, "A": 2.0}}, gap=2.0) == ("A2", "A")


def test_decided_clusters_are_checked():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 2))
    clusters = np.repeat([0, 1, 2], 20)
    landmarks = np.array([[0.0, 0.0], [5.0, 5.0]])
    with pytest.raises(InputError, match="parent another"):
        name_clusters(z, clusters, landmarks, ["a", "b"], decided={2: ("a", 1.0, 7)}, rng=0)
    with pytest.raises(InputError, match="no landmark"):
        name_clusters(z, clusters, landmarks, ["a", "b"], decided={2: ("c", 1.0, 0)}, rng=0)
    with pytest.raises(InputError, match="evidence"):
        name_clusters(z, clusters, landmarks, ["a", "b"], decided={2: ("a", np.nan, 0)}, rng=0)
    with pytest.raises(InputError, match="matching"):
        name_clusters(z, clusters, landmarks, ["a", "b"], decided={2: ("a", 2.0, 0)}, novelty_method="margin", rng=0)
    # evidence below 1 keeps a part known, under the given name; the others are matched as before
    plain = name_clusters(z, clusters, landmarks, ["a", "b"], rng=0)
    naming = name_clusters(z, clusters, landmarks, ["a", "b"], decided={2: ("b", 0.5, 0)}, rng=0)
    j = int(np.flatnonzero(naming.clusters == 2)[0])
    assert not naming.is_novel[j] and naming.compared_name[j] == "b" and naming.label[j] == "b"
    assert naming.novelty[j] == pytest.approx(0.5**8 / (0.5**8 + 1)) and naming.part_of[j] == 0
    assert naming.compared_name[0] == plain.compared_name[0]
    # evidence above 1: novel
    naming = name_clusters(z, clusters, landmarks, ["a", "b"], decided={2: ("a", 2.0, 0)}, rng=0)
    assert naming.is_novel[int(np.flatnonzero(naming.clusters == 2)[0])]


def test_a_part_renamed_by_the_sibling_step_keeps_the_cluster_it_was_split_from(monkeypatch):
    # cluster 0 (near A) is split by the split test into 0 and a known part 2 (named B); the
    # sibling step then renames part 2 to C: part 2 must still point at cluster 0
    rng = np.random.default_rng(0)
    landmarks = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    z = np.concatenate([rng.normal([0, 0], 0.3, (40, 2)), rng.normal([6, 0], 0.3, (40, 2)),
                        rng.normal([0, 6], 0.3, (20, 2))])
    clusters = np.repeat([0, 1, 0], [40, 40, 20])
    known_part = subpopulations.Part(cluster=0, new_cluster=2, cells=np.arange(80, 100), novel=False, name="B",
                                     parent_name="A", dprime=5.0, other_dprime=1.0, reference_dprime=1.0,
                                     evidence=0.0, siblings=("A", "B"), genes=())
    monkeypatch.setattr(subpopulations, "find_parts", lambda *a, **k: [known_part])
    monkeypatch.setattr(subpopulations, "resolve_siblings", lambda *a, **k: ([], {2: "C"}, []))
    monkeypatch.setattr(subpopulations, "_shared_names", lambda decided, *a, **k: decided)  # no store to read

    def name(assignment, decided):
        return name_clusters(z, assignment, landmarks, ["A", "B", "C"], decided=decided, rng=0)

    naming, assignment, _ = name_with_parts(name, None, np.arange(100), clusters, z, annotated=[],
                                            confusion=np.eye(3))
    j = int(np.flatnonzero(naming.clusters == 2)[0])
    assert naming.label[j] == "C" and naming.clusters[naming.part_of[j]] == 0
    assert (assignment[80:] == 2).all()


def test_a_cluster_holding_a_name_the_sibling_step_gave_is_judged_against_those_cells(tmp_path):
    # the query's A2 (25 genes 12-fold, not in the reference) holds the name A by elimination
    # (cluster 3) while the sibling step found A's own cells (cluster 4, given A); a cluster of
    # A's cells cut in two by the clustering must keep the name
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None))
    name, _, z, truth = _query_naming(store)
    rows = np.arange(*store.experiment_ranges["query"])
    a_cells = np.flatnonzero(truth == "A")
    assignment = np.select([truth == "A2", truth == "B", truth == "C"], [3, 1, 2], 4)
    naming = name(assignment, None)
    given = {4}
    decided = {3: ("A", 0.9, None), 4: ("A", 0.0, None), 1: ("B", 0.1, None), 2: ("C", 0.1, None)}
    out = subpopulations._shared_names(decided, given, store, rows, z, assignment, naming,
                                       rng=np.random.default_rng(0))
    assert out[3][0] == "A" and out[3][1] >= 1.0  # two populations: new
    assert {c: out[c] for c in (1, 2, 4)} == {c: decided[c] for c in (1, 2, 4)}
    # the same cells nearer A's prototype than the given ones: not judged
    z_near = z.copy()
    z_near[a_cells] += 5.0
    assert subpopulations._shared_names(decided, given, store, rows, z_near, assignment, name(assignment, None),
                                        rng=np.random.default_rng(0)) == decided
    # one population cut in two, the far half holding the name: it keeps it
    halves = np.where(np.isin(np.arange(truth.size), a_cells[::2]), 3, assignment)
    halves[truth == "A2"] = 5
    z_far = z.copy()
    z_far[a_cells[::2]] += 3.0
    decided_halves = {**decided, 5: ("A", 1.5, None)}
    out = subpopulations._shared_names(decided_halves, given, store, rows, z_far, halves, name(halves, None),
                                       rng=np.random.default_rng(0))
    assert out == decided_halves


def test_a_cluster_keeps_its_name_when_a_known_part_of_the_same_type_takes_it(tmp_path, monkeypatch):
    # the query's A cells fall in two clusters: 0 (alone, farther from A's prototype) and 3 (with
    # A2); the split test takes A's cells out of 3 as a known part named A. Cluster 0 is the same
    # population in expression, so it keeps A instead of being matched again without it
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2="own"))
    centres = {"A": [0.0, 0.0], "A2": [3.0, 0.0], "B": [10.0, 0.0], "C": [0.0, 10.0]}
    (a, b), labels, z, names, landmarks = _placed(store, centres, noise=0.5)
    truth, z = labels[a:b], z[a:b]
    a_cells = np.flatnonzero(truth == "A")
    z[a_cells[::2]] += [0.0, 1.2]
    clusters = np.select([np.isin(np.arange(truth.size), a_cells[::2]), truth == "B", truth == "C"], [0, 1, 2], 3)
    part = subpopulations.Part(cluster=3, new_cluster=4, cells=a_cells[1::2], novel=False, name="A",
                               parent_name="A2", dprime=8.0, other_dprime=1.0, reference_dprime=8.0, evidence=0.0,
                               siblings=("A", "A2"), genes=())
    monkeypatch.setattr(subpopulations, "find_parts", lambda *a, **k: [part])

    def name(assignment, decided):
        return name_clusters(z, assignment, landmarks, names, decided=decided, rng=0)

    assert name(clusters, None).label[0] == "A"
    naming, assignment, _ = name_with_parts(name, store, np.arange(a, b), clusters, z, annotated=["ref1", "ref2"])
    assert (naming.cell_type[a_cells] == "A").all()
    assert (naming.cell_type[truth == "A2"] == "A2").all()


@pytest.mark.parametrize("swapped", [True, False])
def test_a_new_cluster_takes_the_name_whose_reference_cells_it_resembles(tmp_path, monkeypatch, swapped):
    # the query's A2 (new) and A cells in clusters 3 and 0. swapped: A2 sits on A's prototype in
    # the embedding and the query's A off it, so the matching names A2's cluster A and calls the
    # A cells new; in expression the reference's A cells are the A cells, and the calls swap.
    # Otherwise (A on its prototype) the matching is right and stays.
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None))
    on, off = [0.0, 0.0], [0.0, 4.0]
    centres = {"A": off if swapped else on, "A2": on if swapped else off, "B": [10.0, 0.0], "C": [-10.0, 0.0]}
    (a, b), labels, z, names, _ = _placed(store, centres, noise=0.5)
    landmarks = np.array([{"A": on, "B": [10.0, 0.0], "C": [-10.0, 0.0]}[n] for n in names])
    truth, z = labels[a:b], z[a:b]
    clusters = np.select([truth == "A", truth == "B", truth == "C"], [0, 1, 2], 3)

    def name(assignment, decided):
        return name_clusters(z, assignment, landmarks, names, decided=decided, rng=0)

    first = name(clusters, None)
    assert first.is_novel[list(first.clusters).index(0 if swapped else 3)]  # the embedding's call
    monkeypatch.setattr(subpopulations, "find_parts", lambda *a, **k: [])
    naming, _, _ = name_with_parts(name, store, np.arange(a, b), clusters, z, annotated=["ref1", "ref2"])
    assert (naming.cell_type[truth == "A"] == "A").all()
    assert naming.cell_is_novel[truth == "A2"].all() and not naming.cell_is_novel[truth != "A2"].any()


def test_clusters_sharing_a_name_that_becomes_decided_hold_it():
    # cluster 4 keeps its name b after the split test moved its a cells out (part 7, name a);
    # cluster 2, which the matching took for a second cluster of b, and cluster 3, named a, hold
    # their names (a decided name leaves the matching); c is not decided, the new cluster 5 stays
    # new, and a cluster in decided with evidence 1 or more (new) gives its name to no one
    from types import SimpleNamespace

    naming = SimpleNamespace(clusters=np.array([1, 2, 3, 4, 5, 6]),
                             compared_name=np.array(["c", "b", "a", "b", "b", "d"]),
                             evidence=np.array([0.1, 0.4, 0.2, 0.3, 2.0, 0.5]),
                             is_novel=np.array([False, False, False, False, True, False]))
    decided = {4: ("b", 0.0, None), 7: ("a", 0.0, 4), 8: ("d", 1.5, 6)}
    assert subpopulations._holding(decided, naming) == {2: ("b", 0.4, None), 3: ("a", 0.2, None)}


def test_a_new_population_spread_over_two_clusters_of_one_name_is_still_split_off(tmp_path):
    # A and the new A2 fall half and half into two clusters that both take the name A: A2's
    # direction cuts both, and the second is the same type, so it does not veto the split
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None))
    name, clusters, z, truth = _query_naming(store)
    rows = np.arange(*store.experiment_ranges["query"])
    halves = np.where((clusters == 0) & (np.arange(truth.size) % 2 == 1), 3, clusters)
    before = name(halves, None)
    assert list(before.label[np.isin(before.clusters, [0, 3])]) == ["A", "A"] and not before.is_novel.any()
    parts = find_parts(store, rows, halves, z, before, annotated=["ref1", "ref2"])
    assert parts and all(p.novel and p.cluster in (0, 3) for p in parts)
    cells = np.concatenate([p.cells for p in parts])
    assert (truth[cells] == "A2").mean() > 0.9 and np.isin(np.flatnonzero(truth == "A2"), cells).mean() > 0.4


def test_a_cluster_taken_for_part_of_a_type_follows_the_new_part_split_from_that_type(tmp_path):
    # half of the new A2 sits inside A's cluster (0), the other half is a cluster of its own (3)
    # that the matching takes for a part of A; once the split test takes A2 out of cluster 0,
    # cluster 3 is A2's population and not A's, so it is new too
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None))
    name, clusters, z, truth = _query_naming(store)
    rows = np.arange(*store.experiment_ranges["query"])
    a2 = np.flatnonzero(truth == "A2")
    halves = clusters.copy()
    halves[a2[1::2]] = 3
    before = name(halves, None)
    j = int(np.flatnonzero(before.clusters == 3)[0])
    assert before.label[j] == "A" and before.clusters[before.split_of[j]] == 0
    naming, assignment, parts = name_with_parts(name, store, rows, halves, z, annotated=["ref1", "ref2"])
    assert len(parts) == 1 and parts[0].cluster == 0 and parts[0].novel
    assert naming.cell_is_novel[a2].mean() > 0.9 and naming.cell_is_novel[truth != "A2"].mean() < 0.02


def test_the_split_test_looks_past_a_direction_every_cluster_shares(tmp_path):
    # half of every type's cells are stimulated, in the query as in the reference: the clearest
    # split of A's cluster is the stimulation, which cuts every cluster; past it lies A2
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None, condition=True))
    name, clusters, z, truth = _query_naming(store)
    rows = np.arange(*store.experiment_ranges["query"])
    naming, _, parts = name_with_parts(name, store, rows, clusters, z, annotated=["ref1", "ref2"])
    assert len(parts) == 1 and parts[0].novel and parts[0].cluster == 0
    assert (truth[parts[0].cells] == "A2").mean() > 0.9
    assert naming.cell_is_novel[truth == "A2"].mean() > 0.9 and naming.cell_is_novel[truth != "A2"].mean() < 0.02
    # the first look at A's cluster: its split (A2) cuts the other clusters through the stimulation
    a, b = store.experiment_ranges["query"]
    sampled = {c: normalized_rows(store, np.arange(a, b)[clusters == c]) for c in (0, 1, 2)}
    labels = {0: "A", 1: "B", 2: "C"}
    first, cut = subpopulations._specific_split(0, sampled, np.arange(3), labels, n_genes=500, n_components=20,
                                                min_part_cells=10, rng=np.random.default_rng(0))
    assert first is None and cut is not None


def test_a_condition_the_reference_holds_in_separate_experiments_is_no_new_population(tmp_path, monkeypatch):
    # A's cells respond to a stimulation: half of them in the query, all of ref2's and none of
    # ref1's. A's query cluster splits along it; neither reference experiment is bimodal along
    # it, but their A cells lie as far apart as the query's two halves: known.
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None, fold=1.0, a_condition="separate"))  # A2 is A
    name, clusters, z, truth = _query_naming(store)
    rows = np.arange(*store.experiment_ranges["query"])
    naming = name(clusters, None)
    assert find_parts(store, rows, clusters, z, naming, annotated=["ref1", "ref2"]) == []
    # the rule is what keeps it known: without it, the stimulated half is called new
    monkeypatch.setattr(subpopulations, "EXPERIMENT_SPREAD", np.inf)
    parts = find_parts(store, rows, clusters, z, naming, annotated=["ref1", "ref2"])
    assert len(parts) == 1 and parts[0].novel and parts[0].cluster == 0


def test_experiment_spread_is_the_range_of_the_name_s_medians():
    medians = {"e1": {"A": 1.0, "B": 5.0}, "e2": {"A": 3.5}, "e3": {"B": 4.0}}
    assert subpopulations._experiment_spread(medians, "A") == pytest.approx(2.5)
    assert subpopulations._experiment_spread(medians, "B") == pytest.approx(1.0)
    assert subpopulations._experiment_spread({"e1": {"A": 1.0}}, "A") == 0.0  # one experiment: none


def test_the_split_test_looks_past_a_split_the_reference_holds(tmp_path, monkeypatch, caplog):
    # half of A's cells respond to a stimulation, in every experiment: the clearest split of the
    # query's A cluster, which the reference shows too (known). Past it lies A2, new.
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None, fold=4.0, a_condition="within"))
    name, clusters, z, truth = _query_naming(store)
    rows = np.arange(*store.experiment_ranges["query"])
    naming = name(clusters, None)
    with caplog.at_level(logging.INFO, logger="mars_scale.subpopulations"):
        parts = find_parts(store, rows, clusters, z, naming, annotated=["ref1", "ref2"])
    assert "that the reference also shows" in caplog.text  # the first split: the stimulation
    assert len(parts) == 1 and parts[0].novel and parts[0].cluster == 0
    found = np.isin(np.arange(truth.size), parts[0].cells)
    assert (truth[found] == "A2").mean() > 0.9 and found[truth == "A2"].mean() > 0.9
    monkeypatch.setattr(subpopulations, "LOOKS_PAST_KNOWN", 0)  # without looking past it: nothing
    assert find_parts(store, rows, clusters, z, naming, annotated=["ref1", "ref2"]) == []


def test_two_groups_split_by_a_condition_the_reference_holds_in_separate_runs_are_not_apart(tmp_path):
    # the query's stimulated and control A cells are two populations in expression, but the
    # reference's A cells of ref1 (control) and ref2 (stimulated) lie as far apart along it
    from mars_scale.store import open_store

    store = open_store(_atlas(tmp_path, reference_a2=None, fold=1.0, a_condition="separate"))
    name, clusters, z, truth = _query_naming(store)
    naming = name(clusters, None)
    rows = np.arange(*store.experiment_ranges["query"])
    a_cells = np.flatnonzero(np.isin(truth, ["A", "A2"]))
    stimulated, control = a_cells[a_cells % 2 == 1], a_cells[a_cells % 2 == 0]  # every other cell

    labels_of = subpopulations._annotated_labels(store, ["ref1", "ref2"], "cell_type")

    def spread_of(name, genes, w):
        return subpopulations._reference_spread(store, naming, name, genes, w, labels_of=labels_of, max_cells=1000,
                                                rng=np.random.default_rng(0))

    rng = np.random.default_rng
    assert subpopulations._apart(store, rows, stimulated, control, rng=rng(0)) >= 1.0
    assert subpopulations._apart(store, rows, stimulated, control, rng=rng(0), spread_of=spread_of, name="A") == 0.0
    # B's cells against A's: another type, however the reference's A experiments differ
    b_cells = np.flatnonzero(truth == "B")
    assert subpopulations._apart(store, rows, control, b_cells, rng=rng(0), spread_of=spread_of, name="A") >= 1.0
