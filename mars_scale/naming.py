"""Name discovered clusters after annotated landmarks, and flag clusters that are new cell types.

This module is numpy in, numpy out: it knows nothing of stores or torch. ``annotate`` calls
:func:`name_clusters` with the embedding of the unannotated cells, their clusters and the
annotated landmarks, and writes the result into the store.

Naming (the paper's Methods, "Cell-type naming")
------------------------------------------------
For each discovered cluster ``j`` with mean embedding ``mu_j``, every annotated landmark ``p_k``
(over all annotated experiments together) gets the probability::

    p_{k|j} = exp(-||p_k - mu_j||^2 / (2 sigma_j^2))
              / sum_k' exp(-||p_k' - mu_j||^2 / (2 sigma_j^2))

where ``sigma_j`` is the standard deviation of the pairwise Euclidean distances among the
cluster's cells. Landmarks of different experiments that carry the same name add up: the
probability of a name is the sum over its landmarks. The cluster takes the most probable name.

Novelty (beyond the paper): matching the discovered clusters to the known types
--------------------------------------------------------------------------------
A known type of the new experiment need not sit *on* its landmarks: the new experiment keeps a
batch or condition offset that can be larger than the distance between two related types
(measured on real data, see docs/algorithm.md). So no absolute or ratio threshold on one
cluster's distances separates "known, shifted" from "new, near a sibling". What does separate
them is the structure of the whole experiment: every known type is claimed by at most one
discovered cluster, the one closest to it.

1. Each annotated name ``n`` gets a prototype ``P_n``, the mean of its landmarks weighted by
   their annotated cells (``landmark_weights``), and a separation ``s_n``, the distance to the
   nearest other prototype (infinite with a single name).
2. Clusters and names are matched one to one, minimising the summed distance
   ``||mu_j - P_n||`` (the Hungarian algorithm; with more clusters than names some clusters
   stay unmatched, with fewer some names stay unused).
3. A **matched** cluster is new only if it is far from its name both against the types'
   geometry and against the experiment's own offset::

       e_j = min( d_j / (0.6 s_n),  d_j / (1.5 median_{matched} d) )       (d_j = ||mu_j - P_n||)

   (the second term only with at least two matched clusters). A new type matched to a name
   that the experiment does not hold lies further from it than the known clusters lie from
   theirs. A cluster matched *by elimination*, to a name that another cluster ``o`` lies nearer
   (``o`` took a close sibling's name, as when the experiment's two subtypes fall into one
   cluster), is also new when ``d_j > 2 ||mu_o - P_n||``: ``e_j = max(e_j, d_j / (2 d_o))``.
4. An **unmatched** cluster's nearest name is held by another cluster ``o``. Either the two are
   one type cut in two (more landmarks than types) or the unmatched one is a type the
   reference lacks. It is a part of ``o``'s type (known, with that name) if either

   - the two are not two populations: their separation along the line joining their means,
     ``d'_j = |m_j - m_o| / sqrt(v_j + v_o)`` (means and variances of the cells projected on
     that line), is below 2.5 (one Gaussian cut in half gives ``d' = 1.87``); or
   - their means are closer than half of ``o``'s reach, the root-mean-square distance of
     ``o``'s cells to the name's prototype: ``g_j = ||mu_j - mu_o|| / sqrt(d_o^2 + r_o^2) <
     0.5``. Fine-tuning pulls the parts of a type cut in two apart (``d'`` of 2.5 to 7 on real
     data with two landmarks too many), but they stay near each other compared with how far
     the experiment sits from the reference.

   The evidence is ``e_j = min(d'_j / 2.5, g_j / 0.5)``.
5. ``novelty_j = e_j^8 / (e_j^8 + 1)`` (0.5 at ``e_j = 1``); the cluster is novel when
   ``novelty_j >= novelty_threshold``.

With a single annotated name step 3 is off (the name has no separation), so the matched cluster
is known and every other cluster is judged by step 4. Nothing here depends on the number
of annotated experiments: the scale comes from the new experiment itself.

``novelty_method="margin"`` keeps the earlier score for comparison: the ratio of the distance
to the nearest landmark over the distance to the nearest landmark of another name, ``m_j``, with
``novelty_j = m_j^8 / (m_j^8 + 0.8^8)``; with a single name, the distance to the nearest
landmark in radii ``s_jk = sqrt((r_j^2 + R_k^2) / 2)`` with ``novelty_j = z^4 / (z^4 + 2^4)``.

Per cell
--------
- ``cell_name_probabilities``: the paper's kernel evaluated at the cell, with its cluster's
  ``sigma_j``, summed per name. A known cluster (matching) is read moved onto the prototype of
  its name, cells and all (by ``P_n - mu_j``): the matching has said which type it is, wherever
  the experiment's offset put it, and the kernel then says how each cell sits between that type
  and its siblings. The cluster's own name probabilities are the kernel at ``P_n``. A novel
  cluster is read where it lies (its closest known names).
- ``cell_novelty``: the cluster's novelty moved by how far the cell sits from the name its
  cluster was compared with, against the cluster's root-mean-square distance ``D_j`` to it::

      odds_i = odds(novelty_j) * (d_i / D_j)^4

  so a cell at the cluster's typical distance keeps the cluster's value, a cell further out is
  more likely new. (margin method: the score of the cell's own position.)
- ``confidence``: how sure the cell's label is: ``P(label | cell) * (1 - cell_novelty)`` for a
  known label, ``cell_novelty`` for the novel label.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from scipy import sparse
from scipy.spatial.distance import cdist, pdist
from scipy.special import logsumexp

from mars_scale.errors import InputError
from mars_scale.metrics import is_missing

__all__ = ["NamingResult", "name_clusters"]

logger = logging.getLogger(__name__)

_NOVELTY_HALF = 2.0  # distance in radii where the novelty score is 0.5
_NOVELTY_POWER = 4.0  # steepness of the Hill transform
_MARGIN_HALF = 0.8  # margin ratio where the novelty score is 0.5
_MARGIN_POWER = 8.0
_MATCH_RATIO = 0.6  # a matched cluster beyond this share of its name's separation ...
_MATCH_SPREAD = 1.5  # ... and beyond this multiple of the median matched distance is new
_ELIMINATION = 2.0  # a cluster matched to a name that another cluster lies nearer is new beyond this ratio
_SPLIT_DPRIME = 2.5  # two clusters at least this separated (d') are two populations ...
_SPLIT_GAP = 0.5  # ... unless their means are closer than this share of the owner's reach
_EVIDENCE_POWER = 8.0
_CELL_POWER = 4.0
_UMAP_COMPONENTS = 10  # the paper's ten UMAP components
_BLOCK_ELEMENTS = 1 << 22  # cells x landmarks entries per block in the per-cell pass (32 MiB)


@dataclasses.dataclass(frozen=True, eq=False)
class NamingResult:
    """Names, probabilities and novelty of discovered clusters, per cluster and per cell.

    Arrays are read-only. Per-cluster arrays are aligned with :attr:`clusters` (sorted cluster ids).
    Per-cell arrays are aligned with the rows of the embedding.

    Attributes
    ----------
    clusters
        ``(J,)`` cluster ids, sorted.
    n_cells
        ``(J,)`` cells per cluster.
    n_sampled
        ``(J,)`` cells used to estimate ``sigma`` (at most ``max_cells_per_cluster``).
    centers
        ``(J, D)`` cluster means ``mu_j`` in the naming space.
    sigma
        ``(J,)`` standard deviation of pairwise distances within the sampled cells (kernel width).
    radius
        ``(J,)`` root-mean-square distance of the cluster's cells to ``mu_j`` (all cells).
    names
        ``(N,)`` the distinct annotated names, sorted.
    name_probabilities
        ``(J, N)`` probability of each name (sum over its landmarks); rows sum to 1.
    top_names, top_probabilities
        ``(J, T)`` the ``T = min(top, N)`` most probable names and their probabilities.
    best_name, best_probability
        ``(J,)`` the most probable annotated name and its probability.
    novelty_distance
        ``(J,)`` matching: distance from ``mu_j`` to the prototype of the name it was compared
        with (:attr:`compared_name`); margin: the margin ratio ``m_j`` (several names) or the
        distance in radii ``z_j`` (one name).
    nearest_landmark
        ``(J,)`` index of the landmark nearest to ``mu_j`` (margin, one name: in radii).
    novelty
        ``(J,)`` novelty score in [0, 1] (module docstring).
    is_novel
        ``(J,)`` ``novelty >= novelty_threshold``.
    label
        ``(J,)`` the cluster's cell type: its matched (or compared) name, or ``novel_label``
        when novel. (margin method: ``best_name``.)
    compared_name
        ``(J,)`` the name each cluster was matched to or, unmatched, its nearest name (matching);
        ``best_name`` (margin).
    matched
        ``(J,)`` whether the cluster was matched one to one to a name (matching only).
    evidence
        ``(J,)`` ``e_j`` of the module docstring (matching; the margin method's distance there).
    split_of
        ``(J,)`` index (into :attr:`clusters`) of the matched cluster an unmatched cluster was
        tested against, -1 for matched clusters.
    distinctness
        ``(J,)`` ``d'`` of an unmatched cluster against ``split_of``; NaN for matched ones.
    part_of
        ``(J,)`` index (into :attr:`clusters`) of the cluster a part was split from
        (``decided``), -1 for the others.
    prototypes
        ``(N, D)`` the name prototypes ``P_n`` (in the naming space).
    cell_type
        ``(n,)`` per cell: the label of its cluster.
    confidence
        ``(n,)`` per cell: how sure its label is (module docstring, "Per cell").
    cell_novelty
        ``(n,)`` per cell: novelty probability of the cell (module docstring, "Per cell").
    cell_name_probabilities
        ``(n, N)`` float32 per cell: probability of each of :attr:`names`.
    cell_closest
        ``(n,)`` per cell: its most probable annotated name (also for novel cells).
    novelty_method
        ``"matching"`` or ``"margin"``.
    space
        ``"latent"`` or ``"umap"``: where distances were measured.
    novelty_threshold
        The threshold used for ``is_novel``.
    novel_label
        The label given to novel clusters.
    """

    clusters: np.ndarray
    n_cells: np.ndarray
    n_sampled: np.ndarray
    centers: np.ndarray
    sigma: np.ndarray
    radius: np.ndarray
    names: np.ndarray
    name_probabilities: np.ndarray
    top_names: np.ndarray
    top_probabilities: np.ndarray
    best_name: np.ndarray
    best_probability: np.ndarray
    novelty_distance: np.ndarray
    nearest_landmark: np.ndarray
    novelty: np.ndarray
    is_novel: np.ndarray
    label: np.ndarray
    compared_name: np.ndarray
    matched: np.ndarray
    evidence: np.ndarray
    split_of: np.ndarray
    distinctness: np.ndarray
    part_of: np.ndarray
    prototypes: np.ndarray
    cell_type: np.ndarray
    confidence: np.ndarray
    cell_novelty: np.ndarray
    cell_name_probabilities: np.ndarray
    cell_closest: np.ndarray
    novelty_method: str
    space: str
    novelty_threshold: float
    novel_label: str

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False

    @property
    def n_clusters(self) -> int:
        """Number of discovered clusters."""
        return int(self.clusters.shape[0])

    @property
    def cell_is_novel(self) -> np.ndarray:
        """``(n,)`` per cell: whether its label is :attr:`novel_label`."""
        return np.asarray(self.cell_type == self.novel_label, dtype=bool)

    def describe(self, j: int) -> str:
        """The paper's interpretable name of cluster ``j``: ``"novel, closest to X (p), Y (q)"``
        for a novel cluster (``"novel (split from cluster c), closest to ..."`` for a part the
        reference lacks), ``"X (p)"`` otherwise."""
        top = ", ".join(
            f"{n} ({p:.2f})" for n, p in zip(self.top_names[j], self.top_probabilities[j])
            if p >= 0.005
        ) or f"{self.top_names[j][0]} ({self.top_probabilities[j][0]:.2f})"
        if self.is_novel[j] and self.part_of[j] >= 0:
            return f"{self.novel_label} (split from cluster {_to_python(self.clusters[self.part_of[j]])}), closest to {top}"
        if self.is_novel[j]:
            return f"{self.novel_label}, closest to {top}"
        return f"{self.label[j]} ({float(self.name_probabilities[j, list(self.names).index(self.label[j])]):.2f})"

    def to_records(self) -> list[dict[str, Any]]:
        """Per-cluster summary as plain Python values, for a run record in ``uns``.

        Returns
        -------
        list of dict
            One dict per cluster with keys ``cluster``, ``n_cells``, ``label``, ``is_novel``,
            ``novelty``, ``novelty_distance``, ``nearest_landmark``, ``best_name``,
            ``best_probability``, ``top_names`` (list of str), ``top_probabilities`` (list of
            float), ``sigma``, ``radius``, ``compared_name``, ``matched``, ``evidence`` and
            ``description`` (:meth:`describe`). Only ``int``, ``float``, ``bool``, ``str`` and
            lists of them occur.
        """
        records = []
        for j in range(self.n_clusters):
            records.append(
                {
                    "cluster": _to_python(self.clusters[j]),
                    "n_cells": int(self.n_cells[j]),
                    "label": str(self.label[j]),
                    "is_novel": bool(self.is_novel[j]),
                    "novelty": float(self.novelty[j]),
                    "novelty_distance": float(self.novelty_distance[j]),
                    "nearest_landmark": int(self.nearest_landmark[j]),
                    "best_name": str(self.best_name[j]),
                    "best_probability": float(self.best_probability[j]),
                    "top_names": [str(v) for v in self.top_names[j]],
                    "top_probabilities": [float(v) for v in self.top_probabilities[j]],
                    "sigma": float(self.sigma[j]),
                    "radius": float(self.radius[j]),
                    "compared_name": str(self.compared_name[j]),
                    "matched": bool(self.matched[j]),
                    "evidence": float(self.evidence[j]),
                    "description": self.describe(j),
                }
            )
        return records


def _to_python(value: Any) -> Any:
    """A numpy scalar as the matching Python scalar; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _margin_ratio(dist: np.ndarray, name_codes: np.ndarray) -> np.ndarray:
    """Per row: distance to the nearest landmark over the distance to the nearest landmark of
    another name (in [0, 1]; 1 = no closer to one known type than to another)."""
    nearest = np.argmin(dist, axis=1)
    d1 = dist[np.arange(dist.shape[0]), nearest]
    other = name_codes[None, :] != name_codes[nearest][:, None]
    d2 = np.where(other, dist, np.inf).min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d2 > 0, d1 / d2, 1.0)


