"""Evaluation: leave-one-experiment-out, the removed-type protocol, and scoring a stored annotation.

Three entry points, all scored with the same metric definitions (:func:`naming_metrics`):

- :func:`leave_one_out` trains MARS with each annotated experiment held out in turn, scores
  its clusters against two K-means baselines, then names the clusters in memory and scores the
  names and the novelty calls;
- :func:`leave_type_out` (the removed-type protocol) does the same after hiding one cell type
  from the annotated experiments, so that the held-out experiment holds a type that the
  reference lacks;
- :func:`score_annotation` scores the annotation that ``mars-scale annotate`` wrote into a
  store (no training, nothing written).

Protocol (:func:`leave_one_out`), as in the paper and the reference benchmark:

- Each annotated experiment in turn is the unannotated one. Its labels are never given to
  training: MARS sees only the other experiments' labels. The held-out labels enter in two
  places only, both fixed by the protocol and neither a choice made by looking at results:
  the number of landmarks ``K`` is the number of true types in the held-out experiment
  (``k="truth"``, the reference protocol; pass an integer to fix it instead), and the metrics.
- One MARS training per (held-out experiment, seed). MARS's assignment is the nearest
  unannotated landmark of each held-out cell's final embedding.
- Baselines in the same run, with the same ``K`` and seed:

  * ``kmeans_ae``: K-means on the *pretrained* autoencoder embedding of the held-out cells
    (the paper's Extended Data Fig. 2f): ``state["kmeans_pretrained"]`` of the checkpoint when
    a supervised warm-up ran, else the landmark initialisation ``state["kmeans_init"]``, which
    is then the same thing. Missing from checkpoints that do not record it (reported as
    ``None``).
  * ``kmeans_pca``: :func:`mars_scale.landmarks.kmeans` on the first 50 principal components
    of the held-out cells, preprocessed as the model sees them (normalised to the store's
    target sum, log1p, scaled with the store's joint gene means and standard deviations,
    clipped at the store's ``max_value``). The scaled matrix is never densified: centring
    removes the constant value of the zeros, so the principal components of the scaled data
    are those of its sparse part, computed by ARPACK on the sparse matrix with implicit
    centring. At most ``pca_max_cells`` (default 50,000) cells enter, a uniform random subsample
    drawn with the first seed beyond that; the PCA is computed once per held-out experiment
    (ARPACK, seeded with the first seed) and K-means runs once per seed.

- Naming, as ``annotate`` does it but in memory (nothing is written into the store): the
  nearest-landmark assignment, landmarks with fewer than ``min_cluster_cells`` cells merged
  into the nearest other one (:func:`mars_scale.annotate.merge_small_clusters`), then
  :func:`mars_scale.naming.name_clusters` with the annotated landmarks weighted by their
  numbers of annotated cells, seeded with the run's seed.

Metrics of the clusters are those of :func:`mars_scale.metrics.clustering_metrics`; the
summary gives, per held-out experiment and method, the mean and the sample standard deviation
(``ddof=1``) over seeds, and per method the mean of those means over experiments. Where a
baseline's mean ARI is above MARS's on a held-out experiment, the report says so in one line
(:func:`baseline_comments`).

Naming and novelty metrics
--------------------------
:func:`naming_metrics` holds the definitions (those of ``benchmarks/novelty.py``). A held-out
cell with a label is *known* when its true type is among the annotated types (the names of the
annotated landmarks: the types the model was given), *new* otherwise.

- ``known_called_novel``: share of known cells whose cluster is called novel;
- ``known_name_accuracy``: share of known cells whose predicted cell type is their true type
  (a cell called novel counts as wrong);
- ``new_called_novel``: share of new cells called novel;
- ``novelty_auroc``: AUROC of the per-cell novelty score, new (positive) against known cells;
  ``None`` unless both occur;
- ``new_jaccard``: per new type, the Jaccard index of its cells and its best cluster
  (``new_jaccard_mean``: the mean over new types);
- ``integration_knn``: accuracy of a ``k``-nearest-neighbour label transfer (``k = 15``,
  scikit-learn's ``KNeighborsClassifier``) from the annotated cells to the held-out
  experiment's known cells in the MARS embedding (:func:`integration_knn`); at most
  ``knn_max_cells`` cells on each side (seeded uniform subsamples beyond);
- ``known_closest_accuracy``: share of known cells whose closest type (the most probable name
  of the per-cell name probabilities, ``obs['<key>_closest_type']``) is their true type;
- ``confidence_auroc``: AUROC of the per-cell confidence for the cells whose call is right (a
  known cell named its type, a new cell called novel) against those whose call is wrong, over
  the labelled cells: whether a user can trust the cells the confidence ranks high.

Each is ``None`` when no cell enters it.

The removed-type protocol (:func:`leave_type_out`)
--------------------------------------------------
For a type ``T`` and each held-out experiment ``E`` that holds it, every cell of ``T`` in the
*other* experiments is hidden, then MARS is trained and scored as above, ``T`` being a new type
of ``E``. No cell is dropped and X is not rewritten: a temporary store (in a temporary
directory, removed afterwards) links every element of the original store (symbolic links to
``X``, the other obs columns, var, uns, ...) and copies only ``obs/cell_type``, with the codes
of ``T`` outside ``E`` set to missing (-1). The hidden cells thus stay in the data as
*unlabelled* cells of annotated experiments. Training gives unlabelled cells weight 0 in the
annotated term of the loss and leaves them out of the class means, so ``T`` gets no annotated
landmark and no cell is pulled towards one; but they still fill places in the annotated
minibatches, enter pretraining when ``train.pretrain_on = "all"``, and count in the store's
per-gene scaling statistics (computed at ingest over all cells). ``benchmarks/novelty.py``
drops the cells and re-ingests instead, which differs in exactly these three respects.

Cost
----
A protocol with several trainings reports, before the first, how many it will run and, after
the first, the measured time per training and the estimated time left (through ``progress``;
logged at INFO by default).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from mars_scale.config import RunConfig, config_to_dict
from mars_scale.errors import InputError
from mars_scale.landmarks import kmeans, nearest
from mars_scale.metrics import clustering_metrics
from mars_scale.model import Mars
from mars_scale.preprocess import fold_scaling, normalized_rows, scaled_nonzero_values
from mars_scale.store import Atlas, as_store, atomic_file, open_store
from mars_scale.train import AUTO, experiment_names

__all__ = [
    "METHODS",
    "NAMING_METRICS",
    "annotation_markdown",
    "baseline_comments",
    "best_jaccard",
    "integration_knn",
    "knn_transfer",
    "leave_one_out",
    "leave_type_out",
    "markdown_table",
    "naming_metrics",
    "naming_report",
    "novelty_auroc",
    "score_annotation",
    "write_report",
]

logger = logging.getLogger(__name__)

METHODS = ("mars", "kmeans_ae", "kmeans_pca")
NAMING_METRICS = (
    "known_called_novel",
    "known_name_accuracy",
    "new_called_novel",
    "novelty_auroc",
    "new_jaccard_mean",
    "integration_knn",
    "known_closest_accuracy",
    "confidence_auroc",
)
KNN_NEIGHBOURS = 15
MIN_TYPE_CELLS = 10
_METRICS = ("accuracy", "precision", "recall", "f1", "nmi", "ami", "ari")
_METHOD_TITLES = {"mars": "MARS", "kmeans_ae": "K-means on AE", "kmeans_pca": "K-means on PCA"}
_NAMING_TITLES = {
    "known_called_novel": "known called novel",
    "known_name_accuracy": "known named right",
    "new_called_novel": "new called novel",
    "novelty_auroc": "novelty AUROC",
    "new_jaccard_mean": "Jaccard of new types",
    "integration_knn": "kNN transfer",
    "known_closest_accuracy": "known closest type right",
    "confidence_auroc": "confidence AUROC",
}

Progress = Callable[[str], None]


def _labels(codes: np.ndarray, categories: list[str], missing: str | None = None) -> np.ndarray:
    """Category names as an object array, ``missing`` where the code is -1 (``None`` for labels,
    ``""`` for a stored result column)."""
    names = np.asarray(list(categories) + [missing], dtype=object)
    return names[np.where(codes >= 0, codes, len(categories))]


def _held_out_truth(store: Atlas, experiment: str) -> tuple[np.ndarray, int]:
    a, b = store.experiment_ranges[experiment]
    codes, categories = store.categorical_codes("cell_type", a, b)
    return _labels(np.asarray(codes), categories), int(np.unique(codes[codes >= 0]).size)


def _labelled_experiments(store: Atlas) -> list[str]:
    labelled = []
    for name, (a, b) in store.experiment_ranges.items():
        codes, _ = store.categorical_codes("cell_type", a, b)
        if b > a and (codes >= 0).any():
            labelled.append(name)
    return labelled


def _resolve_experiments(store: Atlas, experiments: Sequence[str] | None) -> list[str]:
    labelled = _labelled_experiments(store)
    if experiments is None:
        chosen = labelled
    else:
        chosen = [str(e) for e in experiments]
        for name in chosen:
            if name not in store.experiment_ranges:
                raise InputError(
                    f"{store.path}: unknown experiment {name!r} (known: {', '.join(store.experiments)})"
                )
            if name not in labelled:
                raise InputError(
                    f"{store.path}: experiment {name!r} has no cell-type labels, so it cannot be scored"
                )
    if len(labelled) < 2:
        raise InputError(
            f"{store.path}: leave-one-out needs at least two experiments with cell-type labels "
            f"(found {len(labelled)})"
        )
    if not chosen:
        raise InputError(f"{store.path}: no experiment to hold out")
    return chosen


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    seeds = list(seeds)
    if not seeds:
        raise InputError("seeds is empty (pass at least one seed)")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
            raise InputError(f"seeds must be non-negative integers (got {s!r})")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"seeds must be distinct (got {seeds})")
    return [int(s) for s in seeds]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer of at least {minimum} (got {value!r})")
    return int(value)


@dataclasses.dataclass(frozen=True)
class _NamingOptions:
    """How runs are named and scored (see :func:`leave_one_out`)."""

    min_cluster_cells: int = 10
    novelty_threshold: float = 0.5
    k_neighbours: int = KNN_NEIGHBOURS
    knn_max_cells: int = 50_000
    split_test: bool = True

    def __post_init__(self) -> None:
        _check_int("min_cluster_cells", self.min_cluster_cells, 1)
        _check_int("k_neighbours", self.k_neighbours, 1)
        _check_int("knn_max_cells", self.knn_max_cells, 1)
        if not (isinstance(self.novelty_threshold, (int, float)) and 0 < self.novelty_threshold <= 1):
            raise InputError(f"novelty_threshold must be in (0, 1] (got {self.novelty_threshold!r})")


# ---------------------------------------------------------------------------------------------
# metrics of naming and novelty (benchmarks/novelty.py uses the same definitions)


def novelty_auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """AUROC of ``scores`` for ``positive`` cells against the others; ``None`` if one kind is absent.

    Parameters
    ----------
    scores
        Per-cell novelty scores (non-finite ones are left out).
    positive
        Per cell, whether it is of a new type.
    """
    from sklearn.metrics import roc_auc_score

    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    ok = np.isfinite(scores)
    scores, positive = scores[ok], positive[ok]
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def best_jaccard(clusters: np.ndarray, target: np.ndarray) -> float | None:
    """Largest Jaccard index between the ``target`` cells and one cluster; ``None`` if no target."""
    clusters = np.asarray(clusters)
    target = np.asarray(target, dtype=bool)
    if not target.any():
        return None
    best = 0.0
    for c in np.unique(clusters[target]):  # a cluster without target cells scores 0
        member = clusters == c
        best = max(best, float((member & target).sum() / (member | target).sum()))
    return best


def knn_transfer(z_ref: np.ndarray, y_ref: np.ndarray, z_query: np.ndarray, *, k: int = KNN_NEIGHBOURS) -> np.ndarray:
    """Labels of ``z_query`` by a ``k``-nearest-neighbour vote among ``(z_ref, y_ref)``.

    Parameters
    ----------
    z_ref, y_ref
        Reference embeddings and their labels (compared as strings).
    z_query
        Embeddings to label.
    k
        Neighbours (at most the number of reference cells); scikit-learn's
        ``KNeighborsClassifier`` with its defaults otherwise (uniform weights, Euclidean).

    Returns
    -------
    numpy.ndarray
        One label per query row.
    """
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=min(k, len(y_ref)))
    clf.fit(np.asarray(z_ref), np.asarray(y_ref, dtype=str))
    return clf.predict(np.asarray(z_query))


def integration_knn(z_ref: np.ndarray, y_ref: np.ndarray, z_query: np.ndarray, y_query: np.ndarray, *,
                    k: int = KNN_NEIGHBOURS) -> float | None:
    """Accuracy of a ``k``-NN label transfer from reference to query cells; ``None`` if either is empty.

    Parameters
    ----------
    z_ref, y_ref
        Embeddings and labels of the annotated (reference) cells.
    z_query, y_query
        Embeddings and true labels of the held-out experiment's known cells.
    k
        Neighbours (at most the number of reference cells).
    """
    if len(y_ref) == 0 or len(y_query) == 0:
        return None
    predicted = knn_transfer(z_ref, y_ref, z_query, k=k)
    return float(np.mean(predicted == np.asarray(y_query, dtype=str)))


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)
    except (TypeError, ValueError):
        return True


def _mean_or_none(mask: np.ndarray, values: np.ndarray) -> float | None:
    return float(np.mean(values[mask])) if mask.any() else None


def naming_metrics(
    truth: np.ndarray,
    clusters: np.ndarray,
    cell_type: np.ndarray,
    cell_novelty: np.ndarray,
    called_novel: np.ndarray,
    known_types: Sequence[str],
    *,
    cluster_info: dict[int, dict[str, Any]] | None = None,
    closest_type: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
) -> dict[str, Any]:
    """Score the clusters, names and novelty calls of one experiment against its true labels.

    See the module docstring for the definitions. All arrays have one entry per cell of the
    experiment.

    Parameters
    ----------
    truth
        True cell types, ``None`` (or NaN) where missing; those cells enter no metric.
    clusters
        Cluster id of each cell.
    cell_type
        Predicted cell type of each cell (a known name or the novel label).
    cell_novelty
        Per-cell novelty score (for the AUROC).
    called_novel
        Whether each cell was called novel.
    known_types
        The annotated types (the names the model was given).
    cluster_info
        Per cluster id: ``label``, ``description`` (and optionally ``novelty``, ``is_novel``)
        for the per-type table.
    closest_type, confidence
        Optional per-cell closest annotated name and confidence (``annotate``'s outputs); without
        them ``known_closest_accuracy`` and ``confidence_auroc`` are ``None``.

    Returns
    -------
    dict
        ``n_cells``, ``n_labelled``, ``n_known``, ``n_new``, ``new_types`` (sorted);
        ``clustering`` (:func:`~mars_scale.metrics.clustering_metrics` of the clusters, or
        ``None`` without labels) and its ``ari``; ``known_called_novel``,
        ``known_name_accuracy``, ``new_called_novel``, ``novelty_auroc``, ``new_jaccard``
        (per new type), ``new_jaccard_mean``, ``known_closest_accuracy``,
        ``confidence_auroc``; ``per_type``: per true type, ``n_cells``,
        ``known``, ``called_novel`` and ``named_right`` (fractions of its cells; ``None`` for a
        new type, whose right name is the novel label), ``majority_cluster``,
        ``majority_fraction``, ``cluster_label`` and ``cluster_description``.
    """
    truth = np.asarray(truth, dtype=object)
    n = truth.shape[0]
    clusters = np.asarray(clusters)
    predicted = np.asarray([str(v) for v in np.asarray(cell_type, dtype=object)], dtype=object)
    novelty = np.asarray(cell_novelty, dtype=np.float64)
    called = np.asarray(called_novel, dtype=bool)
    closest = None if closest_type is None else np.asarray([str(v) for v in np.asarray(closest_type, dtype=object)],
                                                           dtype=object)
    trust = None if confidence is None else np.asarray(confidence, dtype=np.float64)
    for name, arr in (("clusters", clusters), ("cell_type", predicted), ("cell_novelty", novelty),
                      ("called_novel", called), ("closest_type", closest), ("confidence", trust)):
        if arr is not None and arr.shape[0] != n:
            raise InputError(f"{name} has {arr.shape[0]} entries for {n} cells")
    labelled = np.array([not _missing(t) for t in truth], dtype=bool)
    names = np.array([str(t) if ok else "" for t, ok in zip(truth, labelled)], dtype=object)
    known_set = {str(t) for t in known_types}
    known = labelled & np.array([t in known_set for t in names], dtype=bool)
    new = labelled & ~known
    new_types = sorted(set(names[new]))
    jaccard = {t: best_jaccard(clusters, names == t) for t in new_types}
    clustering = clustering_metrics(truth, clusters) if labelled.any() else None
    info = cluster_info or {}
    per_type: dict[str, dict[str, Any]] = {}
    for t in sorted(set(names[labelled])):
        mine = names == t
        values, counts = np.unique(clusters[mine], return_counts=True)
        major = values[np.argmax(counts)]
        major_id = int(major) if np.issubdtype(np.asarray(major).dtype, np.integer) else str(major)
        about = info.get(major_id, {})
        per_type[t] = {
            "n_cells": int(mine.sum()),
            "known": t in known_set,
            "called_novel": float(called[mine].mean()),
            "named_right": float(np.mean(predicted[mine] == t)) if t in known_set else None,
            "majority_cluster": major_id,
            "majority_fraction": float(counts.max() / mine.sum()),
            "cluster_label": about.get("label"),
            "cluster_description": about.get("description"),
        }
    scored = known | new
    right = (known & (predicted == names)) | (new & called)
    return {
        "n_cells": int(n),
        "n_labelled": int(labelled.sum()),
        "n_known": int(known.sum()),
        "n_new": int(new.sum()),
        "new_types": new_types,
        "clustering": clustering,
        "ari": None if clustering is None else clustering["ari"],
        "known_called_novel": _mean_or_none(known, called),
        "known_name_accuracy": _mean_or_none(known, predicted == names),
        "new_called_novel": _mean_or_none(new, called),
        "novelty_auroc": novelty_auroc(novelty[scored], new[scored]),
        "new_jaccard": jaccard,
        "new_jaccard_mean": float(np.mean(list(jaccard.values()))) if jaccard else None,
        "known_closest_accuracy": None if closest is None else _mean_or_none(known, closest == names),
        "confidence_auroc": None if trust is None else novelty_auroc(trust[scored], right[scored]),
        "per_type": per_type,
    }


def _sample(rows: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    if rows.size > max_cells:
        rows = np.sort(rng.choice(rows, size=max_cells, replace=False))
    return rows


def _reference_rows(store: Atlas, experiments: Sequence[str], known_types: set[str], *, max_cells: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows and labels of the labelled cells of ``experiments`` whose type is known (subsampled)."""
    rows, labels = [], []
    for name in experiments:
        a, b = store.experiment_ranges[name]
        codes, categories = store.categorical_codes("cell_type", a, b)
        keep_code = np.array([c in known_types for c in categories] + [False], dtype=bool)
        ok = keep_code[np.where(codes >= 0, codes, len(categories))]
        rows.append(a + np.flatnonzero(ok))
        labels.append(np.asarray(categories + [""], dtype=object)[codes[ok]])
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    all_rows, all_labels = np.concatenate(rows), np.concatenate(labels)
    if all_rows.size > max_cells:
        pick = np.sort(rng.choice(all_rows.size, size=max_cells, replace=False))
        all_rows, all_labels = all_rows[pick], all_labels[pick]
    return all_rows.astype(np.int64), all_labels


def _take_rows(blocks, rows: np.ndarray, dim: int) -> np.ndarray:
    """Gather ``rows`` (sorted) from a stream of ``(row indices, values)`` blocks."""
    out = np.full((rows.size, dim), np.nan, dtype=np.float32)
    seen = np.zeros(rows.size, dtype=bool)
    for idx, values in blocks:
        if rows.size == 0:
            break
        pos = np.searchsorted(rows, idx)
        hit = pos < rows.size
        hit[hit] = rows[pos[hit]] == idx[hit]
        out[pos[hit]] = values[hit]
        seen[pos[hit]] = True
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} rows were not found in the embedding")
    return out


