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

Novelty (beyond the paper)
--------------------------
A cluster of a known type lies much closer to that type's landmarks than to any landmark of
another type; a new type is not particularly close to any one known type. With landmarks of at
least two names the score is the margin ratio::

    m_j = ||mu_j - p_(1)|| / min_{k: name(k) != name(1)} ||mu_j - p_k||      (in [0, 1])
    novelty_j = m_j^8 / (m_j^8 + 0.8^8)                                     (0.5 at m_j = 0.8)

where ``p_(1)`` is the nearest landmark. ``m`` has no units and does not change if the
embedding is scaled. It replaced a first version that measured the distance to the nearest
landmark in cluster radii: with real data the held-out experiment keeps a residual batch
offset of many cluster radii (cellbench CEL-seq2 held out: 8 to 9 units against a radius of
0.4), so every cluster was called new; the margin ratio measured 0.58 to 0.68 for the known
types and 0.96 for a removed one (see ``tests/test_evaluate.py``).

With a single annotated name the margin is undefined and the distance in radii is used::

    s_jk = sqrt((r_j^2 + R_k^2) / 2)        (r_j alone when no R_k is given)
    z_j  = min_k ||mu_j - p_k|| / s_jk
    novelty_j = z_j^4 / (z_j^4 + 2^4)        (0.5 at z_j = 2 radii)

``r_j`` is the root-mean-square distance of the cluster's cells to ``mu_j`` and ``R_k`` that of
landmark ``k``'s annotated cells to ``p_k`` (optional; ``annotate`` passes it).

Per cell, ``cell_novelty`` applies the same score to the cell's own position. A cluster is
novel when ``novelty_j >= novelty_threshold`` (default 0.5).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Literal

import numpy as np
from scipy import sparse
from scipy.spatial.distance import pdist
from scipy.special import logsumexp

from mars_scale.errors import InputError

__all__ = ["NamingResult", "name_clusters"]

logger = logging.getLogger(__name__)

_NOVELTY_HALF = 2.0  # distance in radii where the novelty score is 0.5
_NOVELTY_POWER = 4.0  # steepness of the Hill transform
_MARGIN_HALF = 0.8  # margin ratio where the novelty score is 0.5
_MARGIN_POWER = 8.0
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
        ``(J,)`` ``z_j``: distance from ``mu_j`` to the nearest landmark in radii ``s_jk``.
    nearest_landmark
        ``(J,)`` index of the landmark attaining ``z_j``.
    novelty
        ``(J,)`` novelty score in [0, 1] (module docstring).
    is_novel
        ``(J,)`` ``novelty >= novelty_threshold``.
    label
        ``(J,)`` the cluster's cell type: ``best_name``, or ``novel_label`` when novel.
    cell_type
        ``(n,)`` per cell: the label of its cluster.
    confidence
        ``(n,)`` per cell: ``best_probability`` of its cluster (also for novel clusters, so it
        says how sure the nearest known name is).
    cell_novelty
        ``(n,)`` per cell: novelty score of the cell's own distance to its nearest landmark.
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
    cell_type: np.ndarray
    confidence: np.ndarray
    cell_novelty: np.ndarray
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

    def to_records(self) -> list[dict[str, Any]]:
        """Per-cluster summary as plain Python values, for a run record in ``uns``.

        Returns
        -------
        list of dict
            One dict per cluster with keys ``cluster``, ``n_cells``, ``label``, ``is_novel``,
            ``novelty``, ``novelty_distance``, ``nearest_landmark``, ``best_name``,
            ``best_probability``, ``top_names`` (list of str), ``top_probabilities`` (list of
            float), ``sigma`` and ``radius``. Only ``int``, ``float``, ``bool``, ``str`` and
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
                }
            )
        return records


def _to_python(value: Any) -> Any:
    """A numpy scalar as the matching Python scalar; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _novelty_from_distance(z: np.ndarray) -> np.ndarray:
    """Hill transform ``z^4 / (z^4 + 2^4)`` written to give 0 at z = 0 and 1 at z = inf."""
    with np.errstate(divide="ignore", over="ignore"):
        return 1.0 / (1.0 + (_NOVELTY_HALF / np.asarray(z, dtype=np.float64)) ** _NOVELTY_POWER)


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
        return _novelty_from_distance(z)
    with np.errstate(divide="ignore", over="ignore"):
        return 1.0 / (1.0 + (_MARGIN_HALF / np.asarray(z, dtype=np.float64)) ** _MARGIN_POWER)


def _scaled(distance: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``distance / scale`` with 0/0 = 0 and d/0 = inf for d > 0 (a cluster without spread)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = distance / scale
    return np.where((distance == 0) & (scale == 0), 0.0, z)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)
    except (TypeError, ValueError):  # pandas.NA
        return True


def _validate_options(
    *,
    max_cells_per_cluster: int,
    top: int,
    novelty_threshold: float,
    novel_label: str,
    space: str,
    umap_max_cells: int,
    umap_n_neighbors: int,
    block_size: int,
) -> None:
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


