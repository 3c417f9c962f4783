"""Clustering metrics against hand-computed cases (the derivations are in the comments)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mars_scale.errors import InputError
from mars_scale.metrics import (
    ami,
    ari,
    clustering_metrics,
    hungarian_accuracy,
    macro_precision_recall_f1,
    nmi,
)


def test_permuted_labelling_is_perfect():
    # Clusters 2, 0, 1 are a renaming of classes a, b, c: the matching a->2, b->0, c->1 covers
    # all 6 cells, so accuracy = 6/6 = 1, every class has precision = recall = 2/2 = 1, and the
    # partitions are identical, so NMI = AMI = ARI = 1.
    y_true = ["a", "a", "b", "b", "c", "c"]
    y_pred = [2, 2, 0, 0, 1, 1]
    got = clustering_metrics(y_true, y_pred)
    assert set(got) == {"accuracy", "precision", "recall", "f1", "nmi", "ami", "ari"}
    for key, value in got.items():
        assert value == pytest.approx(1.0), key
        assert isinstance(value, float)


def test_two_by_two_case_accuracy_prf_ari_nmi():
    # Contingency table (rows a, b; columns clusters 0, 1):
    #   a: [2, 1]   b: [1, 2]
    # Matching a->0, b->1 covers 2 + 2 = 4 cells (the other matching covers 1 + 1 = 2):
    # accuracy = 4/6.
    y_true = ["a", "a", "a", "b", "b", "b"]
    y_pred = [0, 0, 1, 1, 1, 0]
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # Precision: a -> cluster 0 of 3 cells, 2 right: 2/3; b -> cluster 1 of 3 cells: 2/3.
    # Recall: 2 of 3 a's, 2 of 3 b's: 2/3 each. F1 per class = 2/3. Macro: 2/3, 2/3, 2/3.
    precision, recall, f1 = macro_precision_recall_f1(y_true, y_pred)
    assert (precision, recall, f1) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # ARI by pair counting, n = 6, C(6,2) = 15:
    #   S = sum_ij C(n_ij,2) = C(2,2)+C(1,2)+C(1,2)+C(2,2) = 1+0+0+1 = 2
    #   A = C(3,2)+C(3,2) = 6 (rows), B = 6 (columns)
    #   E = A*B/15 = 2.4, M = (A+B)/2 = 6
    #   ARI = (2 - 2.4) / (6 - 2.4) = -0.4/3.6 = -1/9
    assert ari(y_true, y_pred) == pytest.approx(-1 / 9)
    # NMI: p_ij = [[2,1],[1,2]]/6, marginals 1/2 each, so H(T) = H(P) = ln 2 and
    #   I = 2*(2/6)*ln((2/6)/(1/4)) + 2*(1/6)*ln((1/6)/(1/4)) = (2/3) ln(4/3) + (1/3) ln(2/3)
    #   NMI = I / ((ln2 + ln2)/2) = I/ln 2 = 0.08170...
    mutual = (2 / 3) * math.log(4 / 3) + (1 / 3) * math.log(2 / 3)
    assert nmi(y_true, y_pred) == pytest.approx(mutual / math.log(2))


def test_more_clusters_than_classes_unmatched_cluster_is_wrong():
    # Contingency (rows a, b; columns 0, 1, 2): a: [2, 2, 0], b: [0, 0, 2].
    # Best matching: a->0 (or 1, same value), b->2: 2 + 2 = 4 cells, accuracy 4/6. The cluster left
    # over holds 2 a-cells, which count as wrong.
    y_true = ["a", "a", "a", "a", "b", "b"]
    y_pred = [0, 0, 1, 1, 2, 2]
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # Precision: a: 2/2 = 1 (its matched cluster is pure), b: 2/2 = 1 -> macro 1.
    # Recall:    a: 2/4 = 0.5, b: 2/2 = 1 -> macro 0.75.
    # F1:        a: 2*1*0.5/1.5 = 2/3, b: 1 -> macro (2/3 + 1)/2 = 5/6.
    assert macro_precision_recall_f1(y_true, y_pred) == pytest.approx((1.0, 0.75, 5 / 6))


def test_fewer_clusters_than_classes_unmatched_class_scores_zero():
    # Contingency (rows a, b, c; columns 0, 1): a: [2, 0], b: [2, 0], c: [0, 2].
    # Matching: one of a/b -> 0 (2 cells), c -> 1 (2 cells): accuracy 4/6. By symmetry say a.
    # Precision: a: 2/4 = 0.5, b: no cluster -> 0, c: 2/2 = 1 -> macro 1.5/3 = 0.5.
    # Recall:    a: 2/2 = 1,   b: 0,                c: 1     -> macro 2/3.
    # F1:        a: 2*0.5*1/1.5 = 2/3, b: 0, c: 1           -> macro (5/3)/3 = 5/9.
    y_true = ["a", "a", "b", "b", "c", "c"]
    y_pred = [0, 0, 0, 0, 1, 1]
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert macro_precision_recall_f1(y_true, y_pred) == pytest.approx((0.5, 2 / 3, 5 / 9))


def test_independent_partitions():
    # Contingency [[1, 1], [1, 1]], n = 4, C(4,2) = 6:
    #   S = 0, A = C(2,2)+C(2,2) = 2, B = 2, E = 2*2/6 = 2/3, M = 2
    #   ARI = (0 - 2/3)/(2 - 2/3) = -0.5
    # p_ij = 1/4 = p_i p_j everywhere, so I = 0 and NMI = 0. Accuracy: any matching covers 1+1 = 2
    # of 4 cells = 0.5.
    y_true = [0, 0, 1, 1]
    y_pred = ["x", "y", "x", "y"]
    assert ari(y_true, y_pred) == pytest.approx(-0.5)
    assert nmi(y_true, y_pred) == pytest.approx(0.0, abs=1e-12)
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(0.5)
    # AMI is corrected for chance: at most 0 here, since the observed MI (0) is minimal.
    assert ami(y_true, y_pred) <= 1e-12


def _reference_metrics(y_true: list, y_pred: list) -> dict[str, float | None]:
    """Every metric from its definition, by plain loops (no scipy, no scikit-learn).

    Accuracy: the best of all one-to-one matchings of classes to clusters, tried one by one.
    Precision, recall and F1 only when that best matching is unique (with ties the choice is
    arbitrary), else None. ARI by counting agreeing pairs of cells. NMI and AMI from entropies,
    with the expected mutual information of the hypergeometric model (arithmetic mean).
    """
    classes, clusters = sorted(set(y_true)), sorted(set(y_pred))
    n = len(y_true)
    table = [[sum(1 for t, p in zip(y_true, y_pred) if t == c and p == k) for k in clusters] for c in classes]
    a = [sum(row) for row in table]
    b = [sum(table[i][j] for i in range(len(classes))) for j in range(len(clusters))]
    # all injective maps of classes to clusters (or of clusters to classes, when fewer)
    if len(classes) <= len(clusters):
        pairings = [list(zip(range(len(classes)), cols)) for cols in itertools.permutations(range(len(clusters)), len(classes))]
    else:
        pairings = [list(zip(rows, range(len(clusters)))) for rows in itertools.permutations(range(len(classes)), len(clusters))]
    covered = [sum(table[i][j] for i, j in m) for m in pairings]
    best = [m for m, c in zip(pairings, covered) if c == max(covered)]
    out: dict[str, float | None] = {"accuracy": max(covered) / n, "precision": None, "recall": None, "f1": None}
    if len(best) == 1:
        precision, recall, f1 = [0.0] * len(classes), [0.0] * len(classes), [0.0] * len(classes)
        for i, j in best[0]:
            precision[i], recall[i] = table[i][j] / b[j], table[i][j] / a[i]
            if precision[i] + recall[i]:
                f1[i] = 2 * precision[i] * recall[i] / (precision[i] + recall[i])
        out.update(precision=sum(precision) / len(classes), recall=sum(recall) / len(classes), f1=sum(f1) / len(classes))
    agree = sum(1 for i in range(n) for j in range(i + 1, n) if (y_true[i] == y_true[j]) and (y_pred[i] == y_pred[j]))
    same_t = sum(1 for i in range(n) for j in range(i + 1, n) if y_true[i] == y_true[j])
    same_p = sum(1 for i in range(n) for j in range(i + 1, n) if y_pred[i] == y_pred[j])
    expected = same_t * same_p / math.comb(n, 2)
    out["ari"] = (agree - expected) / ((same_t + same_p) / 2 - expected)
    h_t = -sum(x / n * math.log(x / n) for x in a)
    h_p = -sum(x / n * math.log(x / n) for x in b)
    mi = sum(c / n * math.log(n * c / (a[i] * b[j])) for i, row in enumerate(table) for j, c in enumerate(row) if c)
    out["nmi"] = mi / ((h_t + h_p) / 2)
    emi = 0.0
    for ai in a:
        for bj in b:
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                log_p = (math.lgamma(ai + 1) + math.lgamma(bj + 1) + math.lgamma(n - ai + 1) + math.lgamma(n - bj + 1)
                         - math.lgamma(n + 1) - math.lgamma(nij + 1) - math.lgamma(ai - nij + 1)
                         - math.lgamma(bj - nij + 1) - math.lgamma(n - ai - bj + nij + 1))
                emi += nij / n * math.log(n * nij / (ai * bj)) * math.exp(log_p)
    out["ami"] = (mi - emi) / ((h_t + h_p) / 2 - emi)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_random_labellings_against_the_definitions(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 25))
    n_classes, n_clusters = int(rng.integers(2, 5)), int(rng.integers(2, 6))
    y_true = [f"t{v}" for v in rng.integers(0, n_classes, size=n)]
    y_pred = [int(v) for v in rng.integers(0, n_clusters, size=n)]
    if len(set(y_true)) < 2 or len(set(y_pred)) < 2:  # the NMI/AMI normalisers need two groups each
        y_true[:2], y_pred[:2] = ["t0", "t1"], [0, 1]
    ref = _reference_metrics(y_true, y_pred)
    got = clustering_metrics(y_true, y_pred)
    assert got["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(ref["accuracy"], abs=1e-12)
    if ref["precision"] is not None:
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1"]), abs=1e-12)
        assert macro_precision_recall_f1(y_true, y_pred) == pytest.approx(
            (ref["precision"], ref["recall"], ref["f1"]), abs=1e-12)
    for key, fn in (("ari", ari), ("nmi", nmi), ("ami", ami)):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
        assert fn(y_true, y_pred) == pytest.approx(ref[key], abs=1e-9), key


def test_missing_true_labels_are_ignored():
    # The cells with None and NaN are dropped together with their predictions (5 and 7); the
    # remaining 4 cells are a perfect renaming, so everything is 1.
    y_true = np.array(["a", "a", None, "b", "b", np.nan], dtype=object)
    y_pred = [0, 0, 5, 1, 1, 7]
    got = clustering_metrics(y_true, y_pred)
    assert got == pytest.approx(dict.fromkeys(got, 1.0))
    # A plain list with NaN must not turn NaN into the string "nan" (which would be a class).
    assert hungarian_accuracy(["a", "a", float("nan"), "b"], [0, 0, 3, 1]) == pytest.approx(1.0)
    # Float labels: NaN is missing.
    assert hungarian_accuracy(np.array([1.0, 1.0, np.nan, 2.0]), [0, 0, 1, 1]) == pytest.approx(1.0)


def test_dropping_missing_changes_the_denominator():
    # Without the missing cell: a:[2,0], b:[1,1] over clusters 0,1 -> matching a->0, b->1 covers
    # 2 + 1 = 3 of 4 annotated cells: 0.75 (the unannotated cell is not in the denominator).
    y_true = ["a", "a", "b", "b", None]
    y_pred = [0, 0, 0, 1, 1]
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(0.75)


def test_mixed_type_labels():
    # An object array mixing ints and strings cannot be sorted; labels are still compared by
    # equality: a perfect renaming.
    y_true = np.array([1, 1, "b", "b"], dtype=object)
    y_pred = np.array(["x", "x", 0, 0], dtype=object)
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(1.0)
    assert ari(y_true, y_pred) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "match"),
    [
        ([0, 1], [0], "same length"),
        ([], [], "empty"),
        ([None, None], [0, 1], "all are missing"),
        (["a", "b"], [0, None], "y_pred has missing"),
        (np.zeros((2, 2)), np.zeros((2, 2)), "1-D"),
    ],
)
def test_bad_input(y_true, y_pred, match):
    with pytest.raises(InputError, match=match):
        clustering_metrics(y_true, y_pred)
    with pytest.raises(ValueError, match=match):  # InputError is a ValueError
        hungarian_accuracy(y_true, y_pred)
