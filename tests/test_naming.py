"""Cluster naming and novelty on constructed embeddings with known answers."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from scipy.spatial.distance import pdist

import mars_scale.naming as naming
from mars_scale.errors import InputError
from mars_scale.naming import NamingResult, name_clusters


def _blobs(centers, n_per, sd, rng):
    """Gaussian clusters of n_per cells around each centre; cluster ids 10, 11, ..."""
    centers = np.asarray(centers, dtype=np.float64)
    x = np.vstack([rng.normal(c, sd, size=(n_per, centers.shape[1])) for c in centers])
    clusters = np.repeat(np.arange(10, 10 + centers.shape[0]), n_per)
    return x, clusters


LANDMARKS = np.array(
    [[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 10.0, 0.0]]
)
NAMES = ["B cell", "T cell", "NK cell", "monocyte"]


def test_clusters_at_landmarks_get_their_names():
    rng = np.random.default_rng(0)
    # Clusters at landmarks 2, 0, 3 (in that order), sd 0.5: the next landmark is 20 sd away.
    x, clusters = _blobs(LANDMARKS[[2, 0, 3]], 300, 0.5, rng)
    res = name_clusters(x, clusters, LANDMARKS, NAMES, rng=1)
    assert isinstance(res, NamingResult)
    assert res.clusters.tolist() == [10, 11, 12]
    assert res.best_name.tolist() == ["NK cell", "B cell", "monocyte"]
    assert res.label.tolist() == ["NK cell", "B cell", "monocyte"]
    np.testing.assert_allclose(res.best_probability, 1.0, atol=1e-9)
    np.testing.assert_allclose(res.name_probabilities.sum(axis=1), 1.0)
    assert res.top_names.shape == (3, 3)
    assert res.names.tolist() == sorted(NAMES)
    assert not res.is_novel.any()
    assert (res.novelty < 0.05).all()
    # Per cell: the cluster's name and probability.
    assert res.cell_type.tolist() == ["NK cell"] * 300 + ["B cell"] * 300 + ["monocyte"] * 300
    np.testing.assert_allclose(res.confidence, 1.0, atol=1e-9)
    assert res.cell_novelty.shape == (900,)
    assert ((res.cell_novelty >= 0) & (res.cell_novelty <= 1)).all()
    # A typical cell lies about one radius from its landmark: novelty about 1/(1 + 2^4) = 0.06.
    assert np.median(res.cell_novelty) < 0.15


def _kernel_reference(x, landmarks, names):
    """Name probabilities of a one-cluster embedding from the definition, independently of
    mars_scale: sigma = standard deviation of the pairwise cell distances, a Gaussian kernel
    exp(-d^2 / (2 sigma^2)) from the cluster mean to each landmark, summed per name."""
    sigma = float(np.std(pdist(x)))
    d2 = ((np.asarray(landmarks) - x.mean(axis=0)) ** 2).sum(axis=1)
    w = np.exp(-d2 / (2 * sigma**2))
    return sigma, {name: float(w[[i for i, n in enumerate(names) if n == name]].sum() / w.sum()) for name in names}


def test_two_landmark_1d_probability_by_hand():
    # Cells 0, 1, 2 in 1-D: mu = 1. Pairwise distances 1, 2, 1: mean 4/3,
    # variance ((1/3)^2 + (2/3)^2 + (1/3)^2)/3 = 2/9, so sigma^2 = 2/9.
    # Landmarks A at 1 and B at 1.5: squared distances 0 and 0.25, logits 0 and
    # -0.25 / (2 * 2/9) = -0.5625, so p(A) = 1 / (1 + exp(-0.5625)) = 0.637030...
    x = np.array([[0.0], [1.0], [2.0]])
    res = name_clusters(x, [0, 0, 0], [[1.0], [1.5]], ["A", "B"], rng=0)
    assert res.sigma[0] == pytest.approx(math.sqrt(2 / 9))
    expected = 1.0 / (1.0 + math.exp(-0.5625))
    sigma, reference = _kernel_reference(x, [[1.0], [1.5]], ["A", "B"])  # the same from the definition
    assert res.sigma[0] == pytest.approx(sigma) and reference["A"] == pytest.approx(expected)
    assert res.best_name[0] == "A"
    assert res.best_probability[0] == pytest.approx(expected)
    assert res.name_probabilities[0].tolist() == pytest.approx([expected, 1 - expected])
    assert res.top_names[0].tolist() == ["A", "B"]  # top=3 but only 2 names exist


def test_landmarks_sharing_a_name_are_summed():
    # Same cells (sigma^2 = 2/9) with A at 1 and two B landmarks at 1.5 (two experiments):
    # weights 1, e^-0.5625 = 0.569783, 0.569783, so p(A) = 1/(1 + 2 * 0.569783) = 0.467385 and
    # p(B) = 2 * 0.569783 / 2.139566 = 0.532615: B wins only through the sum (alone 0.363 < 0.637).
    x = np.array([[0.0], [1.0], [2.0]])
    res = name_clusters(x, [0, 0, 0], [[1.0], [1.5], [1.5]], ["A", "B", "B"], rng=0)
    w = math.exp(-0.5625)
    p_a, p_b = 1 / (1 + 2 * w), 2 * w / (1 + 2 * w)
    _, reference = _kernel_reference(x, [[1.0], [1.5], [1.5]], ["A", "B", "B"])
    assert (reference["A"], reference["B"]) == pytest.approx((p_a, p_b))
    # one B landmark alone loses to A: the name wins through the sum
    assert name_clusters(x, [0, 0, 0], [[1.0], [1.5]], ["A", "B"], rng=0).best_name[0] == "A"
    assert res.names.tolist() == ["A", "B"]
    assert res.name_probabilities[0].tolist() == pytest.approx([p_a, p_b])
    assert res.best_name[0] == "B"
    assert res.best_probability[0] == pytest.approx(p_b)


def test_shared_name_in_higher_dimensions():
    rng = np.random.default_rng(3)
    # Two "T cell" landmarks close together, one "B cell" far away: the cluster between the two
    # T landmarks is T with probability ~1, each T landmark contributing a part.
    landmarks = np.array([[0.0, 0.0], [0.4, 0.0], [20.0, 0.0]])
    x, clusters = _blobs([[0.2, 0.0]], 400, 0.5, rng)
    res = name_clusters(x, clusters, landmarks, ["T cell", "T cell", "B cell"], rng=0)
    assert res.best_name[0] == "T cell"
    assert res.best_probability[0] == pytest.approx(1.0, abs=1e-9)
    assert res.top_names[0].tolist() == ["T cell", "B cell"]


def test_far_cluster_is_novel_and_near_ones_are_not():
    rng = np.random.default_rng(4)
    # Known clusters sit 0.3 per axis (0.6) from B cell and T cell, 10 from the other names:
    # margin ratio about 0.06. The new cluster at (5, 5, 5, 8) is sqrt(139) = 11.79 from B cell
    # and from T cell, 12.7 from NK cell and monocyte: margin ratio 1, novel.
    centers = np.vstack([LANDMARKS[[0, 1]] + 0.3, [[5.0, 5.0, 5.0, 8.0]]])
    x, clusters = _blobs(centers, 500, 0.5, rng)
    res = name_clusters(x, clusters, LANDMARKS, NAMES, rng=0)
    assert res.is_novel.tolist() == [False, False, True]
    assert res.label.tolist() == ["B cell", "T cell", "novel"]
    assert res.novelty[2] > 0.8 and (res.novelty[:2] < 0.01).all()
    # Matched one to one; the new cluster is sqrt(139) from every name (separation 10), the
    # known ones 0.6 from theirs: evidence sqrt(139) / (0.6 * 10) and 0.6 / (1.5 * 0.6).
    assert res.matched.all()
    assert res.evidence[2] == pytest.approx(np.sqrt(139) / 6, rel=0.02)
    assert res.evidence[0] == pytest.approx(0.6 / 6, rel=0.1)
    margin = name_clusters(x, clusters, LANDMARKS, NAMES, novelty_method="margin", rng=0)
    assert margin.novelty_distance[2] == pytest.approx(1.0, abs=0.05)
    assert margin.novelty_distance[0] == pytest.approx(0.6 / np.sqrt(9.7**2 + 3 * 0.3**2), rel=0.1)
    cells_new = clusters == 12
    assert (res.cell_type[cells_new] == "novel").all()
    assert (res.cell_type[~cells_new] != "novel").all()
    assert np.median(res.cell_novelty[cells_new]) > 0.6
    assert np.median(res.cell_novelty[~cells_new]) < 0.01
    # A different label, and a threshold above every score.
    strict = name_clusters(x, clusters, LANDMARKS, NAMES, novelty_threshold=0.999,
                           novel_label="new type", rng=0)
    assert res.novelty[2] < 0.999
    assert not strict.is_novel.any()
    loose = name_clusters(x, clusters, LANDMARKS, NAMES, novel_label="new type", rng=0)
    assert loose.label[2] == "new type"


def test_margin_ratio_by_hand():
    # 1-D: landmarks A at 0, B at 10. A cluster of cells 3 and 5 has mu = 4: 4 from A and 6
    # from B, ratio 2/3, novelty (2/3)^8 / ((2/3)^8 + 0.8^8) = 0.1889.
    x = np.array([[3.0], [5.0]])
    res = name_clusters(x, [0, 0], [[0.0], [10.0]], ["A", "B"], novelty_method="margin", rng=0)
    assert res.novelty_distance[0] == pytest.approx(2 / 3)
    r = (2 / 3) ** 8
    assert res.novelty[0] == pytest.approx(r / (r + 0.8**8))
    # Per cell: 3/7 and 5/5 = 1.
    assert res.cell_novelty.tolist() == pytest.approx(
        [(3 / 7) ** 8 / ((3 / 7) ** 8 + 0.8**8), 1 / (1 + 0.8**8)]
    )
    # Two landmarks of one name at 0 and 10 and a third name far away: the margin is taken
    # against the other name only.
    res = name_clusters(x, [0, 0], [[0.0], [10.0], [40.0]], ["A", "A", "C"], novelty_method="margin", rng=0)
    assert res.novelty_distance[0] == pytest.approx(4 / 36)


def test_novelty_formula_by_hand_with_landmark_radius():
    # Cluster cells at -1 and +1 in 1-D: mu = 0, radius r = 1 (RMS distance to mu).
    # Landmark at 3. Without R: z = 3 / 1 = 3, novelty = 3^4 / (3^4 + 2^4) = 81/97 = 0.83505.
    # (Two cells give one pairwise distance, so sigma = 0: the name is the nearest landmark's.)
    x = np.array([[-1.0], [1.0]])
    res = name_clusters(x, [0, 0], [[3.0]], ["A"], novelty_method="margin", rng=0)
    assert res.radius[0] == pytest.approx(1.0)
    assert res.novelty_distance[0] == pytest.approx(3.0)
    assert res.novelty[0] == pytest.approx(81 / 97)
    # Cells at -1, 1: 4 and 2 from the landmark, z = 4 and 2, novelty 256/272 and 16/32 = 0.5.
    assert res.cell_novelty.tolist() == pytest.approx([256 / 272, 0.5])
    # With R = 1: s = sqrt((1 + 1)/2) = 1, the same. With R = 7: s = sqrt((1 + 49)/2) = 5,
    # z = 0.6, novelty = 0.1296 / (0.1296 + 16) = 0.0080347: a loose class absorbs the cluster.
    same = name_clusters(x, [0, 0], [[3.0]], ["A"], landmark_radius=[1.0], novelty_method="margin", rng=0)
    assert same.novelty[0] == pytest.approx(81 / 97)
    loose = name_clusters(x, [0, 0], [[3.0]], ["A"], landmark_radius=[7.0], novelty_method="margin", rng=0)
    assert loose.novelty_distance[0] == pytest.approx(0.6)
    assert loose.novelty[0] == pytest.approx(0.1296 / 16.1296)
    # Per cell with R = 7: distances 4 and 2 over s = 5 -> z = 0.8, 0.4.
    assert loose.cell_novelty.tolist() == pytest.approx(
        [0.8**4 / (0.8**4 + 16), 0.4**4 / (0.4**4 + 16)]
    )


def test_scale_free():
    rng = np.random.default_rng(5)
    centers = np.vstack([LANDMARKS[[0, 1]], [[0.0, 0.0, 0.0, 6.0]]])
    x, clusters = _blobs(centers, 200, 0.5, rng)
    a = name_clusters(x, clusters, LANDMARKS, NAMES, rng=0)
    b = name_clusters(x * 1000.0 + 7.0, clusters, LANDMARKS * 1000.0 + 7.0, NAMES, rng=0)
    np.testing.assert_allclose(a.novelty, b.novelty, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(a.cell_novelty, b.cell_novelty, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(a.name_probabilities, b.name_probabilities, rtol=1e-6, atol=1e-12)


# Two close sibling types (CD4 and CD8 T cells, 2 apart) and a far one (monocyte), and a new
# experiment whose every cluster sits 3 units off its type along a shared direction (a
# condition effect larger than the gap between the siblings).
SIBLINGS = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 12.0, 0.0]])
SIBLING_NAMES = ["CD4 T", "CD8 T", "monocyte"]
OFFSET = np.array([0.0, 0.0, 3.0])


def test_matching_keeps_shifted_siblings_known_where_the_margin_calls_them_new():
    rng = np.random.default_rng(11)
    x, clusters = _blobs(SIBLINGS + OFFSET, 300, 0.3, rng)
    res = name_clusters(x, clusters, SIBLINGS, SIBLING_NAMES, rng=0)
    assert res.label.tolist() == SIBLING_NAMES
    assert not res.is_novel.any() and res.matched.all()
    assert (res.cell_type == np.repeat(SIBLING_NAMES, 300)).all()
    # Each sits 3 from its own name, about 3.6 from the sibling: the margin ratio is near 1.
    margin = name_clusters(x, clusters, SIBLINGS, SIBLING_NAMES, novelty_method="margin", rng=0)
    assert margin.is_novel[:2].all()


def test_matching_flags_a_removed_sibling():
    # The reference lacks CD8 T: its cluster is left unmatched beside the CD4 T cluster, and the
    # two are separate populations (gap 2, spread 0.3: d' about 4.7), so it is new.
    rng = np.random.default_rng(12)
    x, clusters = _blobs(SIBLINGS + OFFSET, 300, 0.3, rng)
    reference = SIBLINGS[[0, 2]]
    res = name_clusters(x, clusters, reference, ["CD4 T", "monocyte"], rng=0)
    assert res.matched.tolist() == [True, False, True]
    assert res.split_of[1] == 0
    assert res.distinctness[1] == pytest.approx(2 / np.sqrt(2 * 0.09), rel=0.1)
    assert res.label.tolist() == ["CD4 T", "novel", "monocyte"]
    assert res.describe(1).startswith("novel, closest to CD4 T")
    # The margin method names it CD4 T.
    margin = name_clusters(x, clusters, reference, ["CD4 T", "monocyte"], novelty_method="margin", rng=0)
    assert margin.label[1] == "CD4 T"


def test_a_new_type_matched_by_elimination_is_new():
    # The experiment's two subtypes A and A_b fall into one cluster M, which takes A; the new type
    # C gets the left-over name A_b. The other clusters sit 2 from their names, so the median
    # matched distance (2) hides C (2.5 from A_b, evidence 2.5 / 3 < 1), but M lies 0.54 from
    # A_b: C is matched by elimination and 2.5 > 2 x 0.54, so it is new.
    names = ["A", "A_b", "B", "D", "E"]
    reference = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    centers = np.array([[0.5, 0.2], [10.0, 2.0], [0.0, 12.0], [10.0, 12.0], [3.0, -1.5]])
    rng = np.random.default_rng(14)
    x, clusters = _blobs(centers, 200, 0.05, rng)
    res = name_clusters(x, clusters, reference, names, rng=0)
    assert res.matched.all()
    assert res.compared_name[4] == "A_b"
    assert res.evidence[4] == pytest.approx(np.hypot(2.0, 1.5) / (2 * np.hypot(0.5, 0.2)), rel=0.02)
    assert res.label.tolist() == ["A", "B", "D", "E", "novel"]
    # C nearer to A_b than M is (here 0.4 against 0.54): the usual rule, known.
    centers[4] = [1.3, -0.3]
    x, clusters = _blobs(centers, 200, 0.05, rng)
    res = name_clusters(x, clusters, reference, names, rng=0)
    assert res.label.tolist() == ["A", "B", "D", "E", "A_b"]


def test_a_type_cut_in_two_keeps_its_name():
    # One Gaussian cut at its mean along the first axis (too many landmarks): d' = 1.87.
    rng = np.random.default_rng(13)
    x = rng.normal(0.0, 1.0, size=(4000, 3)) + np.array([0.0, 0.0, 4.0])
    clusters = (x[:, 0] > 0).astype(int)
    res = name_clusters(x, clusters, [[0.0, 0.0, 0.0], [0.0, 20.0, 0.0]], ["A", "B"], rng=0)
    assert res.matched.sum() == 1
    j = int(np.flatnonzero(~res.matched)[0])
    # halves of N(0, 1): means +-sqrt(2/pi), variances 1 - 2/pi
    expected = 2 * np.sqrt(2 / np.pi) / np.sqrt(2 * (1 - 2 / np.pi))
    assert res.distinctness[j] == pytest.approx(expected, rel=0.05)
    assert res.label.tolist() == ["A", "A"] and not res.is_novel.any()


def test_parts_pulled_apart_but_close_compared_with_the_offset_keep_their_name():
    # A type whose held-out cells sit 10 from its prototype (an experiment offset), cut in two
    # parts 2 apart with spread 0.3 each (d' about 4.7: two populations by d'), but the gap is
    # 2 / sqrt(10^2 + ...) ~ 0.2 of the holder's reach: a part of the type.
    rng = np.random.default_rng(15)
    offset = np.array([0.0, 0.0, 10.0])
    centers = np.vstack([SIBLINGS[[0, 2]] + offset, SIBLINGS[[0]] + offset + [0.0, 2.0, 0.0]])
    x, clusters = _blobs(centers, 200, 0.3, rng)
    res = name_clusters(x, clusters, SIBLINGS[[0, 2]], ["CD4 T", "monocyte"], rng=0)
    assert res.matched.tolist() == [True, True, False]
    assert res.distinctness[2] > 2.5
    assert res.label.tolist() == ["CD4 T", "monocyte", "CD4 T"] and not res.is_novel.any()
    # reach and gap from the cells themselves (not from the result's centres and radii)
    holder, part = x[clusters == 10], x[clusters == 12]
    radius = np.sqrt(((holder - holder.mean(axis=0)) ** 2).sum(axis=1).mean())
    reach = np.sqrt(np.sum((holder.mean(axis=0) - SIBLINGS[0]) ** 2) + radius**2)
    gap = np.linalg.norm(part.mean(axis=0) - holder.mean(axis=0))
    assert res.evidence[2] == pytest.approx(min(res.distinctness[2] / 2.5, gap / reach / 0.5))


def test_matching_by_hand_in_one_dimension():
    # One name A at 0. Cluster 0 = cells 0 and 2 (matched, A); cluster 1 = cells 5 and 7.
    # Projected on the line joining the means: means 1 and 6, variances 1 and 1, so
    # d' = 5 / sqrt(2), evidence d' / 2.5 = sqrt(2), novelty 1 / (1 + sqrt(2)^-8) = 16/17.
    x = np.array([[0.0], [2.0], [5.0], [7.0]])
    res = name_clusters(x, [0, 0, 1, 1], [[0.0]], ["A"], rng=0)
    assert res.matched.tolist() == [True, False]
    assert res.distinctness[1] == pytest.approx(5 / np.sqrt(2))
    assert res.novelty[1] == pytest.approx(16 / 17)
    assert res.novelty[0] == pytest.approx(0.0, abs=1e-12)  # one name: a matched cluster is known
    assert res.label.tolist() == ["A", "novel"]
    # Per cell in cluster 1: RMS distance to A is sqrt(6^2 + 1) = sqrt(37); odds 16 (d / sqrt 37)^4.
    odds = 16 * np.array([5.0, 7.0]) ** 4 / 37**2
    np.testing.assert_allclose(res.cell_novelty[2:], odds / (1 + odds), rtol=1e-9)
    np.testing.assert_allclose(res.cell_novelty[:2], 0.0, atol=1e-9)
    # Confidence: the novelty of a novel cell, P(A) (1 - novelty) of a known one.
    np.testing.assert_allclose(res.confidence[2:], res.cell_novelty[2:])
    np.testing.assert_allclose(res.confidence[:2], 1.0, atol=1e-9)
    np.testing.assert_allclose(res.cell_name_probabilities, 1.0)
    assert res.cell_closest.tolist() == ["A"] * 4
    assert res.cell_is_novel.tolist() == [False, False, True, True]


def test_cell_name_probabilities_match_the_cluster_kernel_at_the_center():
    rng = np.random.default_rng(14)
    x, clusters = _blobs(LANDMARKS[[0, 1]] + 0.3, 200, 1.5, rng)
    res = name_clusters(x, clusters, LANDMARKS, NAMES, rng=0)
    probs = res.cell_name_probabilities
    assert probs.shape == (400, 4) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # An independent dense evaluation of the kernel for one cell of a known cluster, moved with
    # its cluster onto the prototype of the cluster's name.
    i = 17
    assert not res.is_novel[0]
    sigma = res.sigma[0]
    prototype = res.prototypes[list(res.names).index(res.label[0])]
    moved = x[i] - x[clusters == clusters[i]].mean(axis=0) + prototype
    w = np.exp(-((LANDMARKS - moved) ** 2).sum(1) / (2 * sigma**2))
    np.testing.assert_allclose(probs[i], w / w.sum(), rtol=1e-5, atol=1e-7)
    assert set(res.cell_closest.tolist()) <= set(NAMES)


def test_a_cluster_matched_to_a_name_is_scored_on_that_name_not_where_the_offset_put_it():
    # Names A at 0 and B at 1 (close), C far. Cluster 0 sits at 0.55, nearer B's landmark; cluster
    # 1 at 1.3 takes B (the matching: 0.55 + 0.3 < 0.45 + 1.3), so cluster 0 is A. Read where it
    # lies, the kernel would give cluster 0's cells to B; moved onto A's prototype, to A.
    rng = np.random.default_rng(3)
    landmarks = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    x = np.concatenate([[0.55, 0.0] + 0.03 * rng.standard_normal((100, 2)),
                        [1.3, 0.0] + 0.03 * rng.standard_normal((100, 2))])
    clusters = np.repeat([0, 1], 100)
    res = name_clusters(x, clusters, landmarks, ["A", "B", "C"], rng=0)
    assert res.label.tolist() == ["A", "B"] and not res.is_novel.any()
    a = list(res.names).index("A")
    assert res.name_probabilities[0, a] > 0.99 and res.best_name[0] == "A"
    assert res.describe(0).startswith("A (1.00")
    assert np.all(res.cell_name_probabilities[:100, a] > 0.9)
    assert res.cell_closest[:100].tolist() == ["A"] * 100
    np.testing.assert_allclose(res.confidence[:100],
                               res.cell_name_probabilities[:100, a] * (1 - res.cell_novelty[:100]), rtol=1e-5)
    assert np.all(res.confidence[:100] > 0.5)
    # the independent kernel at the moved cell
    moved = x[5] - x[:100].mean(axis=0) + landmarks[0]
    w = np.exp(-((landmarks - moved) ** 2).sum(1) / (2 * res.sigma[0] ** 2))
    np.testing.assert_allclose(res.cell_name_probabilities[5], w / w.sum(), rtol=1e-5, atol=1e-7)


def test_landmark_weights_set_the_prototype():
    # Two landmarks of A at 0 and 4 with 3:1 cells: the prototype is at 1.
    res = name_clusters(np.array([[1.0], [1.2]]), [0, 0], [[0.0], [4.0], [30.0]], ["A", "A", "B"],
                        landmark_weights=[3, 1, 5], rng=0)
    np.testing.assert_allclose(res.prototypes[:, 0], [1.0, 30.0])
    assert res.novelty_distance[0] == pytest.approx(0.1)


def test_sigma_is_exact_when_the_sample_covers_the_cluster():
    rng = np.random.default_rng(6)
    x, clusters = _blobs([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]], 150, 1.0, rng)
    res = name_clusters(x, clusters, LANDMARKS, NAMES, max_cells_per_cluster=150, rng=0)
    assert res.n_sampled.tolist() == [150, 150]
    for j in range(2):
        assert res.sigma[j] == pytest.approx(np.std(pdist(x[clusters == 10 + j])), rel=1e-12)


def test_sigma_sample_is_bounded_for_a_huge_cluster(monkeypatch):
    rng = np.random.default_rng(7)
    n_big = 100_000
    x = np.vstack([rng.normal(0.0, 1.0, size=(n_big, 2)), rng.normal(10.0, 1.0, size=(50, 2))])
    clusters = np.concatenate([np.zeros(n_big, dtype=int), np.ones(50, dtype=int)])
    sizes = []
    real_pdist = naming.pdist

    def recording_pdist(points, *args, **kwargs):
        sizes.append(points.shape[0])
        return real_pdist(points, *args, **kwargs)

    monkeypatch.setattr(naming, "pdist", recording_pdist)
    res = name_clusters(
        x, clusters, [[0.0, 0.0], [10.0, 10.0]], ["A", "B"], max_cells_per_cluster=500, rng=0
    )
    assert sizes == [500, 50]
    assert res.n_sampled.tolist() == [500, 50]
    assert res.n_cells.tolist() == [n_big, 50]
    # For an isotropic 2-D Gaussian with sd 1, the distance between two cells is Rayleigh with
    # scale sqrt(2), whose standard deviation is sqrt(2) * sqrt((4 - pi)/2) = sqrt(4 - pi) = 0.9265.
    assert res.sigma[0] == pytest.approx(math.sqrt(4 - math.pi), abs=0.06)
    # Means and radii still use every cell.
    np.testing.assert_allclose(res.centers[0], x[:n_big].mean(axis=0))


def test_exact_means_and_radius_over_blocks_and_memmap(tmp_path):
    rng = np.random.default_rng(8)
    x, clusters = _blobs(LANDMARKS[:3] + 1000.0, 97, 0.7, rng)
    order = rng.permutation(x.shape[0])  # clusters interleaved across blocks
    x, clusters = x[order], clusters[order]
    path = tmp_path / "emb.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=x.shape)
    mm[:] = x
    mm.flush()
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    res = name_clusters(mm, clusters, LANDMARKS[:3] + 1000.0, NAMES[:3], block_size=10, rng=0)
    xf = np.asarray(mm, dtype=np.float64)
    for j in range(3):
        cells = xf[clusters == 10 + j]
        mu = cells.mean(axis=0)
        np.testing.assert_allclose(res.centers[j], mu, rtol=0, atol=1e-9)
        rms = np.sqrt(((cells - mu) ** 2).sum(axis=1).mean())
        assert res.radius[j] == pytest.approx(rms, rel=1e-7)
    whole = name_clusters(xf, clusters, LANDMARKS[:3] + 1000.0, NAMES[:3], rng=0)
    np.testing.assert_allclose(res.cell_novelty, whole.cell_novelty, rtol=1e-6, atol=1e-9)
    assert res.best_name.tolist() == ["B cell", "T cell", "NK cell"]


def test_reproducible_with_seed_and_string_cluster_ids():
    rng = np.random.default_rng(9)
    x, clusters = _blobs(LANDMARKS[[0, 1]], 3000, 0.5, rng)
    ids = np.where(clusters == 10, "c1", "c0")
    a = name_clusters(x, ids, LANDMARKS, NAMES, max_cells_per_cluster=100, rng=42)
    b = name_clusters(x, ids, LANDMARKS, NAMES, max_cells_per_cluster=100,
                      rng=np.random.default_rng(42))
    np.testing.assert_array_equal(a.sigma, b.sigma)
    c = name_clusters(x, ids, LANDMARKS, NAMES, max_cells_per_cluster=100, rng=43)
    assert not np.array_equal(a.sigma, c.sigma)
    assert a.clusters.tolist() == ["c0", "c1"]
    assert a.best_name.tolist() == ["T cell", "B cell"]


def test_single_cell_cluster_takes_nearest_name(caplog):
    x = np.array([[0.1, 0.0], [9.0, 0.0], [9.5, 0.0], [10.5, 0.0]])
    with caplog.at_level(logging.WARNING, logger="mars_scale.naming"):
        res = name_clusters(x, [1, 2, 2, 2], [[0.0, 0.0], [10.0, 0.0]], ["A", "B"], rng=0)
    assert "kernel width sigma of 0" in caplog.text
    assert res.sigma[0] == 0.0
    assert res.best_name.tolist() == ["A", "B"]
    assert res.best_probability[0] == 1.0
    # Matched to A, 0.1 from it: clearly A.
    assert res.novelty_distance[0] == pytest.approx(0.1) and not res.is_novel[0]


def test_to_records_are_plain_python():
    rng = np.random.default_rng(10)
    x, clusters = _blobs(LANDMARKS[[0, 1]], 100, 0.5, rng)
    res = name_clusters(x, clusters.astype(np.int32), LANDMARKS, NAMES, top=2, rng=0)
    records = res.to_records()
    assert len(records) == 2
    rec = records[1]
    assert rec["cluster"] == 11 and type(rec["cluster"]) is int
    assert rec["label"] == "T cell" and rec["best_name"] == "T cell"
    assert rec["top_names"][0] == "T cell" and len(rec["top_names"]) == 2
    assert all(type(v) is float for v in rec["top_probabilities"])
    assert type(rec["is_novel"]) is bool
    json.dumps(records)  # only plain types
    # The result is read-only.
    with pytest.raises(ValueError):
        res.novelty[0] = 1.0
    with pytest.raises(AttributeError):
        res.space = "umap"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"space": "tsne"}, "space must be"),
        ({"top": 0}, "top must be"),
        ({"max_cells_per_cluster": 1}, "max_cells_per_cluster must be"),
        ({"novelty_threshold": 1.0}, "novelty_threshold must"),
        ({"landmark_names": ["A", "B", "C"]}, "one name per landmark"),
        ({"landmark_names": ["A", None, "C", "D"]}, "missing values"),
        ({"landmark_names": ["A", "novel", "C", "D"]}, "novel_label"),
        ({"landmarks": np.zeros((4, 3))}, "4 columns"),
        ({"clusters": np.zeros(5)}, "one entry per embedding row"),
        ({"landmark_radius": [1.0, 1.0, 1.0, -1.0]}, "non-negative"),
        ({"landmark_radius": [1.0] * 4, "space": "umap"}, "cannot be used with space='umap'"),
        ({"space": "umap", "umap_n_neighbors": 50}, "umap_n_neighbors"),
    ],
)
def test_bad_input(kwargs, match):
    x = np.zeros((20, 4))
    args = {"clusters": np.zeros(20, dtype=int), "landmarks": LANDMARKS, "landmark_names": NAMES}
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(InputError, match=match):
        name_clusters(
            x, args["clusters"], args["landmarks"], args["landmark_names"], rng=0, **kwargs
        )


def test_non_finite_embedding():
    x = np.zeros((5, 4))
    x[3, 1] = np.nan
    with pytest.raises(InputError, match="non-finite values in rows"):
        name_clusters(x, np.zeros(5, dtype=int), LANDMARKS, NAMES, rng=0)


@pytest.mark.slow  # about 30 s, mostly numba compilation in umap-learn
def test_umap_space():
    pytest.importorskip("umap")
    rng = np.random.default_rng(11)
    landmarks = LANDMARKS[:3] * 3.0
    centers = np.vstack([landmarks[[0, 1]], [[0.0, 0.0, 0.0, 30.0]]])
    x, clusters = _blobs(centers, 150, 0.5, rng)
    # Fit on 200 random cells (+ 3 landmarks); the other 250 go through transform in blocks.
    res = name_clusters(
        x, clusters, landmarks, NAMES[:3], space="umap", umap_max_cells=200, block_size=100, rng=0
    )
    assert res.space == "umap"
    assert res.centers.shape == (3, 10)
    assert res.best_name[:2].tolist() == ["B cell", "T cell"]
    assert (res.best_probability[:2] > 0.9).all()
    assert res.cell_novelty.shape == (450,)
