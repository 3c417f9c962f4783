"""Clustering metrics on label arrays: matched accuracy, macro precision/recall/F1, NMI, AMI, ARI.

All functions take two label arrays of the same length, ``y_true`` (ground truth) and ``y_pred``
(discovered clusters). Labels may be any hashable values (integers, strings, mixed objects):
they are only compared for equality, so cluster ids never need to match class names.

Missing ground truth
--------------------
A cell whose true label is missing (``None``, a float or numpy NaN, or ``pandas.NA``) carries no
information about the clustering and is dropped from *both* arrays before any metric is
computed; the metrics then describe the remaining, annotated cells only. Its predicted cluster
is still dropped with it, so such a cell neither helps nor hurts any score. A missing predicted
label, an empty input, or an input where every true label is missing is an
:class:`~mars_scale.errors.InputError`.

Matching
--------
Accuracy, precision, recall and F1 first match each true class to at most one predicted cluster
with the Hungarian algorithm (:func:`scipy.optimize.linear_sum_assignment` maximising the total
overlap of the contingency table). The number of predicted clusters may differ from the number
of classes: clusters left without a class (more clusters than classes) count as wrong for every
cell they hold, and classes left without a cluster (fewer clusters than classes) get precision,
recall and F1 of zero. NMI, AMI and ARI do not need a matching: they compare partitions.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as _skm

from mars_scale.errors import InputError

__all__ = [
    "hungarian_accuracy",
    "macro_precision_recall_f1",
    "nmi",
    "ami",
    "ari",
    "clustering_metrics",
]

logger = logging.getLogger(__name__)


def is_missing(value: Any) -> bool:
    """Return whether one label value counts as missing (None, NaN, pandas.NA)."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN is the only value unequal to itself
    except (TypeError, ValueError):  # pandas.NA: its truth value is ambiguous
        return True


def _missing_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of missing entries of a 1-D label array."""
    if labels.dtype.kind == "f":
        return np.isnan(labels)
    if labels.dtype.kind == "O":
        return np.fromiter((is_missing(v) for v in labels), dtype=bool, count=labels.size)
    return np.zeros(labels.shape, dtype=bool)


def _as_labels(values: Any) -> np.ndarray:
    """Convert labels to an array without turning a missing value into the string ``"nan"``."""
    if isinstance(values, np.ndarray):
        return values
    arr = np.asarray(values)
    if arr.dtype.kind in "US":  # a list mixing str and NaN/None is cast to str by numpy
        arr = np.asarray(values, dtype=object)
    return arr


def _encode(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Map labels to integer codes 0..n-1; return the codes and n."""
    try:
        uniques, codes = np.unique(labels, return_inverse=True)
        return codes.reshape(-1).astype(np.int64, copy=False), int(uniques.size)
    except TypeError:  # an object array mixing types that cannot be sorted
        mapping: dict[Any, int] = {}
        codes = np.fromiter(
            (mapping.setdefault(v, len(mapping)) for v in labels), dtype=np.int64, count=labels.size
        )
        return codes, len(mapping)


def _prepare(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Validate two label arrays, drop cells without a true label and encode both as codes."""
    t = _as_labels(y_true)
    p = _as_labels(y_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise InputError(
            f"y_true and y_pred must be 1-D label arrays (got {t.ndim}-D and {p.ndim}-D)."
        )
    if t.shape[0] != p.shape[0]:
        raise InputError(
            f"y_true and y_pred must have the same length (got {t.shape[0]} and {p.shape[0]})."
        )
    if t.shape[0] == 0:
        raise InputError("y_true and y_pred are empty, so no metric can be computed.")
    if _missing_mask(p).any():
        raise InputError("y_pred has missing labels (every cell needs a predicted cluster).")
    keep = ~_missing_mask(t)
    n_dropped = int(t.shape[0] - keep.sum())
    if n_dropped == t.shape[0]:
        raise InputError("y_true has no labels (all are missing), so no metric can be computed.")
    if n_dropped:
        logger.debug("ignoring %d of %d cells without a true label", n_dropped, t.shape[0])
        t = t[keep]
        p = p[keep]
    t_codes, n_true = _encode(t)
    p_codes, n_pred = _encode(p)
    return t_codes, p_codes, n_true, n_pred


def _contingency(t_codes: np.ndarray, p_codes: np.ndarray, n_true: int, n_pred: int) -> np.ndarray:
    """Dense contingency table: entry (i, j) counts cells of class i in cluster j."""
    flat = np.bincount(t_codes * n_pred + p_codes, minlength=n_true * n_pred)
    return flat.reshape(n_true, n_pred)


def _match(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of classes (rows) to clusters (columns) maximising the overlap."""
    return linear_sum_assignment(table, maximize=True)


def _accuracy_from_table(table: np.ndarray) -> float:
    rows, cols = _match(table)
    return float(table[rows, cols].sum() / table.sum())


def _prf_from_table(table: np.ndarray) -> tuple[float, float, float]:
    rows, cols = _match(table)
    n_true = table.shape[0]
    true_pos = np.zeros(n_true)
    predicted = np.zeros(n_true)  # cells predicted as each class: size of its matched cluster
    true_pos[rows] = table[rows, cols]
    predicted[rows] = table[:, cols].sum(axis=0)
    actual = table.sum(axis=1).astype(np.float64)  # > 0: every class occurs in y_true
    precision = np.divide(true_pos, predicted, out=np.zeros(n_true), where=predicted > 0)
    recall = true_pos / actual
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros(n_true), where=denom > 0)
    return float(precision.mean()), float(recall.mean()), float(f1.mean())