# ---------------------------------------------------------------------------------------------
# the PCA baseline


def scaled_rows(store: Atlas, rows: np.ndarray, *, block_rows: int = 4096) -> sp.csr_matrix:
    """The preprocessed cells ``rows`` (sorted store rows) as the model sees them, sparse part.

    Normalised to the store's target sum, log1p, scaled with its joint gene means and standard
    deviations, clipped at its ``max_value``: the scaled matrix is ``c`` (one constant row, the
    scaled value of a zero) plus the returned sparse matrix, which holds the stored entries
    minus ``c``. Rows are read in blocks of ``block_rows``.
    """
    prep = store.meta.get("preprocessing", {})
    max_value = prep.get("max_value", 10.0)
    params = fold_scaling(store.var_column("mean"), store.var_column("std"),
                          max_value=None if max_value is None else float(max_value))
    matrix = normalized_rows(store, rows, block_rows=block_rows)
    matrix.data = scaled_nonzero_values(matrix.indices, matrix.data, params, dtype=np.float64)
    return matrix


def _pca_of_experiment(store: Atlas, experiment: str, *, n_components: int, max_cells: int,
                       seed: int, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the preprocessed cells of one experiment (rows, scores)."""
    from sklearn.decomposition import PCA

    a, b = store.experiment_ranges[experiment]
    n = b - a
    rng = np.random.default_rng(seed)
    if n > max_cells:
        rows = a + np.sort(rng.choice(n, size=max_cells, replace=False))
        logger.info("PCA baseline: %d of the %d cells of %r (uniform subsample)", max_cells, n, experiment)
    else:
        rows = np.arange(a, b)
    matrix = scaled_rows(store, rows, block_rows=block_rows)
    k = int(min(n_components, matrix.shape[0] - 1, matrix.shape[1] - 1))
    if k < 1:
        raise InputError(f"{store.path}: experiment {experiment!r} is too small for PCA ({matrix.shape})")
    # centring removes the constant row c, so the principal components are those of the sparse part
    scores = PCA(n_components=k, svd_solver="arpack", random_state=seed).fit_transform(matrix)
    return rows, np.ascontiguousarray(scores, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# one run


def kmeans_on_pretrained(state: dict[str, Any]) -> dict[str, Any] | None:
    """The K-means of the held-out cells on the pretrained embedding recorded in a checkpoint
    (``{"index", "cluster"}``), or ``None``."""
    pretrained = state.get("kmeans_pretrained")
    return pretrained if pretrained is not None else state.get("kmeans_init")


def _kmeans_ae(state: dict[str, Any], a: int, b: int) -> tuple[np.ndarray, np.ndarray] | None:
    init = kmeans_on_pretrained(state)
    if not init:
        return None
    index = np.asarray(init["index"], dtype=np.int64).reshape(-1)
    cluster = np.asarray(init["cluster"], dtype=np.int64).reshape(-1)
    if index.size and (index.min() < a or index.max() >= b):  # positions within the experiment
        index = index + a
    return index, cluster


def _scored(truth_all: np.ndarray, a: int, index: np.ndarray, cluster: np.ndarray) -> dict[str, Any]:
    truth = truth_all[index - a]
    return {
        "metrics": clustering_metrics(truth, cluster),
        "assignment": {"index": index, "truth": truth, "cluster": cluster},
    }


def _landmark_weights(store: Atlas, experiments: Sequence[str], types: Sequence[str]) -> np.ndarray:
    """Annotated cells of each annotated landmark (experiment, type), as ``annotate`` counts them."""
    counts: dict[str, dict[str, int]] = {}
    weights = np.zeros(len(types), dtype=np.float64)
    for i, (exp, t) in enumerate(zip(experiments, types)):
        if exp not in counts:
            a, b = store.experiment_ranges[exp]
            codes, categories = store.categorical_codes("cell_type", a, b)
            per = np.bincount(codes[codes >= 0], minlength=len(categories))
            counts[exp] = {c: int(v) for c, v in zip(categories, per)}
        weights[i] = counts[exp].get(t, 0)
    return weights


def _embed_rows(model: Mars, store: Atlas, rows: np.ndarray, *, device: str) -> np.ndarray:
    """Embeddings of the given store rows (sorted), streaming through their experiments."""
    from mars_scale.device import resolve_device
    from mars_scale.distributed import DistInfo
    from mars_scale.train import embed

    dim = int(model.unannotated_landmarks.shape[1])
    if rows.size == 0:
        return np.zeros((0, dim), dtype=np.float32)
    names = [n for n, (a, b) in store.experiment_ranges.items() if ((rows >= a) & (rows < b)).any()]
    dev = resolve_device(device)
    encoder = model.encoder.to(dev)
    stream = ((index.cpu().numpy(), z.float().cpu().numpy())
              for index, _, _, z in embed(encoder, store, experiments=names, batch_size=4096, device=dev,
                                          info=DistInfo()))
    return _take_rows(stream, rows, dim)


def _name_run(model: Mars, store: Atlas, experiment: str, z: np.ndarray, assign: np.ndarray, truth: np.ndarray,
              *, seed: int, options: _NamingOptions, device: str) -> dict[str, Any]:
    """Name the held-out clusters of a trained model in memory and score them (no store writes)."""
    from mars_scale.annotate import merge_small_clusters
    from mars_scale.naming import NamingResult, name_clusters, name_confusion
    from mars_scale.subpopulations import name_with_parts

    landmarks_a, exps, types = model.annotated_landmarks
    weights = _landmark_weights(store, exps, types)
    known = sorted({str(t) for t in types})
    # a sample of the annotated cells, embedded: the k-NN transfer below and the confusion of names
    rng = np.random.default_rng(seed)
    annotated = [e for e in store.experiments if e != experiment]
    ref_rows, ref_labels = _reference_rows(store, annotated, set(known), max_cells=options.knn_max_cells, rng=rng)
    z_ref = _embed_rows(model, store, ref_rows, device=device)
    names, landmark_codes = np.unique(np.asarray(types, dtype=str), return_inverse=True)
    confusion = name_confusion(z_ref, np.searchsorted(names, np.asarray(ref_labels, dtype=str)),
                               np.asarray(landmarks_a, dtype=np.float32), landmark_codes, names.size)
    merged_assign, merged = merge_small_clusters(z, assign, model.unannotated_landmarks,
                                                 min_cells=options.min_cluster_cells)
    def name(clusters: np.ndarray, decided: dict | None) -> NamingResult:
        return name_clusters(z, clusters, landmarks_a, types, landmark_weights=weights,
                             novelty_threshold=options.novelty_threshold, decided=decided,
                             rng=np.random.default_rng(seed))

    if options.split_test:
        a, b = store.experiment_ranges[experiment]
        naming, merged_assign, _ = name_with_parts(name, store, np.arange(a, b), merged_assign, z,
                                                   annotated=sorted(set(exps)), confusion=confusion, seed=seed)
    else:
        naming = name(merged_assign, None)
    info = {int(c): {"label": str(naming.label[j]), "description": naming.describe(j)}
            for j, c in enumerate(naming.clusters)}
    scores = naming_metrics(truth, merged_assign, naming.cell_type, naming.cell_novelty, naming.cell_is_novel,
                            known, cluster_info=info, closest_type=naming.cell_closest, confidence=naming.confidence)
    # integration: k-NN transfer from the annotated cells to the held-out known cells
    labelled = np.array([not _missing(t) and str(t) in set(known) for t in truth], dtype=bool)
    query = _sample(np.flatnonzero(labelled), options.knn_max_cells, rng)
    scores["integration_knn"] = integration_knn(z_ref, ref_labels, z[query],
                                                np.asarray([str(t) for t in truth[query]], dtype=object),
                                                k=options.k_neighbours)
    scores["landmark_names"] = known
    scores["merged_landmarks"] = [int(m) for m in merged]
    scores["clusters"] = [
        {"cluster": int(c), "n_cells": int(naming.n_cells[j]), "label": str(naming.label[j]),
         "novelty": float(naming.novelty[j]), "is_novel": bool(naming.is_novel[j]),
         "description": naming.describe(j)}
        for j, c in enumerate(naming.clusters)
    ]
    return scores


def _one_run(store: Atlas, experiment: str, seed: int, k: int | str, config: RunConfig, truth: np.ndarray,
             pca: tuple[np.ndarray, np.ndarray], options: _NamingOptions) -> dict[str, Any]:
    """Train on ``store`` (the original or one with a type hidden) and score clusters and names.

    With ``k="auto"`` MARS chooses K; the PCA baseline then uses the same K.
    """
    a, b = store.experiment_ranges[experiment]
    t0 = time.perf_counter()
    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    model = Mars(store, unannotated=experiment, n_clusters=k, config=cfg).train()
    train_s = time.perf_counter() - t0
    k = int(model.plan.n_clusters)
    index, z = model.embed(experiments=[experiment], device=cfg.train.device)
    order = np.argsort(index, kind="stable")
    index, z = index[order], z[order]
    assign, _ = nearest(z, model.unannotated_landmarks)
    results = {"mars": _scored(truth, a, index.astype(np.int64), assign.astype(np.int64))}
    ae = _kmeans_ae(model.state, a, b)
    results["kmeans_ae"] = None if ae is None else _scored(truth, a, *ae)
    rows, scores = pca
    km = kmeans(scores, k, seed=seed)
    pca_assign, _ = nearest(scores, km.centroids)
    results["kmeans_pca"] = _scored(truth, a, rows, pca_assign.astype(np.int64))
    usage = np.bincount(assign, minlength=k)
    naming = _name_run(model, store, experiment, z, assign.astype(np.int64), truth[index - a], seed=seed,
                       options=options, device=cfg.train.device)
    return {
        "experiment": experiment,
        "seed": seed,
        "k": k,
        "n_cells": b - a,
        "n_labelled": int(sum(t is not None for t in truth)),
        "train_seconds": round(train_s, 3),
        "seconds": round(time.perf_counter() - t0, 3),
        "n_unused_landmarks": int((usage == 0).sum()),
        "metrics": {m: (None if r is None else r["metrics"]) for m, r in results.items()},
        "naming": naming,
        "assignments": {m: (None if r is None else r["assignment"]) for m, r in results.items()},
    }


# ---------------------------------------------------------------------------------------------
# hiding a cell type from the annotated experiments


def _hidden_type_store(store: Atlas, experiment: str, cell_type: str, directory: Path) -> Path:
    """A store in ``directory`` that is ``store`` with ``cell_type`` unlabelled outside ``experiment``.

    Every element is a symbolic link to the original except ``obs/cell_type``, which is copied
    and whose codes of ``cell_type`` are set to -1 (missing) in the other experiments.
    """
    import zarr

    source = Path(store.path).resolve()
    target = directory / source.name
    target.mkdir()

    def skip(entry: Path) -> bool:  # annotate's staging directories and the writer lock
        return entry.name.startswith(".mars-scale")

    for entry in sorted(source.iterdir()):
        if skip(entry):
            continue
        if entry.is_file():  # group metadata (zarr.json; .zgroup, .zattrs, .zmetadata in format 2)
            shutil.copy2(entry, target / entry.name)
        elif entry.name == "obs":
            (target / "obs").mkdir()
            for child in sorted(entry.iterdir()):
                if skip(child):
                    continue
                if child.is_file():
                    shutil.copy2(child, target / "obs" / child.name)
                elif child.name == "cell_type":
                    shutil.copytree(child, target / "obs" / child.name)
                else:
                    os.symlink(child, target / "obs" / child.name, target_is_directory=True)
        else:
            os.symlink(entry, target / entry.name, target_is_directory=entry.is_dir())
    categories = store.cell_types
    code = categories.index(cell_type)
    codes = zarr.open_array(str(target / "obs" / "cell_type" / "codes"), mode="r+")
    hidden = 0
    step = 1 << 20
    for name, (a, b) in store.experiment_ranges.items():
        if name == experiment:
            continue
        for lo in range(a, b, step):
            hi = min(b, lo + step)
            block = np.asarray(codes[lo:hi])
            mask = block == code
            if mask.any():
                block[mask] = -1
                codes[lo:hi] = block
                hidden += int(mask.sum())
    if hidden:
        logger.info("hid %d cells of %r outside %r (they stay in the data, unlabelled): %s", hidden, cell_type,
                    experiment, target)
    else:
        logger.info("%r occurs only in %r: nothing to hide, it is new already", cell_type, experiment)
    return target


# ---------------------------------------------------------------------------------------------
# the runner


def _mean_sd(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "n": int(arr.size),
    }


def _scenario_label(experiment: str, removed: str | None) -> str:
    return experiment if removed is None else f"{experiment} without {removed}"


def _summarise(runs: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    summary: dict[str, dict] = {}
    for label in dict.fromkeys(r["scenario"] for r in runs):
        mine = [r for r in runs if r["scenario"] == label]
        per_method = {}
        for method in METHODS:
            scored = [r["metrics"][method] for r in mine if r["metrics"][method] is not None]
            if scored:
                per_method[method] = {m: _mean_sd([s[m] for s in scored]) for m in _METRICS}
        naming = {}
        for metric in NAMING_METRICS:
            values = [r["naming"][metric] for r in mine if r["naming"][metric] is not None]
            naming[metric] = _mean_sd(values) if values else None
        ks = sorted({r["k"] for r in mine})  # one K unless MARS chose it per seed (k="auto")
        summary[label] = {"experiment": mine[0]["experiment"], "removed": mine[0]["removed"],
                          "k": ks[0] if len(ks) == 1 else ks,
                          "n_cells": mine[0]["n_cells"], "methods": per_method, "naming": naming,
                          "new_types": mine[0]["naming"]["new_types"]}
    overall = {}
    for method in METHODS:
        exps = [s["methods"][method] for s in summary.values() if method in s["methods"]]
        if exps:
            overall[method] = {m: float(np.mean([e[m]["mean"] for e in exps])) for m in _METRICS}
            overall[method]["n_experiments"] = len(exps)
    overall_naming = {}
    for metric in NAMING_METRICS:
        means = [s["naming"][metric]["mean"] for s in summary.values() if s["naming"][metric] is not None]
        overall_naming[metric] = float(np.mean(means)) if means else None
    return summary, overall, overall_naming


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _Cost:
    """Reports how many trainings a protocol runs, then the time per training and the time left."""

    def __init__(self, total: int, what: str, report: Progress) -> None:
        self.total, self.done, self.report = total, 0, report
        self.started = time.perf_counter()
        if total > 1:
            report(f"{what}: {total} trainings; the time per training and the time left follow the first")

    def finished(self, run: dict[str, Any]) -> None:
        self.done += 1
        if self.done == 1 and self.total > 1:
            per = time.perf_counter() - self.started
            left = per * (self.total - 1)
            eta = (_dt.datetime.now() + _dt.timedelta(seconds=left)).strftime("%H:%M")
            self.report(f"first training took {run['train_seconds']:.1f} s ({per:.1f} s with scoring); "
                        f"about {_duration(left)} left for the other {self.total - 1} (done near {eta})")


def _run_scenarios(store: Atlas, scenarios: list[tuple[str, str | None]], *, seeds: list[int], config: RunConfig,
                   k: str | int, pca_components: int, pca_max_cells: int, options: _NamingOptions,
                   workdir: str | os.PathLike | None, what: str, progress: Progress | None) -> list[dict[str, Any]]:
    cost = _Cost(len(scenarios) * len(seeds), what, progress or logger.info)
    runs = []
    pcas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for experiment, removed in scenarios:
        truth, n_types = _held_out_truth(store, experiment)
        k_exp = n_types if k == "truth" else k if k == AUTO else int(k)
        a, b = store.experiment_ranges[experiment]
        logger.info("holding out %r (%d cells, K=%s)%s", experiment, b - a, k_exp,
                    "" if removed is None else f", {removed!r} hidden from the other experiments")
        if experiment not in pcas:  # X is the same whatever is hidden: one PCA per experiment
            pcas[experiment] = _pca_of_experiment(store, experiment, n_components=pca_components,
                                                  max_cells=pca_max_cells, seed=seeds[0])
        tmp = None
        try:
            if removed is None:
                train_store = store
            else:
                tmp = Path(tempfile.mkdtemp(prefix="mars-scale-hidden-", dir=workdir))
                train_store = open_store(_hidden_type_store(store, experiment, removed, tmp))
            for seed in seeds:
                run = _one_run(train_store, experiment, seed, k_exp, config, truth, pcas[experiment], options)
                run["removed"] = removed
                run["scenario"] = _scenario_label(experiment, removed)
                m, nm = run["metrics"], run["naming"]
                logger.info(
                    "%s, seed %d: ARI MARS %.3f, K-means on AE %s, K-means on PCA %.3f; known called novel %s, "
                    "named right %s, new called novel %s (%.1f s)",
                    run["scenario"], seed, m["mars"]["ari"],
                    "n/a" if m["kmeans_ae"] is None else f"{m['kmeans_ae']['ari']:.3f}", m["kmeans_pca"]["ari"],
                    _f(nm["known_called_novel"]), _f(nm["known_name_accuracy"]), _f(nm["new_called_novel"]),
                    run["seconds"],
                )
                runs.append(run)
                cost.finished(run)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return runs


def _check_protocol_options(k: Any, pca_components: Any, pca_max_cells: Any) -> None:
    if not (k in ("truth", AUTO) or (isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1)):
        raise InputError(f"k must be 'truth', 'auto' or a positive integer (got {k!r})")
    for name, value in (("pca_components", pca_components), ("pca_max_cells", pca_max_cells)):
        _check_int(name, value, 2)


def _check_k(store: Atlas, experiments: Sequence[str], k: str | int) -> None:
    if k in ("truth", AUTO):
        return
    for experiment in experiments:
        a, b = store.experiment_ranges[experiment]
        if int(k) > b - a:
            raise InputError(f"k={int(k)} is larger than the {b - a} cells of experiment {experiment!r}")


def _result(store: Atlas, kind: str, runs: list[dict[str, Any]], protocol: dict[str, Any], started: float) -> dict:
    summary, overall, overall_naming = _summarise(runs)
    result = {
        "store": str(store.path),
        "protocol": {"kind": kind, **protocol},
        "runs": runs,
        "summary": summary,
        "overall": overall,
        "overall_naming": overall_naming,
        "seconds": round(time.perf_counter() - started, 3),
    }
    result["comments"] = baseline_comments(result)
    return result


def leave_one_out(
    store: Atlas | str | os.PathLike,
    *,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    config: RunConfig | None = None,
    experiments: Sequence[str] | None = None,
    k: str | int = "truth",
    pca_components: int = 50,
    pca_max_cells: int = 50_000,
    min_cluster_cells: int = 10,
    novelty_threshold: float = 0.5,
    k_neighbours: int = KNN_NEIGHBOURS,
    knn_max_cells: int = 50_000,
    split_test: bool = True,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Hold out every annotated experiment in turn; score MARS, two K-means baselines and the naming.

    See the module docstring for the protocol. Nothing learnt from the held-out labels
    influences training, model selection or the baselines. Nothing is written into the store.

    Parameters
    ----------
    store
        An atlas store (opened or a path) with cell-type labels in at least two experiments.
    seeds
        One MARS training (and one run of each baseline's K-means) per seed and experiment.
    config
        Model and training options; ``train.seed`` is replaced by each seed.
    experiments
        Experiments to hold out (default: every experiment with labels).
    k
        ``"truth"``: K is the number of cell types in the held-out experiment (the reference
        protocol); an integer fixes K for every experiment; ``"auto"``: MARS chooses K in each
        training (``Mars(n_clusters="auto")``), and the PCA baseline uses the same K.
    pca_components
        Principal components of the PCA baseline.
    pca_max_cells
        Most cells of a held-out experiment in the PCA baseline (uniform subsample beyond).
    min_cluster_cells
        Before naming, landmarks with fewer cells are merged into the nearest other one (as
        ``annotate`` does).
    novelty_threshold
        A cluster whose novelty reaches it is called novel.
    split_test
        Name with the split test, as ``annotate`` does by default (:mod:`mars_scale.subpopulations`).
    k_neighbours
        Neighbours of the k-NN label transfer (``integration_knn``).
    knn_max_cells
        Most reference and query cells in the k-NN transfer (seeded subsamples beyond).
    progress
        Called with the cost messages (number of trainings, then time per training and time
        left); default: logged at INFO.

    Returns
    -------
    dict
        ``runs``: one dict per (experiment, seed) with ``experiment``, ``removed`` (``None``),
        ``scenario`` (the experiment), ``seed``, ``k``, ``n_cells``, ``n_labelled``,
        ``train_seconds``, ``seconds``, ``n_unused_landmarks``, ``metrics`` (per method in
        :data:`METHODS`: the dict of :func:`~mars_scale.metrics.clustering_metrics`, or
        ``None`` if unavailable), ``naming`` (:func:`naming_metrics` of the named clusters, with
        ``integration_knn``, ``landmark_names``, ``merged_landmarks`` and the per-cluster
        ``clusters`` table) and ``assignments`` (per method: ``index`` (store rows), ``truth``
        (labels, ``None`` when missing) and ``cluster``, numpy arrays, from which ``metrics``
        were computed); ``summary``: per experiment, ``k``, ``n_cells``, ``new_types``, per
        method and metric ``mean``, ``sd`` (``ddof=1``), ``min``, ``max``, ``n``, and the same
        statistics per naming metric (:data:`NAMING_METRICS`, ``None`` when never defined);
        ``overall``: per method, the mean over experiments of each metric's mean;
        ``overall_naming``: the same for the naming metrics; ``comments``: one line per
        (experiment, baseline) where the baseline's mean ARI beats MARS's; ``protocol``: the
        settings; ``store``.

    Raises
    ------
    InputError
        For unknown or unlabelled experiments, fewer than two labelled experiments, bad seeds,
        a bad ``k`` or other option.
    """
    store = as_store(store)
    config = config or RunConfig()
    seeds = _check_seeds(seeds)
    _check_protocol_options(k, pca_components, pca_max_cells)
    options = _NamingOptions(min_cluster_cells, novelty_threshold, k_neighbours, knn_max_cells, split_test)
    chosen = _resolve_experiments(store, experiments)
    _check_k(store, chosen, k)
    started = time.perf_counter()
    runs = _run_scenarios(store, [(e, None) for e in chosen], seeds=seeds, config=config, k=k,
                          pca_components=pca_components, pca_max_cells=pca_max_cells, options=options,
                          workdir=None, what=f"leave-one-out ({len(chosen)} experiments x {len(seeds)} seeds)",
                          progress=progress)
    return _result(store, "leave-one-experiment-out", runs, _protocol_record(
        seeds=seeds, k=k, experiments=chosen, pca_components=pca_components, pca_max_cells=pca_max_cells,
        options=options, config=config), started)


def _protocol_record(*, seeds: list[int], k: str | int, experiments: list[str], pca_components: int,
                     pca_max_cells: int, options: Any, config: RunConfig, **extra: Any) -> dict[str, Any]:
    """The settings of a protocol run, as stored in its result."""
    return {
        "seeds": seeds,
        "k": k if k in ("truth", AUTO) else int(k),
        "experiments": experiments,
        **extra,
        "methods": list(METHODS),
        "pca_components": int(pca_components),
        "pca_max_cells": int(pca_max_cells),
        "naming": dataclasses.asdict(options),
        "sd_ddof": 1,
        "config": config_to_dict(config),
    }


def _removed_type_scenarios(
    store: Atlas, types: Sequence[str] | str, chosen: list[str], min_type_cells: int
) -> tuple[list[str] | None, list[tuple[str, str]], list[dict[str, str]], dict[str, list[str]]]:
    """:func:`leave_type_out`'s scenarios: the wanted types (``None`` for all), the (held-out
    experiment, hidden type) pairs to run, the skipped ones with a reason, and per scenario the
    annotated experiments left with a single type."""
    categories = store.cell_types
    if isinstance(types, str) and types == "all":
        wanted = None
    else:
        wanted = [types] if isinstance(types, str) else [str(t) for t in types]
        if not wanted:
            raise InputError("types is empty (pass a cell type, or 'all')")
        unknown = [t for t in wanted if t not in categories]
        if unknown:
            raise InputError(f"{store.path}: unknown cell type {unknown[0]!r} (known: {', '.join(categories)})")
    counts = {}  # per experiment, cells of each type
    for name, (a, b) in store.experiment_ranges.items():
        codes, _ = store.categorical_codes("cell_type", a, b)
        counts[name] = np.bincount(codes[codes >= 0], minlength=len(categories))
    scenarios, skipped, single = [], [], {}
    for experiment in chosen:
        held = counts[experiment]
        if wanted is None:
            hide = [t for i, t in enumerate(categories) if held[i] >= min_type_cells]
        else:
            hide = [t for t in wanted if held[categories.index(t)] > 0]
        for t in hide:
            i = categories.index(t)
            left = {e: c.copy() for e, c in counts.items() if e != experiment}
            for c in left.values():
                c[i] = 0
            label = _scenario_label(experiment, t)
            if not any(c.sum() for c in left.values()):
                skipped.append({"scenario": label, "reason": "no labelled cell left in the other experiments"})
                logger.warning("%s: skipped, no labelled cell left in the other experiments", label)
                continue
            one = sorted(e for e, c in left.items() if (c > 0).sum() == 1)
            if one:
                single[label] = one
            scenarios.append((experiment, t))
    if wanted is not None:
        for t in wanted:
            ran = any(s[1] == t for s in scenarios)
            if not ran and not any(s["scenario"].endswith(f" without {t}") for s in skipped):
                raise InputError(f"{store.path}: no held-out experiment holds cell type {t!r} "
                                 f"(held-out experiments: {', '.join(chosen)})")
    if not scenarios:
        raise InputError(f"{store.path}: no removed-type scenario to run"
                         + (f" ({skipped[0]['scenario']}: {skipped[0]['reason']})" if skipped else ""))
    return wanted, scenarios, skipped, single


def leave_type_out(
    store: Atlas | str | os.PathLike,
    types: Sequence[str] | str,
    *,
    seeds: Sequence[int] = (0,),
    config: RunConfig | None = None,
    experiments: Sequence[str] | None = None,
    k: str | int = "truth",
    min_type_cells: int = MIN_TYPE_CELLS,
    pca_components: int = 50,
    pca_max_cells: int = 50_000,
    min_cluster_cells: int = 10,
    novelty_threshold: float = 0.5,
    k_neighbours: int = KNN_NEIGHBOURS,
    knn_max_cells: int = 50_000,
    split_test: bool = True,
    workdir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """The removed-type protocol: hide a type from the annotated experiments, train, score it as new.

    For each type ``T`` of ``types`` and each held-out experiment ``E`` holding ``T``, the cells
    of ``T`` in the other experiments are *hidden* (their labels set to missing in a temporary
    linked copy of the store; see the module docstring): they stay in the data as unlabelled
    cells, which training gives weight 0 in the annotated term of the loss. Then one MARS
    training per seed, scored as in :func:`leave_one_out`, ``T`` being a new type of ``E``.
    The original store is never written.

    Parameters
    ----------
    store
        An atlas store with cell-type labels in at least two experiments.
    types
        Cell types to hide, or ``"all"``: every type of each held-out experiment with at least
        ``min_type_cells`` cells there, in turn.
    seeds, config, experiments, k, pca_components, pca_max_cells
        As in :func:`leave_one_out` (``experiments``: the held-out experiments to consider).
    min_cluster_cells, novelty_threshold, k_neighbours, knn_max_cells, split_test, progress
        As in :func:`leave_one_out`.
    min_type_cells
        With ``types="all"``, a type enters only where the held-out experiment has at least
        this many of its cells.
    workdir
        Where the temporary stores go (default: the system's temporary directory); each is
        removed after its runs.

    Returns
    -------
    dict
        As :func:`leave_one_out`, with runs, summary and comments per scenario
        ``"<experiment> without <type>"`` (``removed`` gives the type); ``skipped``: the
        scenarios not run (e.g. no labelled annotated cell left) with the reason;
        ``single_type_reference``: per scenario, the annotated experiments left with a single
        type.

    Raises
    ------
    InputError
        For an unknown type, a type that no held-out experiment holds, no scenario left, or
        the errors of :func:`leave_one_out`.
    """
    store = as_store(store)
    config = config or RunConfig()
    seeds = _check_seeds(seeds)
    _check_protocol_options(k, pca_components, pca_max_cells)
    _check_int("min_type_cells", min_type_cells, 1)
    options = _NamingOptions(min_cluster_cells, novelty_threshold, k_neighbours, knn_max_cells, split_test)
    chosen = _resolve_experiments(store, experiments)
    _check_k(store, chosen, k)
    wanted, scenarios, skipped, single = _removed_type_scenarios(store, types, chosen, min_type_cells)
    started = time.perf_counter()
    runs = _run_scenarios(store, scenarios, seeds=seeds, config=config, k=k, pca_components=pca_components,
                          pca_max_cells=pca_max_cells, options=options, workdir=workdir,
                          what=f"removed-type protocol ({len(scenarios)} scenarios x {len(seeds)} seeds)",
                          progress=progress)
    result = _result(store, "removed-type", runs, _protocol_record(
        seeds=seeds, k=k, experiments=chosen, pca_components=pca_components, pca_max_cells=pca_max_cells,
        options=options, config=config,
        types="all" if wanted is None else wanted, min_type_cells=int(min_type_cells),
        scenarios=[_scenario_label(e, t) for e, t in scenarios],
        hiding="labels set to missing in a linked temporary store (cells kept, unlabelled)"), started)
    result["skipped"] = skipped
    result["single_type_reference"] = single
    return result


# ---------------------------------------------------------------------------------------------
# scoring an annotation already in a store


def _plain_strings(values: Any) -> list[str]:
    return [str(v) for v in np.asarray(values, dtype=object).ravel()]


def _embedding_rows(store: Atlas, emb: Any, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` (any order) of a stored embedding, reading only the blocks that hold them."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    block = 65_536

    def blocks():
        for lo in range(0, store.n_cells, block):
            hi = min(store.n_cells, lo + block)
            first = int(np.searchsorted(sorted_rows, lo))
            if first < sorted_rows.size and sorted_rows[first] < hi:  # read only blocks holding rows
                yield np.arange(lo, hi), np.asarray(emb[lo:hi], dtype=np.float32)

    taken = np.empty((rows.size, emb.shape[1]), dtype=np.float32)
    taken[order] = _take_rows(blocks(), sorted_rows, int(emb.shape[1]))
    return taken


def _annotation_record(store: Atlas, keys: dict[str, Any], key_added: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The run record ``uns[key_added]`` of a stored annotation and its experiments (several when
    they were annotated together), after checking that every element the annotation writes is there."""
    from anndata.io import read_elem

    cluster_col, type_col, _, novelty_col, _, _ = keys["obs"]
    root = store.root
    missing = [f"obs/{c}" for c in (cluster_col, type_col, novelty_col) if c not in root["obs"]]
    missing += [f"{g}/{n}" for g, n in (("obsm", keys["obsm"]), ("uns", keys["uns"]))
                if g not in root or n not in root[g]]
    if missing:
        raise InputError(f"{store.path}: no annotation under key {key_added!r} ({missing[0]} is missing; "
                         f"run \"mars-scale annotate --key {key_added}\" first, or pass the key it used)")
    record = read_elem(root["uns"][keys["uns"]])
    names = experiment_names(record["unannotated"])
    for unannotated in names:
        if unannotated not in store.experiment_ranges:
            raise InputError(f"{store.path}: uns/{key_added} names experiment {unannotated!r}, which the store lacks")
    return record, names


def score_annotation(
    store: Atlas | str | os.PathLike,
    *,
    key_added: str = "mars",
    k_neighbours: int = KNN_NEIGHBOURS,
    knn_max_cells: int = 50_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Score the annotation written by ``annotate`` under ``key_added`` against the true labels.

    The truth is the ``cell_type`` labels of the annotated experiment itself (which training
    never saw). Nothing is trained and nothing is written into the store. The known types are
    the names the model knew (``uns[key_added]['names']``); the k-NN transfer goes from the
    labelled cells of the other experiments with a known type to the experiment's known cells,
    in ``obsm['X_<key_added>']``.

    Parameters
    ----------
    store
        The atlas store (opened or a path).
    key_added
        The prefix the annotation was written under (``annotate --key``).
    k_neighbours
        Neighbours of the k-NN label transfer.
    knn_max_cells
        Most reference and query cells in the transfer (uniform subsamples beyond, seeded).
    seed
        Seeds those subsamples.

    Returns
    -------
    dict
        ``store``, ``key_added``, ``unannotated``, ``protocol`` (``kind = "annotation"`` and the
        options), ``metrics`` (:func:`naming_metrics` of ``obs['<key>_cluster']``,
        ``obs['<key>_cell_type']``, ``obs['<key>_novelty']`` and the clusters' novelty calls,
        with ``integration_knn``; ``per_type`` apart), ``per_type`` (per true type, see
        :func:`naming_metrics`) and ``clusters`` (per cluster: ``cluster``, ``n_cells``,
        ``label``, ``novelty``, ``is_novel``, ``description``, from ``uns[key_added]``). When
        several experiments were annotated together (one model), ``unannotated`` lists them,
        ``metrics`` holds ``ari`` per experiment and ``per_experiment`` each one's result as
        above (the k-NN transfer then takes its reference from the other experiments only).

    Raises
    ------
    InputError
        If the store has no annotation under ``key_added``, or the annotated experiment has no
        ``cell_type`` labels.
    """
    from mars_scale.annotate import result_keys

    store = as_store(store)
    _check_int("k_neighbours", k_neighbours, 1)
    _check_int("knn_max_cells", knn_max_cells, 1)
    keys = result_keys(key_added)
    record, names = _annotation_record(store, keys, key_added)
    protocol = {"kind": "annotation", "key_added": key_added, "k_neighbours": int(k_neighbours),
                "knn_max_cells": int(knn_max_cells), "seed": int(seed)}
    per = {name: _score_experiment(store, keys, record, name, held_out=names, protocol=protocol) for name in names}
    if len(names) == 1:
        return per[names[0]]
    return {"store": str(store.path), "key_added": key_added, "unannotated": list(names), "protocol": protocol,
            "metrics": {"ari": {name: r["metrics"]["ari"] for name, r in per.items()}}, "per_experiment": per}


def _score_experiment(store: Atlas, keys: dict[str, Any], record: dict[str, Any], unannotated: str, *,
                      held_out: tuple[str, ...], protocol: dict[str, Any]) -> dict[str, Any]:
    """:func:`score_annotation` of one of the annotated experiments (``held_out``: all of them)."""
    key_added, k_neighbours, knn_max_cells, seed = (protocol[k] for k in ("key_added", "k_neighbours",
                                                                             "knn_max_cells", "seed"))
    cluster_col, type_col, confidence_col, novelty_col, closest_col, _ = keys["obs"]
    root = store.root
    a, b = store.experiment_ranges[unannotated]
    truth, n_types = _held_out_truth(store, unannotated)
    if n_types == 0:
        raise InputError(f"{store.path}: experiment {unannotated!r} (annotated under {key_added!r}) has no "
                         "cell_type labels, so its annotation cannot be scored")
    codes, categories = store.categorical_codes(cluster_col, a, b)
    cluster_ids = np.asarray([int(c) for c in categories] + [-1], dtype=np.int64)
    clusters = cluster_ids[np.where(codes >= 0, codes, len(categories))]
    cell_type = _labels(*store.categorical_codes(type_col, a, b), missing="")
    novelty = np.asarray(root["obs"][novelty_col][a:b], dtype=np.float64)
    confidence = closest = None  # per-cell outputs an annotation of an earlier version may lack
    if confidence_col in root["obs"]:
        confidence = np.asarray(root["obs"][confidence_col][a:b], dtype=np.float64)
    if closest_col in root["obs"]:
        closest = _labels(*store.categorical_codes(closest_col, a, b), missing="")
    table_ids = np.asarray(record["clusters"], dtype=np.int64).ravel()
    labels, descriptions = _plain_strings(record["label"]), _plain_strings(record["description"])
    nov = np.asarray(record["novelty"], dtype=np.float64).ravel()
    is_novel = np.asarray(record["is_novel"], dtype=bool).ravel()
    n_cells = np.asarray(record.get("n_cells", np.zeros(len(table_ids))), dtype=np.int64).ravel()
    info = {int(c): {"label": labels[j], "description": descriptions[j]} for j, c in enumerate(table_ids)}
    novel_of = dict(zip(table_ids.tolist(), is_novel.tolist()))
    called = np.array([bool(novel_of.get(int(c), False)) for c in clusters], dtype=bool)
    known = sorted(set(_plain_strings(record["names"])))
    metrics = naming_metrics(truth, clusters, cell_type, novelty, called, known, cluster_info=info,
                             closest_type=closest, confidence=confidence)
    # integration: k-NN label transfer in the stored embedding
    rng = np.random.default_rng(seed)
    others = [e for e in store.experiments if e not in held_out]
    ref_rows, ref_labels = _reference_rows(store, others, set(known), max_cells=knn_max_cells, rng=rng)
    query_ok = np.array([not _missing(t) and str(t) in set(known) for t in truth], dtype=bool)
    query = a + _sample(np.flatnonzero(query_ok), knn_max_cells, rng)
    taken = _embedding_rows(store, root["obsm"][keys["obsm"]], np.concatenate([ref_rows, query]))
    z_ref, z_query = taken[: ref_rows.size], taken[ref_rows.size:]
    metrics["integration_knn"] = integration_knn(
        z_ref, ref_labels, z_query, np.asarray([str(t) for t in truth[query - a]], dtype=object), k=k_neighbours)
    per_type = metrics.pop("per_type")
    clusters_table = [
        {"cluster": int(c), "n_cells": int(n_cells[j]) if j < n_cells.size else int((clusters == c).sum()),
         "label": labels[j], "novelty": float(nov[j]), "is_novel": bool(is_novel[j]), "description": descriptions[j]}
        for j, c in enumerate(table_ids)
    ]
    logger.info("scored the annotation %r of %r: ARI %.3f, known called novel %s, named right %s, new called novel %s",
                key_added, unannotated, metrics["ari"], _f(metrics["known_called_novel"]),
                _f(metrics["known_name_accuracy"]), _f(metrics["new_called_novel"]))
    return {
        "store": str(store.path),
        "key_added": key_added,
        "unannotated": unannotated,
        "protocol": protocol,
        "metrics": metrics,
        "per_type": per_type,
        "clusters": clusters_table,
    }


# ---------------------------------------------------------------------------------------------
# reports


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _fmt(stat: dict[str, float] | None) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.3f} ± {stat['sd']:.3f}"


def baseline_comments(result: dict[str, Any]) -> list[str]:
    """One line per (held-out experiment or scenario, baseline) where the baseline beats MARS.

    A baseline beats MARS when its mean ARI over seeds is above MARS's.

    Parameters
    ----------
    result
        The dict returned by :func:`leave_one_out` or :func:`leave_type_out`.

    Returns
    -------
    list of str
        E.g. ``"K-means on PCA beats MARS on exp0: ARI 0.812 against 0.640 (mean of 5 seeds)"``.
    """
    lines = []
    for label, s in result["summary"].items():
        mars = s["methods"].get("mars", {}).get("ari")
        if mars is None:
            continue
        for method in METHODS[1:]:
            other = s["methods"].get(method, {}).get("ari")
            if other is not None and other["mean"] > mars["mean"]:
                lines.append(f"{_METHOD_TITLES[method]} beats MARS on {label}: ARI {other['mean']:.3f} against "
                             f"{mars['mean']:.3f} (mean of {mars['n']} seed{'s' if mars['n'] != 1 else ''})")
    return lines


def markdown_table(result: dict[str, Any]) -> str:
    """A markdown report of :func:`leave_one_out` or :func:`leave_type_out`.

    Parameters
    ----------
    result
        The dict returned by :func:`leave_one_out` or :func:`leave_type_out`.

    Returns
    -------
    str
        ARI mean ± sd over seeds per held-out experiment (scenario) and method, with a row of
        means over experiments; one line per case where a baseline beats MARS; every
        clustering metric's mean per method; the naming and novelty metrics (mean ± sd over
        seeds) per experiment, with a row of means.
    """
    seeds = result["protocol"]["seeds"]
    removed = result["protocol"]["kind"] == "removed-type"
    title = ("Removed-type protocol (each type hidden from the annotated experiments in turn)" if removed
             else "Leave-one-experiment-out")
    first = "scenario" if removed else "held-out experiment"
    lines = [
        f"{title}, {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); ARI mean ± sd over seeds.",
        "",
        f"| {first} | cells | K | " + " | ".join(_METHOD_TITLES[m] for m in METHODS) + " |",
        "|---|---|---|" + "---|" * len(METHODS),
    ]
    for label, s in result["summary"].items():
        cells = [_fmt(s["methods"].get(m, {}).get("ari")) for m in METHODS]
        lines.append(f"| {label} | {s['n_cells']} | {s['k']} | " + " | ".join(cells) + " |")
    means = [
        f"{result['overall'][m]['ari']:.3f}" if m in result["overall"] else "n/a" for m in METHODS
    ]
    lines.append("| **mean** | | | " + " | ".join(means) + " |")
    comments = result.get("comments")
    if comments is None:
        comments = baseline_comments(result)
    if comments:
        lines += [""] + [f"- {c}" for c in comments]
    lines += ["", "| method | " + " | ".join(_METRICS) + " |", "|---|" + "---|" * len(_METRICS)]
    for m in METHODS:
        if m in result["overall"]:
            vals = " | ".join(f"{result['overall'][m][k]:.3f}" for k in _METRICS)
            lines.append(f"| {_METHOD_TITLES[m]} | {vals} |")
    if any("naming" in s for s in result["summary"].values()):
        lines += [
            "",
            "Naming and novelty of MARS's clusters (mean ± sd over seeds; – where no cell enters):",
            "",
            f"| {first} | new types | " + " | ".join(_NAMING_TITLES[m] for m in NAMING_METRICS) + " |",
            "|---|---|" + "---|" * len(NAMING_METRICS),
        ]
        for label, s in result["summary"].items():
            naming = s.get("naming") or {}
            cells = [_fmt(naming[m]) if naming.get(m) is not None else "–" for m in NAMING_METRICS]
            lines.append(f"| {label} | {', '.join(s.get('new_types') or []) or '–'} | " + " | ".join(cells) + " |")
        overall = result.get("overall_naming") or {}
        lines.append("| **mean** | | " + " | ".join(_f(overall.get(m)) for m in NAMING_METRICS) + " |")
    for label, exps in (result.get("single_type_reference") or {}).items():
        lines.append(f"- {label}: {', '.join(exps)} left with a single annotated type")
    if result.get("skipped"):
        lines += [""] + [f"- skipped {s['scenario']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines) + "\n"


def annotation_markdown(result: dict[str, Any]) -> str:
    """A markdown report of :func:`score_annotation`: the metrics, then per true type and cluster.

    Parameters
    ----------
    result
        The dict returned by :func:`score_annotation`.

    Returns
    -------
    str
        A heading line, a table of the metrics, a table per true type (cells, known, called
        novel, named right, majority cluster and its description) and one per cluster.
    """
    if "per_experiment" in result:  # several experiments annotated together: one report each
        head = [f"Annotation {result['key_added']!r} of {len(result['per_experiment'])} experiments (one set of "
                "clusters), each scored against its own cell_type labels.", "", "| experiment | ARI |", "|---|---|"]
        head += [f"| {name} | {_f(ari)} |" for name, ari in result["metrics"]["ari"].items()]
        return "\n".join(head) + "\n\n" + "\n".join(annotation_markdown(r) for r in result["per_experiment"].values())
    m = result["metrics"]
    c = m["clustering"] or {}
    new = ", ".join(f"{t} ({result['per_type'][t]['n_cells']} cells)" for t in m["new_types"]) or "none"
    jaccard = ", ".join(f"{t} {_f(v)}" for t, v in m["new_jaccard"].items()) or "–"
    lines = [
        f"Annotation {result['key_added']!r} of experiment {result['unannotated']!r} scored against its own "
        f"cell_type labels: {m['n_cells']} cells, {m['n_labelled']} labelled, {m['n_known']} of a known type, "
        f"{m['n_new']} of a new type.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| ARI of the clusters | {_f(c.get('ari'))} |",
        f"| NMI / AMI | {_f(c.get('nmi'))} / {_f(c.get('ami'))} |",
        f"| matched accuracy / macro F1 | {_f(c.get('accuracy'))} / {_f(c.get('f1'))} |",
        f"| known cells called novel | {_f(m['known_called_novel'])} |",
        f"| known cells named right | {_f(m['known_name_accuracy'])} |",
        f"| known cells whose closest type is right | {_f(m['known_closest_accuracy'])} |",
        f"| confidence AUROC (right calls against wrong) | {_f(m['confidence_auroc'])} |",
        f"| new types | {new} |",
        f"| new cells called novel | {_f(m['new_called_novel'])} |",
        f"| novelty AUROC (new against known cells) | {_f(m['novelty_auroc'])} |",
        f"| Jaccard of each new type's best cluster | {jaccard} |",
        f"| k-NN label transfer (k={result['protocol']['k_neighbours']}) | {_f(m['integration_knn'])} |",
        "",
        "| true type | cells | known | called novel | named right | majority cluster | its description |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, r in result["per_type"].items():
        lines.append(
            f"| {t} | {r['n_cells']} | {'yes' if r['known'] else 'no'} | {_f(r['called_novel'])} | "
            f"{_f(r['named_right'])} | {r['majority_cluster']} ({100 * r['majority_fraction']:.0f}%) | "
            f"{r['cluster_description'] or '–'} |"
        )
    lines += ["", "| cluster | cells | name | novelty | description |", "|---|---|---|---|---|"]
    for r in result["clusters"]:
        lines.append(f"| {r['cluster']} | {r['n_cells']} | {r['label']} | {r['novelty']:.3f} | {r['description']} |")
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """Numpy scalars and arrays as Python values, recursively (for JSON)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_ready(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    if "runs" in result:
        out["runs"] = [{k: v for k, v in run.items() if k != "assignments"} for run in result["runs"]]
    return _plain(out)


def write_report(result: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``evaluation.json``, ``evaluation.md`` and (for a protocol) ``assignments.npz``.

    Parameters
    ----------
    result
        The dict returned by :func:`leave_one_out`, :func:`leave_type_out` or
        :func:`score_annotation`.
    output_dir
        Created if missing; files in it are replaced atomically.

    Returns
    -------
    dict
        Paths under ``json``, ``markdown`` and, for :func:`leave_one_out` and
        :func:`leave_type_out`, ``assignments``. The npz holds, per run and method,
        ``<experiment>/<seed>/<method>/{index,cluster,truth}`` (``<experiment>/-<type>/<seed>/…``
        for a removed-type run; truth as strings, ``""`` when missing).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "evaluation.json", "markdown": out / "evaluation.md"}
    annotation = result["protocol"]["kind"] == "annotation"

    def atomic(path: Path, write) -> None:
        with atomic_file(path) as tmp:
            write(tmp)

    atomic(paths["json"], lambda p: p.write_text(json.dumps(_json_ready(result), indent=2) + "\n"))
    text = annotation_markdown(result) if annotation else markdown_table(result)
    atomic(paths["markdown"], lambda p: p.write_text(text))
    if annotation:
        return paths
    paths["assignments"] = out / "assignments.npz"
    arrays = {}
    for run in result["runs"]:
        for method, a in run["assignments"].items():
            if a is None:
                continue
            removed = run.get("removed")
            key = f"{run['experiment']}/{run['seed']}/{method}" if removed is None else \
                f"{run['experiment']}/-{removed}/{run['seed']}/{method}"
            arrays[f"{key}/index"] = a["index"]
            arrays[f"{key}/cluster"] = a["cluster"]
            arrays[f"{key}/truth"] = np.array(["" if t is None else str(t) for t in a["truth"]])

    def save_npz(path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)

    atomic(paths["assignments"], save_npz)
    return paths


# ---------------------------------------------------------------------------------------------
# naming on a held-out experiment


def naming_report(
    store_path: str | os.PathLike,
    *,
    unannotated: str,
    config: RunConfig | None = None,
    n_clusters: str | int = "truth",
    seed: int = 0,
    key_added: str = "mars",
    novelty_threshold: float = 0.5,
    run_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train with one experiment held out, annotate it, and score the names against its labels.

    The labels of ``unannotated`` are used for ``K`` (``n_clusters="truth"``) and for scoring
    only. Results are written into the store (replacing earlier ones under ``key_added``).

    Parameters
    ----------
    store_path
        The store (written in place).
    unannotated
        The experiment to hold out.
    config
        Model and training options (``train.seed`` is replaced by ``seed``).
    n_clusters
        ``"truth"`` (number of true types in the held-out experiment), ``"auto"`` (MARS
        chooses, :func:`~mars_scale.train.plan_training`) or an integer.
    seed
        Training and naming seed.
    key_added
        Prefix of the result elements in the store.
    novelty_threshold
        Passed to :func:`~mars_scale.annotate.annotate`.
    run_dir
        Where to save the model (default: not saved).

    Returns
    -------
    dict
        ``name_accuracy``: fraction of the held-out cells whose true type is an annotated type
        and whose predicted name equals it (cells called ``"novel"`` count as wrong);
        ``best_name_accuracy``: the same with each cluster's most probable annotated name,
        whether or not it is called novel (the paper's naming, without the novelty call);
        ``novel_types``: true types of the held-out experiment absent from the annotated
        experiments; ``per_type``: per true type, ``n_cells``, ``annotated`` (whether it is a
        known type), ``majority_cluster``, that cluster's ``label``, ``novelty`` and
        ``is_novel``, ``fraction_novel`` (of the type's cells called novel) and
        ``fraction_correct`` (called by their own name); ``clusters``: the per-cluster table;
        ``ari`` of the clusters; ``k``, ``seed``.
    """
    from mars_scale.annotate import annotate

    store = open_store(store_path)
    config = config or RunConfig()
    truth, n_types = _held_out_truth(store, unannotated)
    k = n_types if n_clusters == "truth" else n_clusters if n_clusters == "auto" else int(n_clusters)
    cfg = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    model = Mars(store, unannotated=unannotated, n_clusters=k, config=cfg).train()
    k = model.plan.n_clusters
    if run_dir is not None:
        model.save(run_dir, overwrite=True)
    result = annotate(store_path, model, key_added=key_added, overwrite=True, seed=seed,
                      novelty_threshold=novelty_threshold, device=cfg.train.device)
    naming = result.naming
    store = open_store(store_path)
    cluster_codes, cluster_cats = store.categorical_codes(f"{key_added}_cluster", *store.experiment_ranges[unannotated])
    clusters = np.asarray(cluster_cats, dtype=object)[cluster_codes].astype(int)
    predicted = np.asarray(naming.cell_type, dtype=object)
    annotated_types = set(model.annotated_landmarks[2])
    labelled = np.array([t is not None for t in truth])
    known = np.array([t is not None and t in annotated_types for t in truth])
    per_type = {}
    table = {int(r["cluster"]): r for r in result.cluster_table()}
    for t in sorted({t for t in truth if t is not None}):
        mine = np.array([x == t for x in truth])
        values, counts = np.unique(clusters[mine], return_counts=True)
        major = int(values[np.argmax(counts)])
        per_type[t] = {
            "n_cells": int(mine.sum()),
            "annotated": t in annotated_types,
            "majority_cluster": major,
            "majority_fraction": float(counts.max() / mine.sum()),
            "label": table[major]["name"],
            "novelty": table[major]["novelty"],
            "is_novel": table[major]["is_novel"],
            "fraction_novel": float(np.mean(predicted[mine] == naming.novel_label)),
            "fraction_correct": float(np.mean(predicted[mine] == t)),
        }
    accuracy = float(np.mean(predicted[known] == truth[known])) if known.any() else float("nan")
    best = np.asarray(naming.best_name, dtype=object)[np.searchsorted(naming.clusters, clusters)]
    best_accuracy = float(np.mean(best[known] == truth[known])) if known.any() else float("nan")
    return {
        "unannotated": unannotated,
        "k": k,
        "seed": seed,
        "name_accuracy": accuracy,
        "best_name_accuracy": best_accuracy,
        "n_scored": int(known.sum()),
        "novel_types": sorted({t for t in truth[labelled] if t not in annotated_types}),
        "ari": clustering_metrics(truth, clusters)["ari"],
        "per_type": per_type,
        "clusters": result.cluster_table(),
    }