def name_clusters(
    embedding: np.ndarray,
    clusters: np.ndarray,
    landmarks: np.ndarray,
    landmark_names: Any,
    *,
    landmark_radius: np.ndarray | None = None,
    max_cells_per_cluster: int = 2000,
    top: int = 3,
    novelty_threshold: float = 0.5,
    novel_label: str = "novel",
    space: Literal["latent", "umap"] = "latent",
    umap_max_cells: int = 50_000,
    umap_n_neighbors: int = 30,
    block_size: int = 65_536,
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
    landmark_radius
        Optional ``(K,)`` root-mean-square distance of each landmark's annotated cells to the
        landmark, in the units of ``embedding``. It enters the novelty scale. Without it, the
        scale is the cluster's own radius. Not allowed with ``space="umap"``, where distances
        are in other units.
    max_cells_per_cluster
        Most cells per cluster used for ``sigma_j`` (``pdist`` on the sample is quadratic).
    top
        How many names (with probabilities) to keep per cluster.
    novelty_threshold
        A cluster with ``novelty >= novelty_threshold`` is called ``novel_label``. The default
        0.5 corresponds to 2 radii from the nearest landmark; threshold ``t`` corresponds to
        ``2 * (t / (1 - t)) ** 0.25`` radii.
    novel_label
        Cell type given to the cells of novel clusters. It must differ from every landmark name.
    space
        ``"latent"`` measures distances in the embedding. ``"umap"`` (the paper's choice) first
        maps cells and landmarks to 10 UMAP components fitted on at most ``umap_max_cells``
        random cells plus the landmarks, and maps the other cells with ``transform`` in blocks.
        It is slow and needs ``umap-learn``.
    umap_max_cells
        Most cells in the UMAP fit.
    umap_n_neighbors
        UMAP neighbourhood size (30 in the paper).
    block_size
        Rows per block when streaming the embedding.
    rng
        Random generator or seed for the sampling of cells (and the UMAP seed). ``None`` draws
        fresh entropy, so results can differ between runs.

    Returns
    -------
    NamingResult
        Per cluster: ``clusters``, ``n_cells``, ``n_sampled``, ``centers``, ``sigma``,
        ``radius``, ``name_probabilities`` over ``names``, ``top_names``,
        ``top_probabilities``, ``best_name``, ``best_probability``, ``novelty_distance``,
        ``nearest_landmark``, ``novelty``, ``is_novel`` and ``label``. Per cell: ``cell_type``,
        ``confidence`` and ``cell_novelty``.

    Raises
    ------
    InputError
        If shapes disagree, values are not finite, a landmark name is missing or equals
        ``novel_label``, or an option is out of range.
    """
    _validate_options(
        max_cells_per_cluster=max_cells_per_cluster,
        top=top,
        novelty_threshold=novelty_threshold,
        novel_label=novel_label,
        space=space,
        umap_max_cells=umap_max_cells,
        umap_n_neighbors=umap_n_neighbors,
        block_size=block_size,
    )
    rng = np.random.default_rng(rng)
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
    if any(_is_missing(v) for v in names_in):
        raise InputError(
            "landmark_names has missing values (every annotated landmark needs a name)."
        )
    names_in = np.array([str(v) for v in names_in], dtype=object)
    if novel_label in set(names_in):
        raise InputError(
            f"novel_label {novel_label!r} is also a landmark name (pick another novel_label)."
        )
    if landmark_radius is not None:
        if space == "umap":
            raise InputError(
                "landmark_radius is in embedding units and cannot be used with space='umap' "
                "(pass None)."
            )
        landmark_radius = np.asarray(landmark_radius, dtype=np.float64).reshape(-1)
        if landmark_radius.shape[0] != n_landmarks:
            raise InputError(
                f"landmark_radius must have one value per landmark ({n_landmarks}), "
                f"got {landmark_radius.shape[0]}."
            )
        if not (np.isfinite(landmark_radius).all() and (landmark_radius >= 0).all()):
            raise InputError("landmark_radius must be finite and non-negative.")
    if space == "umap" and min(n_cells, umap_max_cells) + n_landmarks <= umap_n_neighbors:
        raise InputError(
            f"space='umap' needs more than umap_n_neighbors={umap_n_neighbors} points to fit "
            f"(got {min(n_cells, umap_max_cells)} cells and {n_landmarks} landmarks)."
        )

    start = time.perf_counter()
    cluster_ids, codes = np.unique(clusters, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64, copy=False)
    names, name_codes = np.unique(names_in, return_inverse=True)
    name_codes = name_codes.reshape(-1)
    logger.info(
        "naming %d clusters of %d cells (%d dims, %s space) after %d landmarks with %d names",
        cluster_ids.shape[0], n_cells, dim, space, n_landmarks, names.shape[0],
    )
    if space == "umap":
        embedding, landmarks = _umap_embed(
            embedding,
            landmarks,
            max_cells=umap_max_cells,
            n_neighbors=umap_n_neighbors,
            block_size=block_size,
            rng=rng,
        )
    result = _name(
        embedding,
        codes,
        cluster_ids,
        landmarks,
        name_codes,
        names,
        landmark_radius=landmark_radius,
        max_cells_per_cluster=max_cells_per_cluster,
        top=top,
        novelty_threshold=float(novelty_threshold),
        novel_label=novel_label,
        space=space,
        block_size=block_size,
        rng=rng,
    )
    logger.info(
        "named %d clusters in %.2f s, %d of them novel",
        result.n_clusters, time.perf_counter() - start, int(result.is_novel.sum()),
    )
    return result


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
    landmark_radius: np.ndarray | None,
    max_cells_per_cluster: int,
    top: int,
    novelty_threshold: float,
    novel_label: str,
    space: str,
    block_size: int,
    rng: np.random.Generator,
) -> NamingResult:
    """The naming kernel on validated inputs (cluster codes 0..J-1, landmark name codes)."""
    n_cells, dim = embedding.shape
    n_clusters = cluster_ids.shape[0]
    n_landmarks = landmarks.shape[0]
    n_names = names.shape[0]

    # Pass 1: exact cluster means and mean squared norms. Shifting by the landmarks' mean keeps
    # E||x - c||^2 - ||mu - c||^2 accurate when the data sit far from the origin.
    shift = landmarks.mean(axis=0)
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
    centers = shift + mean_shifted
    mean_sq = np.einsum("ij,ij->i", mean_shifted, mean_shifted)
    radius = np.sqrt(np.maximum(sum_sq / counts - mean_sq, 0.0))

    # sigma_j on a bounded random sample of each cluster.
    order = np.argsort(codes, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    sigma = np.zeros(n_clusters)
    n_sampled = np.zeros(n_clusters, dtype=np.int64)
    for j in range(n_clusters):
        members = order[bounds[j] : bounds[j + 1]]
        if members.shape[0] > max_cells_per_cluster:
            members = np.sort(rng.choice(members, size=max_cells_per_cluster, replace=False))
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

    # Names: Gaussian kernel over all landmarks, normalised with a log-sum-exp, summed per name.
    name_probabilities = np.zeros((n_clusters, n_names))
    landmark_scale_sq = None if landmark_radius is None else landmark_radius**2
    novelty_distance = np.zeros(n_clusters)
    nearest_landmark = np.zeros(n_clusters, dtype=np.int64)
    several_names = np.unique(name_codes).shape[0] > 1
    scale = np.empty((n_clusters, n_landmarks))  # s_jk
    for j in range(n_clusters):
        diff = landmarks - centers[j]
        dist_sq = np.einsum("ij,ij->i", diff, diff)
        if sigma[j] > 0:
            logits = -dist_sq / (2.0 * sigma[j] ** 2)
            prob = np.exp(logits - logsumexp(logits))
        else:
            nearest = dist_sq == dist_sq.min()
            prob = nearest / nearest.sum()
        name_probabilities[j] = np.bincount(name_codes, weights=prob, minlength=n_names)
        if landmark_scale_sq is None:
            scale[j] = radius[j]
        else:
            scale[j] = np.sqrt((radius[j] ** 2 + landmark_scale_sq) / 2.0)
        dist = np.sqrt(dist_sq)
        if several_names:
            nearest_landmark[j] = int(np.argmin(dist))
            novelty_distance[j] = _margin_ratio(dist[None, :], name_codes)[0]
        else:
            z = _scaled(dist, scale[j])
            nearest_landmark[j] = int(np.argmin(z))
            novelty_distance[j] = z[nearest_landmark[j]]
    n_top = min(top, n_names)
    top_index = np.argsort(-name_probabilities, axis=1, kind="stable")[:, :n_top]
    top_names = names[top_index]
    top_probabilities = np.take_along_axis(name_probabilities, top_index, axis=1)
    best_name = top_names[:, 0].copy()
    best_probability = top_probabilities[:, 0].copy()
    novelty = _novelty(novelty_distance, several_names)
    is_novel = novelty >= novelty_threshold
    label = np.where(is_novel, novel_label, best_name).astype(object)

    # Pass 2: per-cell novelty, in blocks small enough for the cells x landmarks matrix.
    cell_novelty = np.empty(n_cells)
    rows = max(1, min(block_size, _BLOCK_ELEMENTS // n_landmarks))
    landmarks_shifted = landmarks - shift
    landmark_sq = np.einsum("ij,ij->i", landmarks_shifted, landmarks_shifted)
    for begin, end in _row_blocks(n_cells, rows):
        block = _read_block(embedding, begin, end) - shift
        block_codes = codes[begin:end]
        dist_sq = (
            np.einsum("ij,ij->i", block, block)[:, None]
            - 2.0 * block @ landmarks_shifted.T
            + landmark_sq[None, :]
        )
        dist = np.sqrt(np.maximum(dist_sq, 0.0))
        if several_names:
            z = _margin_ratio(dist, name_codes)
        elif landmark_scale_sq is None:
            z = _scaled(dist.min(axis=1), radius[block_codes])
        else:
            z = _scaled(dist, scale[block_codes]).min(axis=1)
        cell_novelty[begin:end] = _novelty(z, several_names)

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
        cell_type=label[codes],
        confidence=best_probability[codes],
        cell_novelty=cell_novelty,
        space=space,
        novelty_threshold=novelty_threshold,
        novel_label=novel_label,
    )


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