def hungarian_accuracy(y_true: Any, y_pred: Any) -> float:
    """Fraction of cells whose cluster is matched to their class by the Hungarian algorithm.

    Parameters
    ----------
    y_true
        True labels, one per cell (any hashable values; missing ones are ignored, see the module
        docstring).
    y_pred
        Predicted cluster labels, one per cell.

    Returns
    -------
    float
        ``sum_i C[i, m(i)] / n`` where ``C`` is the contingency table (classes by clusters),
        ``m`` the one-to-one matching of classes to clusters that maximises that sum, and ``n``
        the number of cells with a true label. Cells in unmatched clusters count as wrong.

    Raises
    ------
    InputError
        If the arrays are not 1-D, differ in length, are empty, ``y_pred`` has missing labels, or
        every true label is missing.
    """
    t, p, n_true, n_pred = _prepare(y_true, y_pred)
    return _accuracy_from_table(_contingency(t, p, n_true, n_pred))


def macro_precision_recall_f1(y_true: Any, y_pred: Any) -> tuple[float, float, float]:
    """Macro-averaged precision, recall and F1 after Hungarian matching of clusters to classes.

    Each true class ``c`` is matched to at most one cluster ``m(c)`` (as in
    :func:`hungarian_accuracy`); the cells of ``m(c)`` are the cells predicted as ``c``. Cells of
    clusters matched to no class are predicted as no class at all, so they are wrong.
    Per class: precision = ``C[c, m(c)] / |m(c)|``, recall = ``C[c, m(c)] / |c|`` and F1 their
    harmonic mean, each 0 where undefined (a class without a cluster). The three are averaged
    with equal weight over the classes present in ``y_true`` (macro average; F1 is the mean of
    the per-class F1 scores, not the F1 of the mean precision and recall).

    Parameters
    ----------
    y_true
        True labels, one per cell (missing ones are ignored).
    y_pred
        Predicted cluster labels, one per cell.

    Returns
    -------
    tuple of float
        ``(precision, recall, f1)``.

    Raises
    ------
    InputError
        As :func:`hungarian_accuracy`.
    """
    t, p, n_true, n_pred = _prepare(y_true, y_pred)
    return _prf_from_table(_contingency(t, p, n_true, n_pred))


def nmi(y_true: Any, y_pred: Any) -> float:
    """Normalised mutual information (arithmetic-mean normalisation, scikit-learn's default).

    Parameters
    ----------
    y_true
        True labels, one per cell (missing ones are ignored).
    y_pred
        Predicted cluster labels, one per cell.

    Returns
    -------
    float
        ``I(T; P) / ((H(T) + H(P)) / 2)``, in [0, 1].

    Raises
    ------
    InputError
        As :func:`hungarian_accuracy`.
    """
    t, p, _, _ = _prepare(y_true, y_pred)
    return float(_skm.normalized_mutual_info_score(t, p))


def ami(y_true: Any, y_pred: Any) -> float:
    """Adjusted mutual information (mutual information corrected for chance, arithmetic mean).

    Parameters
    ----------
    y_true
        True labels, one per cell (missing ones are ignored).
    y_pred
        Predicted cluster labels, one per cell.

    Returns
    -------
    float
        1 for identical partitions, about 0 for independent ones (may be negative).

    Raises
    ------
    InputError
        As :func:`hungarian_accuracy`.
    """
    t, p, _, _ = _prepare(y_true, y_pred)
    return float(_skm.adjusted_mutual_info_score(t, p))


def ari(y_true: Any, y_pred: Any) -> float:
    """Adjusted Rand index (pair counting, corrected for chance).

    Parameters
    ----------
    y_true
        True labels, one per cell (missing ones are ignored).
    y_pred
        Predicted cluster labels, one per cell.

    Returns
    -------
    float
        ``(S - E) / (M - E)`` with ``S = sum_ij C(n_ij, 2)``, ``A = sum_i C(a_i, 2)``,
        ``B = sum_j C(b_j, 2)``, ``E = A B / C(n, 2)`` and ``M = (A + B) / 2``; 1 for identical
        partitions, about 0 for independent ones (may be negative).

    Raises
    ------
    InputError
        As :func:`hungarian_accuracy`.
    """
    t, p, _, _ = _prepare(y_true, y_pred)
    return float(_skm.adjusted_rand_score(t, p))


def clustering_metrics(y_true: Any, y_pred: Any) -> dict[str, float]:
    """All clustering metrics of the evaluation at once (the labels are checked once).

    Parameters
    ----------
    y_true
        True labels, one per cell (missing ones are ignored, see the module docstring).
    y_pred
        Predicted cluster labels, one per cell.

    Returns
    -------
    dict
        ``accuracy``, ``precision``, ``recall``, ``f1`` (Hungarian-matched, macro-averaged),
        ``nmi``, ``ami`` and ``ari``, as Python floats.

    Raises
    ------
    InputError
        As :func:`hungarian_accuracy`.
    """
    t, p, n_true, n_pred = _prepare(y_true, y_pred)
    table = _contingency(t, p, n_true, n_pred)
    precision, recall, f1 = _prf_from_table(table)
    return {
        "accuracy": _accuracy_from_table(table),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "nmi": float(_skm.normalized_mutual_info_score(t, p)),
        "ami": float(_skm.adjusted_mutual_info_score(t, p)),
        "ari": float(_skm.adjusted_rand_score(t, p)),
    }