def _novelty(z: np.ndarray, several_names: bool) -> np.ndarray:
    """The novelty score of a margin ratio (several names) or of a distance in radii (one)."""
    if not several_names:
        return _hill(z, _NOVELTY_HALF, _NOVELTY_POWER)
    return _hill(z, _MARGIN_HALF, _MARGIN_POWER)


def _scaled(distance: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``distance / scale`` with 0/0 = 0 and d/0 = inf for d > 0 (a cluster without spread)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = distance / scale
    return np.where((distance == 0) & (scale == 0), 0.0, z)


def _per_landmark(name: str, value: Any, n_landmarks: int) -> np.ndarray | None:
    """An optional non-negative value per landmark as float64, or ``None``."""
    if value is None:
        return None
    value = np.asarray(value, dtype=np.float64).reshape(-1)
    if value.shape[0] != n_landmarks:
        raise InputError(f"{name} must have one value per landmark ({n_landmarks}), got {value.shape[0]}.")
    if not (np.isfinite(value).all() and (value >= 0).all()):
        raise InputError(f"{name} must be finite and non-negative.")
    return value


@dataclasses.dataclass(frozen=True)
class _Options:
    """:func:`name_clusters`' scalar options, checked by :func:`_checked_inputs`."""

    novelty_method: str
    max_cells_per_cluster: int
    top: int
    novelty_threshold: float
    novel_label: str
    space: str
    umap_max_cells: int
    umap_n_neighbors: int
    block_size: int


def name_clusters(
    embedding: np.ndarray,
    clusters: np.ndarray,
    landmarks: np.ndarray,
    landmark_names: Any,
    *,
    landmark_weights: np.ndarray | None = None,
    landmark_radius: np.ndarray | None = None,
    novelty_method: Literal["matching", "margin"] = "matching",
    max_cells_per_cluster: int = 2000,
    top: int = 3,
    novelty_threshold: float = 0.5,
    novel_label: str = "novel",
    space: Literal["latent", "umap"] = "latent",
    umap_max_cells: int = 50_000,
    umap_n_neighbors: int = 30,
    block_size: int = 65_536,
    decided: Mapping[Any, tuple[str, float, Any]] | None = None,
    rng: np.random.Generator | int | None,
) -> NamingResult:
    """Name each discovered cluster after the annotated landmarks and score its novelty.

    Cluster means and radii are exact (sums accumulated over row blocks). The kernel width
    ``sigma_j`` is the standard deviation of the pairwise distances among at most
    ``max_cells_per_cluster`` cells drawn at random from cluster ``j``, so its cost is bounded
    whatever the cluster size. The name probabilities are computed with a log-sum-exp. Memory
    beyond the outputs is bounded by the block size, the sample size and the landmark count.
    See the module docstring for the formulas.

    Parameters
    ----------
    embedding
        ``(n, D)`` cell embeddings of the unannotated experiment (a numpy array or memmap: it is
        read in row blocks and by fancy indexing of the sampled rows).
    clusters
        ``(n,)`` discovered cluster of each cell (integers or strings).
    landmarks
        ``(K, D)`` annotated landmarks of all annotated experiments.
    landmark_names
        ``(K,)`` cell-type name of each landmark. Several landmarks may share a name; their
        probabilities are summed.
    landmark_weights
        Optional ``(K,)`` annotated cells of each landmark: a name's prototype is the mean of
        its landmarks with these weights (equal weights without it).
    landmark_radius
        Optional ``(K,)`` root-mean-square distance of each landmark's annotated cells to the
        landmark, in the units of ``embedding``, for the margin method with a single name:
        it enters the novelty scale (without it, the scale is the cluster's own radius). Not
        allowed with ``space="umap"``, where distances are in other units.
    novelty_method
        ``"matching"`` (default): clusters matched one to one to names, see the module
        docstring. ``"margin"``: the earlier margin-ratio score, kept for comparison.
    max_cells_per_cluster
        Most cells per cluster used for ``sigma_j`` (``pdist`` on the sample is quadratic).
    top
        How many names (with probabilities) to keep per cluster.
    novelty_threshold
        A cluster with ``novelty >= novelty_threshold`` is called ``novel_label``. The default
        0.5 is evidence ``e_j = 1``; threshold ``t`` is ``e_j = (t / (1 - t)) ** (1 / 8)``.
    novel_label
        Cell type given to the cells of novel clusters. It must differ from every landmark name.
    space
        ``"latent"`` measures distances in the embedding. ``"umap"`` (the paper's choice) first
        maps cells and landmarks to 10 UMAP components fitted on at most ``umap_max_cells``
        random cells plus the landmarks, and maps the other cells with ``transform`` in blocks.
        It is slow and needs ``umap-learn``.
    umap_max_cells, umap_n_neighbors
        Most cells in the UMAP fit; its neighbourhood size (30 in the paper).
    block_size
        Rows per block when streaming the embedding.
    decided
        ``{cluster: (name, evidence e, parent cluster or None)}``: clusters whose call is made
        elsewhere (:mod:`mars_scale.subpopulations` splits a cluster into parts); left out of
        the matching, compared with ``name``, novelty ``e^8 / (e^8 + 1)`` (matching only).
    rng
        Random generator or seed for the sampling of cells (and the UMAP seed). ``None`` draws
        fresh entropy, so results can differ between runs.

    Returns
    -------
    NamingResult
        Per cluster names, probabilities and novelty, and per cell the same (its fields).

    Raises
    ------
    InputError
        If shapes disagree, values are not finite, a landmark name is missing or equals
        ``novel_label``, or an option is out of range.
    """
    rng = np.random.default_rng(rng)
    options = _Options(novelty_method, max_cells_per_cluster, top, novelty_threshold, novel_label, space,
                       umap_max_cells, umap_n_neighbors, block_size)
    embedding, clusters, landmarks, names_in, landmark_weights, landmark_radius = _checked_inputs(
        embedding, clusters, landmarks, landmark_names, landmark_weights, landmark_radius, options)
    n_cells, dim = (int(v) for v in embedding.shape)
    start = time.perf_counter()
    cluster_ids, codes = np.unique(clusters, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64, copy=False)
    names, name_codes = np.unique(names_in, return_inverse=True)
    name_codes = name_codes.reshape(-1)
    logger.info("naming %d clusters of %d cells (%d dims, %s space) after %d landmarks with %d names",
                cluster_ids.shape[0], n_cells, dim, space, landmarks.shape[0], names.shape[0])
    if space == "umap":
        embedding, landmarks = _umap_embed(
            embedding, landmarks, max_cells=umap_max_cells, n_neighbors=umap_n_neighbors,
            block_size=block_size, rng=rng,
        )
    result = _name(embedding, codes, cluster_ids, landmarks, name_codes, names, landmark_weights=landmark_weights,
                   landmark_radius=landmark_radius, options=options, rng=rng, decided=decided)
    logger.info("named %d clusters in %.2f s, %d of them novel",
                result.n_clusters, time.perf_counter() - start, int(result.is_novel.sum()))
    return result


def _checked_inputs(
    embedding: Any,
    clusters: Any,
    landmarks: Any,
    landmark_names: Any,
    landmark_weights: np.ndarray | None,
    landmark_radius: np.ndarray | None,
    options: _Options,
) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """:func:`name_clusters`' inputs checked and converted (embedding, clusters, landmarks,
    landmark names as str, weights, radius); raises :class:`InputError` naming the problem."""
    o = options
    novelty_method, max_cells_per_cluster, top, novelty_threshold = (
        o.novelty_method, o.max_cells_per_cluster, o.top, o.novelty_threshold)
    novel_label, space, umap_max_cells, umap_n_neighbors, block_size = (
        o.novel_label, o.space, o.umap_max_cells, o.umap_n_neighbors, o.block_size)
    if space not in ("latent", "umap"):
        raise InputError(f"space must be 'latent' or 'umap' (got {space!r}).")
    for name, value, low in (
        ("max_cells_per_cluster", max_cells_per_cluster, 2),
        ("top", top, 1),
        ("umap_max_cells", umap_max_cells, 1),
        ("umap_n_neighbors", umap_n_neighbors, 2),
        ("block_size", block_size, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} must be an integer of at least {low} (got {value!r}).")
    if not 0.0 < float(novelty_threshold) < 1.0:
        raise InputError(
            f"novelty_threshold must lie strictly between 0 and 1 (got {novelty_threshold!r})."
        )
    if not isinstance(novel_label, str) or not novel_label:
        raise InputError(f"novel_label must be a non-empty string (got {novel_label!r}).")
    if not hasattr(embedding, "shape") or not hasattr(embedding, "ndim"):
        embedding = np.asarray(embedding)
    if embedding.ndim != 2:
        raise InputError(f"embedding must be 2-D (cells x dimensions), got {embedding.ndim}-D.")
    n_cells, dim = (int(v) for v in embedding.shape)
    if n_cells == 0:
        raise InputError("embedding has no cells, so there is nothing to name.")
    clusters = np.asarray(clusters)
    if clusters.ndim != 1 or clusters.shape[0] != n_cells:
        raise InputError(
            f"clusters must be 1-D with one entry per embedding row ({n_cells}), "
            f"got shape {clusters.shape}."
        )
    if clusters.dtype.kind == "f" and np.isnan(clusters).any():
        raise InputError("clusters has missing values (every cell needs a cluster).")
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 2 or landmarks.shape[0] == 0 or landmarks.shape[1] != dim:
        raise InputError(
            f"landmarks must be 2-D with at least one row and {dim} columns like embedding, "
            f"got shape {landmarks.shape}."
        )
    if not np.isfinite(landmarks).all():
        raise InputError("landmarks has non-finite values.")
    n_landmarks = landmarks.shape[0]
    names_in = np.asarray(landmark_names, dtype=object).reshape(-1)
    if names_in.shape[0] != n_landmarks:
        raise InputError(
            f"landmark_names must have one name per landmark ({n_landmarks}), "
            f"got {names_in.shape[0]}."
        )
    if any(is_missing(v) for v in names_in):
        raise InputError(
            "landmark_names has missing values (every annotated landmark needs a name)."
        )
    names_in = np.array([str(v) for v in names_in], dtype=object)
    if novel_label in set(names_in):
        raise InputError(
            f"novel_label {novel_label!r} is also a landmark name (pick another novel_label)."
        )
    if novelty_method not in ("matching", "margin"):
        raise InputError(f"novelty_method must be 'matching' or 'margin' (got {novelty_method!r}).")
    if landmark_radius is not None and space == "umap":
        raise InputError(
            "landmark_radius is in embedding units and cannot be used with space='umap' "
            "(pass None)."
        )
    landmark_weights = _per_landmark("landmark_weights", landmark_weights, n_landmarks)
    landmark_radius = _per_landmark("landmark_radius", landmark_radius, n_landmarks)
    if space == "umap" and min(n_cells, umap_max_cells) + n_landmarks <= umap_n_neighbors:
        raise InputError(
            f"space='umap' needs more than umap_n_neighbors={umap_n_neighbors} points to fit "
            f"(got {min(n_cells, umap_max_cells)} cells and {n_landmarks} landmarks)."
        )

    return embedding, clusters, landmarks, names_in, landmark_weights, landmark_radius


def _row_blocks(n: int, rows: int):
    for begin in range(0, n, rows):
        yield begin, min(n, begin + rows)


def _read_block(embedding: Any, begin: int, end: int) -> np.ndarray:
    block = np.asarray(embedding[begin:end], dtype=np.float64)
    if not np.isfinite(block).all():
        raise InputError(f"embedding has non-finite values in rows {begin} to {end - 1}.")
    return block


def _name(
    embedding: Any,
    codes: np.ndarray,
    cluster_ids: np.ndarray,
    landmarks: np.ndarray,
    name_codes: np.ndarray,
    names: np.ndarray,
    *,
    landmark_weights: np.ndarray | None,
    landmark_radius: np.ndarray | None,
    options: _Options,
    rng: np.random.Generator,
    decided: Mapping[Any, tuple[str, float, Any]] | None = None,
) -> NamingResult:
    """The naming kernel on validated inputs (cluster codes 0..J-1, landmark name codes;
    ``decided``: as :func:`name_clusters`)."""
    novelty_method, max_cells_per_cluster, top = options.novelty_method, options.max_cells_per_cluster, options.top
    novelty_threshold, novel_label = float(options.novelty_threshold), options.novel_label
    space, block_size = options.space, options.block_size
    n_clusters = cluster_ids.shape[0]
    n_names = names.shape[0]
    codes_decided = _decided_codes(decided, cluster_ids, names, novelty_method)
    # Shifting by the landmarks' mean keeps E||x - c||^2 - ||mu - c||^2 accurate when the data
    # sit far from the origin.
    shift = landmarks.mean(axis=0)
    counts, centers, radius = _cluster_moments(embedding, codes, n_clusters, shift, block_size)
    sigma, n_sampled = _kernel_widths(embedding, codes, counts, cluster_ids, max_cells_per_cluster, rng)

    # Names: Gaussian kernel over all landmarks, normalised with a log-sum-exp, summed per name.
    center_sq = cdist(centers, landmarks, "sqeuclidean")  # (J, K), exact
    name_probabilities = _kernel_name_probabilities(center_sq, sigma, name_codes, n_names)
    prototypes = _name_prototypes(landmarks, name_codes, n_names, landmark_weights)
    calls = _cluster_calls(
        novelty_method, centers=centers, radius=radius, prototypes=prototypes, embedding=embedding,
        codes=codes, shift=shift, block_size=block_size, center_dist=np.sqrt(center_sq),
        names=names, best_name=names[np.argmax(name_probabilities, axis=1)], name_codes=name_codes,
        landmark_radius=landmark_radius, decided=codes_decided,
    )
    novelty = calls["novelty"]
    is_novel = novelty >= novelty_threshold
    compared_name = calls["compared_name"]
    label = np.where(is_novel, novel_label, compared_name).astype(object)
    offsets = None
    if novelty_method == "matching":
        # A known cluster is its name (the matching says so) wherever the experiment's offset put
        # it: its kernel is read with the cluster moved onto the name's prototype.
        known = ~is_novel
        offsets = np.where(known[:, None], prototypes[calls["compared"]] - centers, 0.0)
        on_name = cdist(prototypes[calls["compared"][known]], landmarks, "sqeuclidean")
        name_probabilities[known] = _kernel_name_probabilities(on_name, sigma[known], name_codes, n_names)
    top_names, top_probabilities = _top_names(name_probabilities, names, top)
    best_name = top_names[:, 0].copy()
    best_probability = top_probabilities[:, 0].copy()
    cell_novelty, cell_probs = _per_cell(
        embedding, codes, landmarks, name_codes, n_names, shift=shift, sigma=sigma,
        prototypes=prototypes, centers=centers, radius=radius, calls=calls,
        novelty_method=novelty_method, landmark_radius=landmark_radius, block_size=block_size,
        offsets=offsets,
    )
    cell_type = label[codes]
    cell_closest = names[np.argmax(cell_probs, axis=1)]
    label_code = np.searchsorted(names, np.where(is_novel, compared_name, label).astype(object))[codes]
    p_label = cell_probs[np.arange(codes.shape[0]), label_code].astype(np.float64)
    confidence = np.where(is_novel[codes], cell_novelty, p_label * (1.0 - cell_novelty))
    novelty_distance, nearest_landmark = calls["novelty_distance"], calls["nearest_landmark"]
    matched, evidence = calls["matched"], calls["evidence"]
    split_of, distinctness = calls["split_of"], calls["distinctness"]
    part_of = codes_decided[2] if codes_decided is not None else np.full(n_clusters, -1, dtype=np.int64)

    return NamingResult(
        clusters=cluster_ids,
        n_cells=counts.astype(np.int64),
        n_sampled=n_sampled,
        centers=centers,
        sigma=sigma,
        radius=radius,
        names=names,
        name_probabilities=name_probabilities,
        top_names=top_names,
        top_probabilities=top_probabilities,
        best_name=best_name,
        best_probability=best_probability,
        novelty_distance=novelty_distance,
        nearest_landmark=nearest_landmark,
        novelty=novelty,
        is_novel=is_novel,
        label=label,
        compared_name=np.asarray(compared_name, dtype=object),
        matched=matched,
        evidence=evidence,
        split_of=split_of,
        distinctness=distinctness,
        part_of=part_of,
        prototypes=prototypes,
        cell_type=cell_type,
        confidence=confidence,
        cell_novelty=cell_novelty,
        cell_name_probabilities=cell_probs,
        cell_closest=cell_closest,
        novelty_method=novelty_method,
        space=space,
        novelty_threshold=novelty_threshold,
        novel_label=novel_label,
    )


def _top_names(name_probabilities: np.ndarray, names: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top`` most probable names of each cluster and their probabilities, most probable
    first (ties in the order of ``names``)."""
    top_index = np.argsort(-name_probabilities, axis=1, kind="stable")[:, :min(top, names.shape[0])]
    return names[top_index], np.take_along_axis(name_probabilities, top_index, axis=1)


def with_cluster_probabilities(naming: NamingResult, name_probabilities: np.ndarray) -> NamingResult:
    """``naming`` with the clusters' name probabilities replaced by ``(J, N)``
    ``name_probabilities`` (rows summing to 1), and its top names, best name and their
    probabilities (and so :meth:`NamingResult.describe`) following them. The clusters' calls
    (labels, novelty) are left as they are."""
    name_probabilities = np.asarray(name_probabilities, dtype=np.float64)
    if name_probabilities.shape != naming.name_probabilities.shape:
        raise ValueError(f"name_probabilities must be {naming.name_probabilities.shape} (clusters x names), "
                         f"got {name_probabilities.shape}")
    top_names, top_probabilities = _top_names(name_probabilities, naming.names, naming.top_names.shape[1])
    return dataclasses.replace(naming, name_probabilities=name_probabilities, top_names=top_names,
                               top_probabilities=top_probabilities, best_name=top_names[:, 0].copy(),
                               best_probability=top_probabilities[:, 0].copy())


def _cluster_moments(
    embedding: Any, codes: np.ndarray, n_clusters: int, shift: np.ndarray, block_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact cluster sizes, means and radii (root-mean-square distance to the mean), with sums
    accumulated over row blocks of ``embedding - shift``."""
    n_cells, dim = embedding.shape
    counts = np.bincount(codes, minlength=n_clusters).astype(np.float64)
    sums = np.zeros((n_clusters, dim))
    sum_sq = np.zeros(n_clusters)
    for begin, end in _row_blocks(n_cells, block_size):
        block = _read_block(embedding, begin, end) - shift
        block_codes = codes[begin:end]
        indicator = sparse.csr_matrix(
            (np.ones(end - begin), (block_codes, np.arange(end - begin))),
            shape=(n_clusters, end - begin),
        )
        sums += indicator @ block
        sq_norms = np.einsum("ij,ij->i", block, block)
        sum_sq += np.bincount(block_codes, weights=sq_norms, minlength=n_clusters)
    mean_shifted = sums / counts[:, None]
    mean_sq = np.einsum("ij,ij->i", mean_shifted, mean_shifted)
    radius = np.sqrt(np.maximum(sum_sq / counts - mean_sq, 0.0))
    return counts, shift + mean_shifted, radius


def _kernel_widths(
    embedding: Any, codes: np.ndarray, counts: np.ndarray, cluster_ids: np.ndarray,
    max_cells: int, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """``sigma_j``, the standard deviation of pairwise distances among at most ``max_cells``
    random cells of each cluster, and the sample sizes."""
    n_clusters = counts.shape[0]
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    sigma = np.zeros(n_clusters)
    n_sampled = np.zeros(n_clusters, dtype=np.int64)
    for j in range(n_clusters):
        members = order[bounds[j] : bounds[j + 1]]
        if members.shape[0] > max_cells:
            members = np.sort(rng.choice(members, size=max_cells, replace=False))
        n_sampled[j] = members.shape[0]
        if members.shape[0] >= 2:
            sigma[j] = float(np.std(pdist(np.asarray(embedding[members], dtype=np.float64))))
    degenerate = np.flatnonzero(sigma == 0)
    if degenerate.size:
        logger.warning(
            "%d clusters have a kernel width sigma of 0 (fewer than 3 cells, or all pairwise "
            "distances equal); they take the nearest landmark's name with probability 1: %s",
            degenerate.size,
            ", ".join(str(_to_python(cluster_ids[j])) for j in degenerate[:10]),
        )
    return sigma, n_sampled


def _cluster_calls(
    novelty_method: str, *, centers: np.ndarray, radius: np.ndarray, prototypes: np.ndarray,
    embedding: Any, codes: np.ndarray, shift: np.ndarray, block_size: int,
    center_dist: np.ndarray, names: np.ndarray, best_name: np.ndarray, name_codes: np.ndarray,
    landmark_radius: np.ndarray | None, decided: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Per cluster: the name it is compared with, its evidence and novelty, by the matching
    rule or the margin score (keys of :class:`NamingResult` plus ``compared``, ``scale``)."""
    n_clusters = centers.shape[0]
    if novelty_method == "matching" and decided is not None:
        m = _match_with_decided(centers, radius, prototypes, embedding, codes, shift, block_size, decided)
    elif novelty_method == "matching":
        m = _match(centers, radius, prototypes, embedding, codes, shift, block_size)
    if novelty_method == "matching":
        return {
            "compared": m["compared"], "compared_name": names[m["compared"]],
            "evidence": m["evidence"], "novelty": _hill(m["evidence"], 1.0, _EVIDENCE_POWER),
            "matched": m["matched"], "split_of": m["split_of"], "distinctness": m["distinctness"],
            "novelty_distance": m["distance"], "nearest_landmark": np.argmin(center_dist, axis=1),
            "scale": None,
        }
    novelty_distance, nearest_landmark, scale = _margin_scores(center_dist, radius, name_codes, landmark_radius)
    return {
        "compared": np.searchsorted(names, best_name), "compared_name": best_name,
        "evidence": novelty_distance,
        "novelty": _novelty(novelty_distance, np.unique(name_codes).shape[0] > 1),
        "matched": np.zeros(n_clusters, dtype=bool), "split_of": np.full(n_clusters, -1, dtype=np.int64),
        "distinctness": np.full(n_clusters, np.nan), "novelty_distance": novelty_distance,
        "nearest_landmark": nearest_landmark, "scale": scale,
    }


def _per_cell(
    embedding: Any, codes: np.ndarray, landmarks: np.ndarray, name_codes: np.ndarray, n_names: int,
    *, shift: np.ndarray, sigma: np.ndarray, prototypes: np.ndarray, centers: np.ndarray,
    radius: np.ndarray, calls: dict[str, Any], novelty_method: str,
    landmark_radius: np.ndarray | None, block_size: int, offsets: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell novelty and name probabilities, in blocks small enough for the cells x
    landmarks matrix; ``offsets`` ``(J, D)`` moves each cluster's cells before the kernel."""
    n_cells = codes.shape[0]
    n_landmarks = landmarks.shape[0]
    compared, novelty, scale = calls["compared"], calls["novelty"], calls["scale"]
    cell_novelty = np.empty(n_cells)
    cell_probs = np.empty((n_cells, n_names), dtype=np.float32)
    rows = max(1, min(block_size, _BLOCK_ELEMENTS // max(n_landmarks, n_names)))
    landmarks_shifted = landmarks - shift
    prototypes_shifted = prototypes - shift
    # root-mean-square distance of a cluster's cells to the prototype it was compared with
    typical = np.sqrt(np.sum((centers - prototypes[compared]) ** 2, axis=1) + radius**2)
    odds = np.clip(novelty, 1e-12, 1 - 1e-12)
    odds = odds / (1 - odds)
    several_names = np.unique(name_codes).shape[0] > 1
    for begin, end in _row_blocks(n_cells, rows):
        block = _read_block(embedding, begin, end) - shift
        block_codes = codes[begin:end]
        moved = block if offsets is None else block + offsets[block_codes]
        dist_sq = np.maximum(_squared_distances(moved, landmarks_shifted), 0.0)
        cell_probs[begin:end] = _kernel_name_probabilities(dist_sq, sigma[block_codes], name_codes, n_names)
        if novelty_method == "matching":
            own = np.sqrt(np.sum((block - prototypes_shifted[compared[block_codes]]) ** 2, axis=1))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(typical[block_codes] > 0, own / typical[block_codes], 1.0)
            cell_odds = odds[block_codes] * ratio**_CELL_POWER
            cell_novelty[begin:end] = cell_odds / (1.0 + cell_odds)
        else:
            dist = np.sqrt(dist_sq)
            if several_names:
                z = _margin_ratio(dist, name_codes)
            elif landmark_radius is None:
                z = _scaled(dist.min(axis=1), radius[block_codes])
            else:
                z = _scaled(dist, scale[block_codes]).min(axis=1)
            cell_novelty[begin:end] = _novelty(z, several_names)
    return cell_novelty, cell_probs


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(len(x), len(y))`` squared Euclidean distances (may be slightly negative)."""
    return (
        np.einsum("ij,ij->i", x, x)[:, None] - 2.0 * x @ y.T + np.einsum("ij,ij->i", y, y)[None, :]
    )


def _kernel_name_probabilities(
    dist_sq: np.ndarray, sigma: np.ndarray, name_codes: np.ndarray, n_names: int
) -> np.ndarray:
    """Rows of ``exp(-d^2 / 2 sigma^2)`` over landmarks, normalised, summed per name.

    A row whose ``sigma`` is 0 puts all its mass on its nearest landmark(s).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        logits = -dist_sq / (2.0 * sigma[:, None] ** 2)
    nearest = dist_sq == dist_sq.min(axis=1, keepdims=True)
    logits = np.where((sigma > 0)[:, None], logits, np.where(nearest, 0.0, -np.inf))
    prob = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    return prob @ (name_codes[:, None] == np.arange(n_names)[None, :])


def name_confusion(
    embedding: np.ndarray, true_names: np.ndarray, landmarks: np.ndarray, landmark_name_codes: np.ndarray,
    n_names: int,
) -> np.ndarray:
    """How the embedding tells names apart: annotated cells counted by their own name (rows) and
    the name of their nearest annotated landmark (columns).

    Parameters
    ----------
    embedding
        ``(n, D)`` embedded annotated cells (a block: counts from blocks add up).
    true_names
        ``(n,)`` each cell's name as an index into the sorted unique landmark names; negative
        for cells whose label is not a landmark name (left out).
    landmarks
        ``(K, D)`` annotated landmarks.
    landmark_name_codes
        ``(K,)`` each landmark's name, an index into the same names.
    n_names
        Number of names.

    Returns
    -------
    numpy.ndarray
        ``(n_names, n_names)`` int64 counts.
    """
    z = np.asarray(embedding, dtype=np.float32)
    true_names = np.asarray(true_names, dtype=np.int64)
    keep = true_names >= 0
    out = np.zeros((n_names, n_names), dtype=np.int64)
    if not keep.any():
        return out
    nearest = np.argmin(_squared_distances(z[keep], np.asarray(landmarks, dtype=np.float32)), axis=1)
    np.add.at(out, (true_names[keep], np.asarray(landmark_name_codes)[nearest]), 1)
    return out


def _name_prototypes(
    landmarks: np.ndarray, name_codes: np.ndarray, n_names: int, weights: np.ndarray | None
) -> np.ndarray:
    """``P_n``: the weighted mean of each name's landmarks (equal weights where they sum to 0)."""
    w = np.ones(landmarks.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    total = np.bincount(name_codes, weights=w, minlength=n_names)
    w = np.where(total[name_codes] > 0, w, 1.0)
    total = np.bincount(name_codes, weights=w, minlength=n_names)
    out = np.zeros((n_names, landmarks.shape[1]))
    np.add.at(out, name_codes, landmarks * w[:, None])
    return out / total[:, None]


def _hill(x: np.ndarray, half: float, power: float) -> np.ndarray:
    """``x^p / (x^p + half^p)``: 0 at 0, 0.5 at ``half``, 1 at infinity."""
    with np.errstate(divide="ignore", over="ignore"):
        return 1.0 / (1.0 + (half / np.asarray(x, dtype=np.float64)) ** power)


def _match(
    centers: np.ndarray,
    radius: np.ndarray,
    prototypes: np.ndarray,
    embedding: Any,
    codes: np.ndarray,
    shift: np.ndarray,
    block_size: int,
) -> dict[str, np.ndarray]:
    """One-to-one matching of clusters to names and the evidence of novelty of each cluster."""
    from scipy.optimize import linear_sum_assignment

    n_clusters, n_names = centers.shape[0], prototypes.shape[0]
    dist = cdist(centers, prototypes)  # (J, N)
    rows, cols = linear_sum_assignment(dist)
    match = np.full(n_clusters, -1, dtype=np.int64)
    match[rows] = cols
    owner = np.full(n_names, -1, dtype=np.int64)
    owner[cols] = rows
    if n_names > 1:
        between = cdist(prototypes, prototypes)
        np.fill_diagonal(between, np.inf)
        separation = between.min(axis=1)
    else:
        separation = np.array([np.inf])
    matched_dist = dist[rows, cols]
    typical = float(np.median(matched_dist)) if rows.size >= 2 else np.nan

    compared = np.where(match >= 0, match, np.argmin(dist, axis=1))
    evidence = np.zeros(n_clusters)
    nearest_cluster = np.argmin(dist, axis=0)  # per name
    split_of = np.full(n_clusters, -1, dtype=np.int64)
    distinctness = np.full(n_clusters, np.nan)
    for j in np.flatnonzero(match >= 0):
        d = dist[j, match[j]]
        e = d / (_MATCH_RATIO * separation[match[j]])
        if np.isfinite(typical):
            e = min(e, d / (_MATCH_SPREAD * typical)) if typical > 0 else e
        # matched by elimination: another cluster lies nearer the name (it holds a close sibling)
        o = nearest_cluster[match[j]]
        if o != j and dist[o, match[j]] > 0:
            e = max(e, d / (_ELIMINATION * dist[o, match[j]]))
        evidence[j] = e
    # An unmatched cluster, or a matched one that would be new although another name is nearer,
    # may be a part of the type held by the owner of its nearest name: test it against that owner.
    nearest_name = np.argmin(dist, axis=1)
    forced = (match >= 0) & (nearest_name != match) & (evidence >= 1.0)
    candidates = np.flatnonzero((match < 0) | forced)
    candidates = candidates[owner[nearest_name[candidates]] >= 0]
    if candidates.size:
        others = owner[nearest_name[candidates]]
        d_prime = _distinctness(embedding, codes, centers, shift, candidates, others, block_size)
        # reach: root-mean-square distance of the owner's cells to its name's prototype
        reach = np.sqrt(dist[others, nearest_name[candidates]] ** 2 + radius[others] ** 2)
        gap = np.linalg.norm(centers[candidates] - centers[others], axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            near = np.where(reach > 0, gap / reach, np.inf)
        split_evidence = np.minimum(d_prime / _SPLIT_DPRIME, near / _SPLIT_GAP)
        for j, o, dp, e in zip(candidates, others, d_prime, split_evidence):
            if match[j] >= 0 and e >= 1.0:
                continue  # a separate population: keep its own match and evidence
            split_of[j], distinctness[j] = o, dp
            compared[j] = nearest_name[j]
            evidence[j] = e
            match[j] = -1
    return {
        "compared": compared,
        "matched": match >= 0,
        "evidence": evidence,
        "split_of": split_of,
        "distinctness": distinctness,
        "distance": dist[np.arange(n_clusters), compared],
    }


def _decided_codes(decided: Mapping[Any, tuple[str, float, Any]] | None, cluster_ids: np.ndarray,
                   names: np.ndarray, novelty_method: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``decided`` as per-cluster codes: the name's code (-1 for clusters left to the matching),
    the evidence, and the code of the cluster it was split from (-1 for none)."""
    if not decided:
        return None
    if novelty_method != "matching":
        raise InputError("decided clusters need novelty_method='matching'")
    name_code = np.full(cluster_ids.shape[0], -1, dtype=np.int64)
    evidence = np.zeros(cluster_ids.shape[0])
    parent = np.full(cluster_ids.shape[0], -1, dtype=np.int64)
    lookup = {_to_python(c): j for j, c in enumerate(cluster_ids)}
    known_names = {str(n): k for k, n in enumerate(names)}
    for cluster, (name, e, of) in decided.items():
        j = lookup.get(_to_python(cluster))
        p = None if of is None else lookup.get(_to_python(of))
        if j is None or (of is not None and (p is None or p == j)):
            raise InputError(f"decided: cluster {cluster!r} (split from {of!r}) must be a cluster of clusters, "
                             "and its parent another one")
        if str(name) not in known_names:
            raise InputError(f"decided: cluster {cluster!r} is given name {name!r}, which no landmark has")
        if not np.isfinite(e) or e < 0:
            raise InputError(f"decided: the evidence of cluster {cluster!r} must be finite and >= 0 (got {e!r})")
        name_code[j], evidence[j], parent[j] = known_names[str(name)], float(e), -1 if p is None else p
    return name_code, evidence, parent


def _match_with_decided(centers: np.ndarray, radius: np.ndarray, prototypes: np.ndarray, embedding: Any,
                        codes: np.ndarray, shift: np.ndarray, block_size: int,
                        decided: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`_match` over the clusters left to it and the names that no decided known cluster
    holds; the decided ones take their given name and evidence."""
    name_code, evidence, _ = decided
    keep = np.flatnonzero(name_code < 0)
    held = np.unique(name_code[(name_code >= 0) & (evidence < 1.0)])
    free = np.setdiff1d(np.arange(prototypes.shape[0]), held)
    if free.size == 0:
        free = np.arange(prototypes.shape[0])
    sub = np.full(name_code.shape[0], keep.size, dtype=np.int64)  # decided cells: a code no pair uses
    sub[keep] = np.arange(keep.size)
    n_clusters = name_code.shape[0]
    out = {
        "compared": name_code.copy(), "matched": np.zeros(n_clusters, dtype=bool),
        "evidence": np.array(evidence, dtype=np.float64),
        "split_of": np.full(n_clusters, -1, dtype=np.int64), "distinctness": np.full(n_clusters, np.nan),
    }
    if keep.size:
        m = _match(centers[keep], radius[keep], prototypes[free], embedding, sub[codes], shift, block_size)
        m["compared"] = free[m["compared"]]
        for key in ("compared", "matched", "evidence", "distinctness"):
            out[key][keep] = m[key]
        out["split_of"][keep] = np.where(m["split_of"] >= 0, keep[np.maximum(m["split_of"], 0)], -1)
    out["distance"] = np.linalg.norm(centers - prototypes[out["compared"]], axis=1)
    return out


def _distinctness(
    embedding: Any,
    codes: np.ndarray,
    centers: np.ndarray,
    shift: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    block_size: int,
) -> np.ndarray:
    """``d' = |m_a - m_b| / sqrt(v_a + v_b)`` of each pair of clusters (``first[i]``,
    ``second[i]``): means and variances of their cells projected on the line joining the means."""
    axis = centers[first] - centers[second]
    norm = np.linalg.norm(axis, axis=1)
    axis = axis / np.where(norm > 0, norm, 1.0)[:, None]
    n_pairs = first.shape[0]
    stats = np.zeros((2, 3, n_pairs))  # side x (count, sum, sum of squares) x pair
    for begin, end in _row_blocks(codes.shape[0], block_size):
        block_codes = codes[begin:end]
        wanted = np.isin(block_codes, np.concatenate([first, second]))
        if not wanted.any():
            continue
        block = _read_block(embedding, begin, end)[wanted] - shift
        proj = block @ axis.T  # (rows, pairs)
        member_codes = block_codes[wanted]
        for side, ids in enumerate((first, second)):
            mask = member_codes[:, None] == ids[None, :]
            stats[side, 0] += mask.sum(axis=0)
            stats[side, 1] += np.where(mask, proj, 0.0).sum(axis=0)
            stats[side, 2] += np.where(mask, proj**2, 0.0).sum(axis=0)
    n = np.maximum(stats[:, 0], 1.0)
    mean = stats[:, 1] / n
    var = np.maximum(stats[:, 2] / n - mean**2, 0.0)
    spread = np.sqrt(var[0] + var[1])
    gap = np.abs(mean[0] - mean[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(spread > 0, gap / spread, np.where(gap > 0, np.inf, 0.0))


def _margin_scores(
    center_dist: np.ndarray,
    radius: np.ndarray,
    name_codes: np.ndarray,
    landmark_radius: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The margin method's per-cluster ``m_j`` (or ``z_j``), nearest landmark and scales."""
    if landmark_radius is None:
        scale = np.repeat(radius[:, None], center_dist.shape[1], axis=1)
    else:
        scale = np.sqrt((radius[:, None] ** 2 + landmark_radius[None, :] ** 2) / 2.0)
    if np.unique(name_codes).shape[0] > 1:
        return _margin_ratio(center_dist, name_codes), np.argmin(center_dist, axis=1), scale
    z = _scaled(center_dist, scale)
    nearest = np.argmin(z, axis=1)
    return z[np.arange(z.shape[0]), nearest], nearest, scale


def _umap_embed(
    embedding: Any,
    landmarks: np.ndarray,
    *,
    max_cells: int,
    n_neighbors: int,
    block_size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Fit UMAP on a random subsample of cells plus the landmarks, and map all cells.

    Returns the ``(n, 10)`` float32 cell coordinates and the ``(K, 10)`` landmark coordinates.
    """
    import umap  # slow import (numba): only when asked for

    n_cells = embedding.shape[0]
    n_fit = min(n_cells, max_cells)
    if n_fit < n_cells:
        sample = np.sort(rng.choice(n_cells, size=n_fit, replace=False))
    else:
        sample = np.arange(n_cells)
    fit_data = np.vstack(
        [np.asarray(embedding[sample], dtype=np.float32), landmarks.astype(np.float32)]
    )
    if not np.isfinite(fit_data).all():
        raise InputError("embedding has non-finite values among the cells sampled for UMAP.")
    seed = int(rng.integers(2**31 - 1))
    start = time.perf_counter()
    reducer = umap.UMAP(
        n_components=_UMAP_COMPONENTS, n_neighbors=n_neighbors, random_state=seed, n_jobs=1
    )
    fitted = reducer.fit_transform(fit_data)
    logger.info(
        "UMAP fitted on %d cells and %d landmarks in %.1f s",
        n_fit, landmarks.shape[0], time.perf_counter() - start,
    )
    coords = np.empty((n_cells, _UMAP_COMPONENTS), dtype=np.float32)
    coords[sample] = fitted[:n_fit]
    if n_fit < n_cells:
        start = time.perf_counter()
        rest = np.ones(n_cells, dtype=bool)
        rest[sample] = False
        rest_index = np.flatnonzero(rest)
        for begin, end in _row_blocks(rest_index.shape[0], block_size):
            index = rest_index[begin:end]
            coords[index] = reducer.transform(np.asarray(embedding[index], dtype=np.float32))
        logger.info(
            "UMAP transformed %d more cells in %.1f s",
            rest_index.shape[0],
            time.perf_counter() - start,
        )
    return coords, fitted[n_fit:].astype(np.float64)
