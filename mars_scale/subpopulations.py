"""Populations inside a discovered cluster that the reference lacks: a split test on expression.

MARS's embedding is shaped by the reference's labels, so a new subtype close to a known type
(a subset removed from the reference, say) falls into its sibling's cluster and takes its name:
the embedding keeps what the reference labels and loses what it does not (docs/algorithm.md,
"Close subtypes"). The new experiment's own expression still holds the difference. For each
cluster called known, this module asks three questions of the log-normalised expression:

1. Is the cluster two populations? Its cells are split in two at random; on one half the top
   principal components of its genes most variable for their mean (:func:`excess_variance_genes`)
   are cut in two by K-means, giving a direction ``w`` in gene space (the difference of the two
   means); the other half's cells, projected on ``w``, are tested for bimodality, and the same
   is done the other way round: the split must replicate. Fitting and testing on different cells
   keeps noise from passing for structure. A split whose sides differ in the cells' quality (log
   genes detected, mitochondrial share) by half the split's ``d'`` or more (``QUALITY_SHARE``)
   is the cells' quality, not a type: a part of damaged or empty-ish cells.
2. Is the split specific to this type? Every cluster of the experiment under another name,
   projected on ``w``, must be unimodal; a direction that cuts every cluster (cell quality,
   cycling) is not a cell type. Clusters under the same name are left out: they are the same
   type, and a new population the clustering spread over them cuts them all. Where the splits
   of several clusters cut others (a condition inside the experiment, which is also the
   clearest split of every cluster and leaks into any other direction), each of them is split
   again with the other such clusters' directions projected out.
3. Does the reference hold both populations? The annotated cells of the cluster's name and of
   its close siblings (names whose prototype lies within ``sibling_share`` of the median distance
   between prototypes), projected on ``w`` per annotated experiment, must be unimodal. If the
   reference shows the same two modes, the split is known structure (two known subtypes in one
   cluster, or a heterogeneous known type). So it is where the name's cells of two annotated
   experiments lie ``EXPERIMENT_SPREAD`` (half) of the split's gap apart along ``w``: a
   condition that the reference holds in separate experiments (a control and a stimulated
   run) and the new experiment in one. Past a split the reference holds, the cluster is split
   again with its direction projected out (at most ``LOOKS_PAST_KNOWN`` times): a new subtype
   can hide behind a condition that both hold.

If the reference's labels put two siblings on the two sides (in the same order and at least
half the split's gap apart in every annotated experiment that holds both), whether or not its
cells are bimodal along the split, the cluster merged two known types: the side of the sibling
it was not named after becomes a cluster of its own with that name.

When all three hold, one part is a population the reference lacks: the part whose cells lie
farther, in the embedding, from the prototype of the cluster's name (the network was trained
to map the reference's cells of that name onto it, so the cells like them land closer). It
becomes a cluster of its own, which naming calls new (:func:`mars_scale.naming.name_clusters`,
``decided``). The side is taken in the embedding and not in expression because the
experiment sits at an offset from the reference there (batch and condition effects) that is
as large as the difference between the parts on the simulated atlas (docs/algorithm.md).

Known siblings that the embedding confuses (:func:`resolve_siblings`): where the reference
holds both siblings under their own names but the embedding mixes them (on the annotated cells,
or in a cluster of the new cells), a logistic regression on the reference's expression names
each cell of their clusters, if it does better on annotated experiments it was not fitted on
than the embedding does or than naming the whole cluster would. No other cluster's call changes,
but one: a cluster that held a name by the matching while either step gives the name to cells
(a known part, a renamed cluster) is judged against those cells (:func:`_shared_names`). If it
lies farther from the name's prototype and the two are two populations in the new cells'
expression (the split test's first question on their cells pooled), it is new: a new type next
to a known one whose cells the embedding had merged into their sibling's cluster is matched to
that type by elimination. If not, it keeps the name: one type that the clustering cut in two.
And a cluster that the matching took for a part of a known cluster's type, when the split test
splits a new part from that cluster, is new with it if in expression it is the new part's
population and not the known rest's (:func:`_like_new_parts`).

Before all this, a cluster that the matching called new while one known cluster holds its
nearest name swaps calls with that cluster where, in expression, the reference's cells of the
name are the first and not the second (:func:`_swapped`): a new type that took a known type's
place in the embedding (with one type left in the reference, say) otherwise takes its name.

Bimodality is the exact one-dimensional two-means split: ``d' = |m_1 - m_2| / s`` with ``s`` the
pooled within-part standard deviation. A single Gaussian gives ``d'`` of about 2.7 at large
sizes and more at small ones; a sample is bimodal when ``d'`` exceeds both a floor and the 99th
percentile of ``d'`` over Gaussian samples of its size (``tools/bimodality_null.py``). The floor
is ``MIN_DPRIME`` (3.5) for the cluster's own split as for the other clusters and the reference
(it was 4.5 for the cluster's own split until the quality check replaced it, docs/algorithm.md).
The evidence of a part is the smallest of the three margins (its ``d'`` over the threshold, the
threshold over the largest ``d'`` of the other clusters and of the reference), at least 1 for a
part that passed.

Cost: at most ``max_cells`` cells per cluster and per annotated experiment are read (the
clusters' cells from the experiment's contiguous rows, the reference's by chunk), plus one pass
over the cells of each cluster that is split. Memory: the samples as sparse matrices.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mars_scale.naming import NamingResult, with_cluster_probabilities
from mars_scale.preprocess import normalized_rows

logger = logging.getLogger(__name__)

MIN_DPRIME = 3.5
# A split whose two sides differ in the cells' quality (log genes detected, mitochondrial share)
# by at least this share of the split's own d' is the cells' quality, not a cell type: real
# unimodal clusters split at d' 3.5 to 4.4 along library size (docs/algorithm.md, "The split
# test"), their sides 3 standard deviations of genes detected apart (0.74 of the d'); on the
# simulated atlases no part's shift exceeds 0.33 of its d' (docs/algorithm.md, "The cells'
# quality instead of a higher bound").
QUALITY_SHARE = 0.5
# Known siblings (resolve_siblings): the embedding separates two names when this share of their
# annotated cells lies nearest a landmark of their own name; expression is used instead only
# when a classifier beats that share by CLASSIFIER_GAIN on annotated experiments it did not see.
EMBEDDING_SEPARATES = 0.95
CLASSIFIER_GAIN = 0.05
CLASSIFIER_C = 0.1
# The reference's own experiments differ along a split (a condition that it holds in separate
# experiments, as control and stimulated runs) when the medians of the name's cells in two of
# them lie this share of the split's gap apart: known structure, as for two sibling names.
EXPERIMENT_SPREAD = 0.5
# A cluster called new swaps calls with the known cluster holding its nearest name when, in
# expression, the reference's cells of the name lie at least this share of the way from the
# holder to it (_swapped; docs/algorithm.md, "A new cluster that is the known type").
SWAP_SHARE = 0.75
# Where the reference holds a cluster's split, the split test looks again past it this many times
# (a population can hide behind a condition both hold).
LOOKS_PAST_KNOWN = 2
# 99th percentile of the two-means d' of n Gaussian values (tools/bimodality_null.py, 400 draws)
_NULL_SIZES = np.array([10, 15, 20, 30, 50, 100, 200, 500, 1000])
_NULL_Q99 = np.array([6.33, 5.19, 4.90, 4.05, 3.61, 3.19, 3.04, 2.86, 2.81])


@dataclasses.dataclass(frozen=True)
class Part:
    """A part of cluster ``cluster``, made cluster ``new_cluster``.

    ``novel``: a population the reference lacks, compared with ``name`` (its cluster's name).
    Otherwise the cluster held two known siblings: the part is ``name`` and the rest of the
    cluster ``parent_name``. ``cells`` are positions among the new cells; ``dprime`` the split's
    bimodality in the cluster, ``other_dprime`` and ``reference_dprime`` the largest along the
    same direction in the other clusters and in the reference; ``genes`` the genes most raised in
    the part against the rest of its cluster. A part found by :func:`resolve_siblings` has no
    split (``dprime`` and the others NaN): ``accuracy`` is its classifier's balanced accuracy on
    annotated experiments it was not fitted on, and ``genes`` those that most favour its name.
    """

    cluster: Any
    new_cluster: int
    cells: np.ndarray
    novel: bool
    name: str
    parent_name: str | None
    dprime: float
    other_dprime: float
    reference_dprime: float
    evidence: float
    siblings: tuple[str, ...]
    genes: tuple[str, ...]
    accuracy: float | None = None


def bimodality(values: np.ndarray) -> tuple[float, float]:
    """The exact two-means split of 1-D ``values``: ``(d', cut)``, ``d'`` 0 below 6 values.

    Each part holds at least 3 values; ``cut`` is the midpoint between the two parts' means.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.shape[0]
    if n < 6:
        return 0.0, float("nan")
    c1, c2 = np.cumsum(x), np.cumsum(x * x)
    k = np.arange(3, n - 2)  # size of the lower part
    low_sse = c2[k - 1] - c1[k - 1] ** 2 / k
    high_sse = (c2[-1] - c2[k - 1]) - (c1[-1] - c1[k - 1]) ** 2 / (n - k)
    best = int(k[np.argmin(low_sse + high_sse)])
    low, high = x[:best], x[best:]
    spread = np.sqrt((low.var() * low.size + high.var() * high.size) / n)
    gap = high.mean() - low.mean()
    dprime = float(gap / spread) if spread > 0 else (float("inf") if gap > 0 else 0.0)
    return dprime, float((low.mean() + high.mean()) / 2)


def bimodal_threshold(n: int, *, floor: float = MIN_DPRIME) -> float:
    """The ``d'`` above which ``n`` values are called bimodal: the 99th percentile of ``d'``
    over ``n`` Gaussian values, and at least ``floor``."""
    q99 = np.interp(np.log(max(n, 1)), np.log(_NULL_SIZES), _NULL_Q99)
    if n < _NULL_SIZES[0]:
        q99 = np.inf
    return float(max(floor, q99))


def excess_variance_genes(mean: np.ndarray, variance: np.ndarray, n_genes: int, *, n_bins: int = 20) -> np.ndarray:
    """The ``n_genes`` genes whose variance most exceeds that of genes of similar mean, sorted.

    Expressed genes are put in ``n_bins`` bins of equal size by mean; a gene's score is its
    variance less its bin's median, over the bin's median absolute deviation (a robust
    z-score against the mean-variance trend, as Seurat's and scanpy's highly variable genes).
    The raw variance would favour the most expressed genes, whose counting noise alone is
    large; a population that only part of the cells hold raises a gene's variance above its
    trend at any mean. Genes with zero mean are never taken.
    """
    mean = np.asarray(mean, dtype=np.float64)
    variance = np.asarray(variance, dtype=np.float64)
    expressed = np.flatnonzero(mean > 0)
    score = np.full(mean.shape[0], -np.inf)
    for part in np.array_split(expressed[np.argsort(mean[expressed], kind="stable")], max(1, min(n_bins, expressed.size))):
        v = variance[part]
        centre = np.median(v)
        spread = np.median(np.abs(v - centre))
        score[part] = (v - centre) / (spread if spread > 0 else max(float(np.std(v)), 1e-12))
    top = np.argsort(-score, kind="stable")[:min(n_genes, expressed.size)]
    return np.sort(top)


def find_parts(
    store: Any,
    rows: np.ndarray,
    assignment: np.ndarray,
    embedding: np.ndarray,
    naming: NamingResult,
    *,
    annotated: Sequence[str],
    label_key: str = "cell_type",
    max_cells: int = 1000,
    n_genes: int = 500,
    n_components: int = 20,
    sibling_share: float = 0.5,
    min_part_cells: int = 10,
    seed: int | None = 0,
    labels_of: Callable[[], dict[str, tuple[int, np.ndarray, np.ndarray]]] | None = None,
) -> list[Part]:
    """Parts of the known clusters of the new cells: populations the reference lacks, and known
    siblings merged into one cluster (module docstring).

    Parameters
    ----------
    store
        The atlas store (:class:`mars_scale.store.Atlas`).
    rows
        ``(n,)`` increasing store rows of the new cells (one or several unannotated
        experiments); ``assignment`` and ``embedding`` are over these cells, in this order.
    assignment
        ``(n,)`` cluster of each cell, as named in ``naming``.
    embedding
        ``(n, D)`` embedding of the new cells (which part is new).
    naming
        The clusters' names (:func:`mars_scale.naming.name_clusters` on ``assignment``).
    annotated
        The annotated experiments whose ``label_key`` labels are the reference.
    max_cells
        Most cells read per cluster and per annotated experiment.
    n_genes, n_components
        Genes of a cluster most variable for their mean (:func:`excess_variance_genes`), and
        principal components, for its split.
    sibling_share
        Names whose prototype lies within this share of the median distance between prototypes
        from the cluster's name count as its siblings in the reference test.
    min_part_cells
        Smallest part of a cluster considered (in the cells read).
    seed
        Seeds the samples, the random halves, PCA and K-means.
    labels_of
        Returns the annotated experiments' labels (:func:`_annotated_labels` of ``annotated`` and
        ``label_key``), for a caller that reads them once for several steps; read here if not given.

    Returns
    -------
    list of Part
        Empty when no cluster is split.
    """
    rng = np.random.default_rng(seed)
    rows = np.asarray(rows, dtype=np.int64)
    assignment = np.asarray(assignment)
    if assignment.shape[0] != rows.shape[0] or np.any(np.diff(rows) <= 0):
        raise ValueError(f"rows must be increasing with one store row per cell of assignment "
                         f"({rows.shape[0]} rows, {assignment.shape[0]} cells)")
    samples = {c: _sample(np.flatnonzero(assignment == c), max_cells, rng) for c in naming.clusters}
    known = [c for j, c in enumerate(naming.clusters)
             if not naming.is_novel[j] and samples[c].size >= 4 * min_part_cells]
    if not known:
        return []
    taken = np.sort(np.concatenate(list(samples.values())))  # positions, so their rows increase too
    matrix = normalized_rows(store, rows[taken], dtype=np.float32)
    sampled = {c: matrix[np.searchsorted(taken, samples[c])] for c in naming.clusters}

    label_of = dict(zip(naming.clusters, np.asarray(naming.label).astype(str)))
    options = {"n_genes": n_genes, "n_components": n_components, "min_part_cells": min_part_cells,
               "mito": mitochondrial_genes(store.gene_ids)}
    splits = _first_splits(known, sampled, naming.clusters, label_of, rng=rng, seed=seed, **options)
    # Judge each split against the reference; where the reference holds it (a condition or a
    # heterogeneity of the known type), look again past it, on a stream of its own.
    parts: list[Part] = []
    next_id = int(np.max(np.asarray(naming.clusters, dtype=np.int64))) + 1 if len(naming.clusters) else 0
    known_rng = np.random.default_rng(None if seed is None else [seed, 3])
    reference_labels = ((labels_of or (lambda: _annotated_labels(store, annotated, label_key)))()
                        if splits else {})  # read once for every look
    for look in range(LOOKS_PAST_KNOWN + 1):
        if not splits:
            break
        reference = _reference_projections(store, splits, naming, labels_of=reference_labels,
                                           sibling_share=sibling_share, max_cells=max_cells,
                                           rng=rng if look == 0 else known_rng)
        again = []
        for split, ref in zip(splits, reference):
            part, known = _judge(store, rows, assignment, embedding, naming, split, ref, next_id, min_part_cells)
            if part is not None:
                parts.append(part)
                next_id += 1
            elif known and look < LOOKS_PAST_KNOWN:
                c = split["cluster"]
                direction = _difference(sampled[c], split)
                exclude = direction[None] if split["exclude"] is None else np.vstack([split["exclude"], direction])
                deeper, cuts_others = _specific_split(c, sampled, naming.clusters, label_of, rng=known_rng,
                                                      exclude=exclude, **options)
                if deeper is not None and cuts_others is None:
                    logger.info("cluster %s: past a split the reference holds, a split (d' %.2f)", c,
                                deeper["dprime"])
                    again.append(deeper)
        splits = again
    return parts


def _first_splits(known: Sequence[Any], sampled: dict[Any, Any], clusters: np.ndarray, label_of: dict[Any, str], *,
                  rng: np.random.Generator, seed: int | None, **options: int) -> list[dict[str, Any]]:
    """The split test's first two questions for every cluster in ``known``: the splits that pass,
    looking again past the directions that cut other clusters (a condition, cell quality), each
    such cluster split with the other such clusters' directions taken out."""
    splits = []
    failed: dict[Any, np.ndarray] = {}  # per cluster, the direction that cut other clusters too
    for c in known:
        split, cuts_others = _specific_split(c, sampled, clusters, label_of, rng=rng, **options)
        if cuts_others is not None:
            failed[c] = cuts_others
        elif split is not None:
            splits.append(split)
    past_rng = np.random.default_rng(None if seed is None else [seed, 1])  # the first pass's stream unchanged
    for c in failed if len(failed) > 1 else ():
        exclude = np.stack([v for o, v in failed.items() if o != c])
        split, cuts_others = _specific_split(c, sampled, clusters, label_of, rng=past_rng, exclude=exclude, **options)
        if split is not None and cuts_others is None:
            logger.info("cluster %s: past the directions that cut several clusters, a split (d' %.2f)", c,
                        split["dprime"])
            splits.append(split)
    return splits


def _judge(store: Any, rows: np.ndarray, assignment: np.ndarray, embedding: np.ndarray, naming: NamingResult,
           split: dict[str, Any], ref: dict[str, Any], new_id: int,
           min_part_cells: int) -> tuple[Part | None, bool]:
    """The split test's third question for one split: the part (new, or a known sibling; ``None``
    when too small), and whether the reference holds the split under the cluster's name (its
    cells bimodal along it, or its experiments that far apart)."""
    c = split["cluster"]
    j = int(np.flatnonzero(naming.clusters == c)[0])
    members = np.flatnonzero(assignment == c)
    sides = _known_sides(ref["medians"], split["gap"])
    if sides is not None:  # the reference's labels put two siblings on the two sides
        return _known_part(store, rows, members, split, sides, ref, naming, j, new_id, min_part_cells), False
    if ref["ratio"] >= 1.0:
        logger.info("cluster %s: a split (d' %.2f) that the reference also shows (d' %.2f); known",
                    c, split["dprime"], ref["dprime"])
        return None, True
    spread = _experiment_spread(ref["medians"], str(naming.compared_name[j]))
    if spread >= EXPERIMENT_SPREAD * split["gap"]:
        logger.info("cluster %s: a split (d' %.2f) along which the reference's experiments of its name lie "
                    "%.2f of the split's gap apart (a condition they hold apart); known", c, split["dprime"],
                    spread / split["gap"])
        return None, True
    return _new_part(store, rows, members, embedding, split, ref, naming, j, new_id, min_part_cells), False


def _specific_split(c: Any, sampled: dict[Any, Any], clusters: np.ndarray, label_of: dict[Any, str], *,
                    n_genes: int, n_components: int, min_part_cells: int, rng: np.random.Generator,
                    exclude: np.ndarray | None = None,
                    mito: np.ndarray | None = None) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """The split test's first two questions for cluster ``c``: its split (:func:`_split`, with
    ``exclude`` taken out) if one passes and no cluster under another name is cut along it;
    else ``None`` and, where the split cut other clusters, that direction over all genes (the
    difference between its two sides' means)."""
    split = _split(sampled[c], n_genes=n_genes, n_components=n_components, min_part_cells=min_part_cells,
                   rng=rng, exclude=exclude, mito=mito)
    if split is None:
        return None, None
    # clusters under the same name are the same type: a population inside it may cut them too
    others = [bimodality(sampled[o][:, split["genes"]] @ split["w"]) + (sampled[o].shape[0],)
              for o in clusters if o != c and sampled[o].shape[0] >= 6 and label_of[o] != label_of[c]]
    other_ratio = max([d / bimodal_threshold(n) for d, _, n in others], default=0.0)
    if other_ratio >= 1.0:
        logger.info("cluster %s: a split (d' %.2f) along a direction that cuts other clusters too; not a "
                    "cell type", c, split["dprime"])
        return None, _difference(sampled[c], split)
    split.update(cluster=c, other_ratio=other_ratio, other_dprime=max([d for d, _, _ in others], default=0.0),
                 exclude=exclude)
    return split, None


def _difference(values: Any, split: dict[str, Any]) -> np.ndarray:
    """The difference between the means of ``values`` (cells by all genes) on the two sides of
    ``split``: its direction over all genes."""
    high = np.asarray(values[:, split["genes"]] @ split["w"]).ravel() > split["cut"]
    return np.asarray(values[high].mean(axis=0) - values[~high].mean(axis=0)).ravel()


def name_with_parts(
    name: Callable[[np.ndarray, dict[Any, tuple[str, float, Any]] | None], NamingResult],
    store: Any,
    rows: np.ndarray,
    assignment: np.ndarray,
    embedding: np.ndarray,
    *,
    annotated: Sequence[str],
    confusion: np.ndarray | None = None,
    seed: int | None = 0,
) -> tuple[NamingResult, np.ndarray, list[Part]]:
    """Name the clusters, split off the parts (:func:`find_parts`), resolve known siblings that
    the embedding does not separate (:func:`resolve_siblings`, with ``confusion``), and name
    again. After each step, a cluster that holds a name the step gave to cells keeps it unless
    it is another population than those cells (:func:`_shared_names`), and one that shared a name
    the step left to a cluster it split keeps it (:func:`_holding`); after the split test, a
    cluster taken for a part of a type that a new part was split from follows the new part if
    it is its population (:func:`_like_new_parts`); the split test's other clusters are matched
    again, the sibling step's keep their calls.

    ``name(assignment, decided)`` names clusters (:func:`mars_scale.naming.name_clusters` with
    everything but these two bound). ``confusion``: :func:`mars_scale.naming.name_confusion`
    over the annotated cells, rows and columns in the order of the naming's names; without it
    no siblings are resolved. Returns the naming, the assignment (with the parts as clusters of
    their own) and the parts.
    """
    naming = name(assignment, None)
    if naming.novelty_method != "matching":
        return naming, assignment, []
    reference_rng = np.random.default_rng(None if seed is None else [seed, 2])  # other draws unchanged
    labels_of: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}  # read at the first call only

    def annotated_labels() -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
        if not labels_of:
            labels_of.update(_annotated_labels(store, annotated, "cell_type"))
        return labels_of

    def spread_of(name: str, genes: np.ndarray, w: np.ndarray) -> float:
        return _reference_spread(store, naming, name, genes, w, labels_of=annotated_labels(), max_cells=1000,
                                 rng=reference_rng)

    decided = _swapped(naming, store, rows, assignment, labels_of=annotated_labels,
                       rng=np.random.default_rng(None if seed is None else [seed, 5]), spread_of=spread_of)
    if decided:
        naming = name(assignment, decided)
    parts = find_parts(store, rows, assignment, embedding, naming, annotated=annotated, seed=seed,
                       labels_of=annotated_labels)
    if parts:
        decided = _decided(parts, decided)
        assignment = with_parts(assignment, parts)
        # a cluster that held a name a known part now takes keeps it unless the two differ
        given = _given(parts, naming)
        decided = _shared_names({**decided, **_holding(decided, naming)}, given, store, rows, embedding,
                                assignment, naming, rng=np.random.default_rng(seed), spread_of=spread_of)
        like = _like_new_parts(parts, naming, store, rows, assignment, rng=np.random.default_rng(seed),
                               spread_of=spread_of)
        decided.update({c: v for c, v in like.items() if c not in decided})
        naming = name(assignment, decided)
    if confusion is not None:
        siblings, named, resolved = resolve_siblings(store, rows, assignment, naming, confusion,
                                                     annotated=annotated, seed=seed, labels_of=annotated_labels)
        position = {c: j for j, c in enumerate(naming.clusters)}
        renamed = {c: n for c, n in named.items() if n != naming.label[position[c]]}
        if siblings or renamed:
            # The step names cells inside known clusters and changes no other call: every
            # cluster keeps the name (or the call "new") and the evidence the matching gave it,
            # a renamed one takes its new name as known, a part its sibling's name. Matching
            # again would hand the names the parts now carry to other clusters, or push a
            # cluster that holds one out to another name or to "new".
            decided = {c: (str(naming.compared_name[j]), float(naming.evidence[j]),
                           naming.clusters[naming.part_of[j]] if naming.part_of[j] >= 0 else None)
                       for j, c in enumerate(naming.clusters)}
            decided.update({c: (n, 0.0, decided[c][2]) for c, n in renamed.items()})
            decided = _decided(siblings, decided)
            assignment = with_parts(assignment, siblings)
            decided = _shared_names(decided, _given(siblings, naming) | set(renamed), store, rows,
                                    embedding, assignment, naming, rng=np.random.default_rng(seed),
                                    spread_of=spread_of)
            naming = name(assignment, decided)
            parts = parts + siblings
        if resolved:
            naming = with_sibling_probabilities(naming, assignment, resolved)
    return naming, assignment, parts


def with_sibling_probabilities(naming: NamingResult, assignment: np.ndarray,
                               resolved: Sequence[tuple[np.ndarray, tuple[str, ...], np.ndarray]]) -> NamingResult:
    """``naming`` with the name probabilities of resolved cells shared out among their sibling
    names by the classifier: the kernel's total on the siblings times the classifier's
    probability of each. The closest name and the confidence follow. A cluster holding resolved
    cells (``assignment``: each cell's cluster) shares its own kernel total on the siblings by
    the classifier's mean probabilities over those cells, so its description agrees with its
    name."""
    probs = np.array(naming.cell_name_probabilities, dtype=np.float64)
    cluster_probs = np.array(naming.name_probabilities, dtype=np.float64)
    names = np.asarray(naming.names).astype(str)
    code = np.searchsorted(np.asarray(naming.clusters), np.asarray(assignment))
    for cells, group, proba in resolved:
        cols = np.searchsorted(names, np.asarray(group))
        mass = probs[np.ix_(cells, cols)].sum(axis=1, keepdims=True)
        probs[np.ix_(cells, cols)] = mass * proba
        for j in np.unique(code[cells]):
            mine = code[cells] == j
            cluster_probs[j, cols] = cluster_probs[j, cols].sum() * proba[mine].mean(axis=0)
    label = np.asarray(naming.cell_type).astype(str)
    own = np.where(naming.cell_is_novel, -1, np.searchsorted(names, label).clip(0, names.size - 1))
    p_label = np.where(own >= 0, probs[np.arange(probs.shape[0]), own.clip(0)], 0.0)
    confidence = np.where(naming.cell_is_novel, naming.cell_novelty, p_label * (1.0 - naming.cell_novelty))
    naming = with_cluster_probabilities(naming, cluster_probs)
    return dataclasses.replace(naming, cell_name_probabilities=probs.astype(np.float32),
                               cell_closest=np.asarray(naming.names)[np.argmax(probs, axis=1)],
                               confidence=confidence)


def _swapped(naming: NamingResult, store: Any, rows: np.ndarray, assignment: np.ndarray, *,
             labels_of: Callable[[], dict[str, tuple[int, np.ndarray, np.ndarray]]], rng: np.random.Generator,
             spread_of: Callable[[str, np.ndarray, np.ndarray], float] | None = None,
             max_cells: int = 1000) -> dict[Any, tuple[str, float, Any]]:
    """Calls to swap (for :func:`mars_scale.naming.name_clusters`'s ``decided``): a cluster that
    the matching called new, compared with a name that one known cluster holds, is that name's
    type, and the holder is new, where in expression the reference's cells of the name lie
    nearer the new cluster than the holder (along the difference of their mean expression, at
    least ``SWAP_SHARE`` of the way from the holder's median to the new cluster's) and the two are
    two populations (:func:`_apart`). The matching goes the wrong way where a new type's cells
    sit nearer a known type's prototype in the embedding than that type's own cells (a
    reference with one type left, say); the new experiment's two clusters share its batch, so
    the direction between them is theirs. ``labels_of``: the annotated labels, read on demand."""
    label = np.asarray(naming.label).astype(str)
    out: dict[Any, tuple[str, float, Any]] = {}
    for j in np.flatnonzero(naming.is_novel):
        name = str(naming.compared_name[j])
        holders = np.flatnonzero((label == name) & ~np.asarray(naming.is_novel))
        c = naming.clusters[j]
        if holders.size != 1 or naming.clusters[holders[0]] in out:
            continue
        o = naming.clusters[holders[0]]
        cells = _sample(np.flatnonzero(assignment == c), max_cells, rng)
        owner = _sample(np.flatnonzero(assignment == o), max_cells, rng)
        if min(cells.size, owner.size) < 10:
            continue
        pooled = np.sort(np.concatenate([cells, owner]))
        matrix = normalized_rows(store, rows[pooled], dtype=np.float32)
        new_cells, owner_cells = matrix[np.searchsorted(pooled, cells)], matrix[np.searchsorted(pooled, owner)]
        w = np.asarray(new_cells.mean(axis=0) - owner_cells.mean(axis=0), dtype=np.float64).ravel()
        at_new, at_owner = (float(np.median(np.asarray(m @ w).ravel())) for m in (new_cells, owner_cells))
        split = {"name": name, "genes": np.arange(w.size), "w": w}
        medians = _reference_projections(store, [split], naming, labels_of=labels_of(), sibling_share=0.0,
                                         max_cells=max_cells, rng=rng)[0]["medians"]
        reference = [m[name] for m in medians.values() if name in m]
        if not reference or at_new == at_owner:
            continue
        share = (float(np.median(reference)) - at_owner) / (at_new - at_owner)
        if share < SWAP_SHARE or _apart(store, rows, cells, owner, rng=rng, spread_of=spread_of, name=name) == 0.0:
            continue
        logger.info("cluster %s (new) and cluster %s (%s): the reference's %s cells lie %.2f of the way from the "
                    "second to the first in expression; the first is %s, the second new", c, o, name, name, share,
                    name)
        out[c] = (name, 0.0, None)
        out[o] = (name, max(1.0, float(naming.evidence[j])), None)
    return out


def _holding(decided: dict[Any, tuple[str, float, Any]], naming: NamingResult) -> dict[Any, tuple[str, float, Any]]:
    """The clusters not in ``decided`` that ``naming`` called known under a name ``decided`` gives
    as known (evidence below 1), with that name and their evidence: a decided name leaves the
    matching, so without this a cluster sharing it (a part the matching took for the same type,
    or a cluster whose name a known part now takes) would be matched again without it."""
    taken = {name for name, evidence, _ in decided.values() if evidence < 1.0}
    return {c: (str(naming.compared_name[j]), float(naming.evidence[j]), None)
            for j, c in enumerate(naming.clusters)
            if c not in decided and not naming.is_novel[j] and str(naming.compared_name[j]) in taken}


def _given(parts: Sequence[Part], naming: NamingResult) -> set:
    """The clusters that ``parts`` named: the known parts, and the clusters they were split from
    that take another name than ``naming`` gave them."""
    label = dict(zip(naming.clusters, np.asarray(naming.label).astype(str)))
    return ({p.new_cluster for p in parts if not p.novel}
            | {p.cluster for p in parts if p.parent_name is not None and p.parent_name != label[p.cluster]})


def _shared_names(decided: dict[Any, tuple[str, float, Any]], given: set, store: Any, rows: np.ndarray,
                  embedding: np.ndarray, assignment: np.ndarray, naming: NamingResult, *,
                  rng: np.random.Generator, spread_of: Callable[[str, np.ndarray, np.ndarray], float] | None = None,
                  **split_options: int) -> dict[Any, tuple[str, float, Any]]:
    """``decided`` with every other cluster that holds a name the split test or the sibling step
    gave to cells (the clusters ``given``) judged against those cells.

    A new cluster near a known type whose cells the embedding merged into their sibling's
    cluster is matched to that type by elimination; once a step finds the type's own cells,
    the name is no longer free. A cluster holding the name (evidence below 1) that lies
    farther than those cells from the name's prototype in the embedding is new if, in the
    expression of the new cells (one experiment, so no batch between them), it and they are
    two populations: their cells pooled split in two as the split test splits a cluster
    (:func:`_split`, replicated, ``d'`` at least ``MIN_DPRIME``, not along the cells' quality)
    with the two groups on opposite sides (:func:`_apart`, with ``split_options``), and the
    reference's experiments of the name do not differ as much along the split (``spread_of``,
    as in :func:`find_parts`).
    Otherwise it keeps the name: one type that the clustering cut in two, or cut along a
    condition the reference holds in separate experiments.
    """
    names = np.asarray(naming.names).astype(str)
    holders: dict[str, list[Any]] = {}
    for c in given:
        if decided[c][1] < 1.0:
            holders.setdefault(decided[c][0], []).append(c)
    owners = {n: np.flatnonzero(np.isin(assignment, held)) for n, held in holders.items()}
    prototypes = {n: naming.prototypes[int(np.flatnonzero(names == n)[0])] for n in holders}
    owner_distance = {n: np.linalg.norm(np.asarray(embedding[owners[n]]).mean(axis=0) - prototypes[n])
                      for n in holders}
    out = dict(decided)
    for c, (n, e, of) in decided.items():
        if n not in holders or c in given or e >= 1.0:
            continue
        cells = np.flatnonzero(assignment == c)
        if np.linalg.norm(np.asarray(embedding[cells]).mean(axis=0) - prototypes[n]) <= owner_distance[n]:
            continue
        margin = _apart(store, rows, cells, owners[n], rng=rng, spread_of=spread_of, name=n, **split_options)
        if margin == 0.0:
            continue
        logger.info("cluster %s (%s): a step found %s's own cells nearer its prototype, and the cluster and "
                    "they are two populations in expression; new", c, n, n)
        out[c] = (n, margin, of)
    return out


def _like_new_parts(parts: Sequence[Part], naming: NamingResult, store: Any, rows: np.ndarray,
                    assignment: np.ndarray, *, rng: np.random.Generator,
                    spread_of: Callable[[str, np.ndarray, np.ndarray], float] | None = None,
                    **split_options: int) -> dict[Any, tuple[str, float, Any]]:
    """Clusters that the matching took for parts of a cluster's type (``naming.split_of``) whose
    cluster the split test split a new part from, and that are in expression the new part's
    population and not the known rest's: new, with the part's evidence.

    The matching judges such a cluster in the embedding, where a new type's cells can sit as
    close to a known type as that type's own cells cut in two by the clustering; once the split
    test finds the new type's cells inside the known cluster, the two comparisons say which the
    cluster is. Both are asked so that sparse cells, which no split tells apart, change
    nothing."""
    out = {}
    for part in parts:
        if not part.novel:
            continue
        owner = int(np.flatnonzero(naming.clusters == part.cluster)[0])
        rest = np.flatnonzero(assignment == part.cluster)
        reference = {"spread_of": spread_of, "name": part.name}
        for j in np.flatnonzero((naming.split_of == owner) & ~naming.is_novel):
            cells = np.flatnonzero(assignment == naming.clusters[j])
            if _apart(store, rows, cells, part.cells, rng=rng, **reference, **split_options) > 0.0:
                continue  # not the new part's population
            margin = _apart(store, rows, cells, rest, rng=rng, **reference, **split_options)
            if margin == 0.0:
                continue
            logger.info("cluster %s (taken for part of cluster %s's %s): the population of the new part split "
                        "from it, and not of its known rest; new", naming.clusters[j], part.cluster, part.name)
            out[naming.clusters[j]] = (part.name, max(margin, part.evidence), None)
    return out


def _apart(store: Any, rows: np.ndarray, first: np.ndarray, second: np.ndarray, *, rng: np.random.Generator,
           spread_of: Callable[[str, np.ndarray, np.ndarray], float] | None = None, name: str = "",
           max_cells: int = 1000, n_genes: int = 500, n_components: int = 20, min_part_cells: int = 10) -> float:
    """Whether two groups of the new cells (positions among ``rows``) are two populations in
    expression: the margin (at least 1) of the split test's cross-fitted split (:func:`_split`)
    of their cells pooled, with the groups' cells mostly on opposite sides; 0 otherwise (no
    split, a split within the groups, too few cells, or a split along which the reference's
    experiments of ``name`` lie ``EXPERIMENT_SPREAD`` of its gap apart: ``spread_of(name, genes,
    w)``)."""
    first, second = _sample(first, max_cells, rng), _sample(second, max_cells, rng)
    if min(first.size, second.size) < min_part_cells:
        return 0.0
    pooled = np.concatenate([first, second])
    order = np.argsort(pooled)
    matrix = normalized_rows(store, rows[pooled[order]], dtype=np.float32)[np.argsort(order)]
    split = _split(matrix, n_genes=n_genes, n_components=n_components, min_part_cells=min_part_cells, rng=rng,
                   mito=mitochondrial_genes(store.gene_ids))
    if split is None:
        return 0.0
    side = (matrix[:, split["genes"]] @ split["w"]) > split["cut"]
    if np.median(side[:first.size]) == np.median(side[first.size:]):
        return 0.0  # two populations, but not these two groups
    if spread_of is not None and spread_of(name, split["genes"], split["w"]) >= EXPERIMENT_SPREAD * split["gap"]:
        return 0.0  # as far apart as the reference's own experiments of the name
    return max(1.0, split["margin"])


def _decided(parts: Sequence[Part], decided: dict[Any, tuple[str, float, Any]]) -> dict[Any, tuple[str, float, Any]]:
    """``decided`` (for :func:`mars_scale.naming.name_clusters`) with the calls of ``parts``."""
    out = dict(decided)
    for p in parts:
        out[p.new_cluster] = (p.name, p.evidence, p.cluster)
        if p.parent_name is not None:
            out[p.cluster] = (p.parent_name, 0.0, out[p.cluster][2] if p.cluster in out else None)
    return out


def resolve_siblings(
    store: Any,
    rows: np.ndarray,
    assignment: np.ndarray,
    naming: NamingResult,
    confusion: np.ndarray,
    *,
    annotated: Sequence[str],
    label_key: str = "cell_type",
    max_cells: int = 1000,
    n_genes: int = 2000,
    sibling_share: float = 0.5,
    separated: float = EMBEDDING_SEPARATES,
    min_gain: float = CLASSIFIER_GAIN,
    min_part_cells: int = 10,
    seed: int | None = 0,
    labels_of: Callable[[], dict[str, tuple[int, np.ndarray, np.ndarray]]] | None = None,
) -> tuple[list[Part], dict[Any, str], list[tuple[np.ndarray, tuple[str, ...], np.ndarray]]]:
    """Known siblings that the embedding does not separate, resolved per cell on expression.

    For each cluster called known, named ``X``: its siblings are the names whose prototype lies
    within ``sibling_share`` of the median distance between prototypes from ``X``'s and that
    the embedding does not tell apart from ``X`` even on the annotated cells it was trained on
    (the share of the pair's annotated cells whose nearest annotated landmark has their own
    name, from ``confusion``, below ``separated``); where it tells them all apart there, the
    close names themselves (the new cells may still mix them). A logistic regression on the
    log-normalised expression of the reference's cells of ``X`` and its siblings (at most
    ``max_cells`` per name over all annotated experiments, the ``n_genes`` most variable genes,
    standardised) is fitted with annotated experiments left out in turn (at most five, the
    largest). For each cluster, it is used only if its mean balanced accuracy on the left-out
    experiments beats by ``min_gain`` the embedding's accuracy on the same names or the
    estimated share of the cluster's cells that its name fits (:func:`own_share`, from the
    classifier's calls on the cluster and its left-out confusion). Fitted on all of them, it
    names each cell of the cluster: the cluster takes the name most of its cells get, and the
    cells of each other name (at least ``min_part_cells``) become a part under that name.

    Cost per sibling group: reading at most ``max_cells`` reference cells per name, at most six
    logistic regressions on them, and one pass over the cells of its clusters.

    Parameters
    ----------
    store, rows, assignment, naming, annotated, label_key
        As in :func:`find_parts`.
    confusion
        ``(N, N)`` :func:`mars_scale.naming.name_confusion` over the annotated cells, in the order
        of ``naming.names``.
    max_cells, n_genes, sibling_share, min_part_cells, seed
        See above; ``seed`` seeds the samples.
    labels_of
        As in :func:`find_parts`.
    separated, min_gain
        See above.

    Returns
    -------
    parts : list of Part
        Known parts (``novel=False``) under a sibling's name.
    named : dict
        Every cluster the step judged (resolved or kept): its name, that of most of its cells
        when resolved (a sibling's if they are mostly that sibling).
    resolved : list
        Per resolved cluster ``(cells, names, probabilities)``: its cells (positions among the
        new cells), its sibling names and the classifier's ``(len(cells), len(names))``
        probabilities of them.
    """
    rng = np.random.default_rng(seed)
    names = np.asarray(naming.names).astype(str)
    confusion = np.asarray(confusion, dtype=np.float64)
    if confusion.shape != (names.size, names.size):
        raise ValueError(f"confusion must be {names.size} x {names.size} (the naming's names), got {confusion.shape}")
    groups = {}
    for j, c in enumerate(naming.clusters):
        if naming.is_novel[j] or str(naming.label[j]) not in names:
            continue
        group = _unseparated_siblings(naming, confusion, str(naming.label[j]), sibling_share, separated)
        if len(group) == 1:  # separated on the annotated cells it was trained on; the new cells may mix them
            k = int(np.flatnonzero(names == str(naming.label[j]))[0])
            group = tuple(sorted(names[_close_names(naming, k, sibling_share)].tolist()))
        if len(group) > 1:
            groups.setdefault(group, []).append(j)
    parts: list[Part] = []
    named: dict[Any, str] = {}
    resolved: list[tuple[np.ndarray, tuple[str, ...], np.ndarray]] = []
    next_id = int(np.max(np.asarray(naming.clusters, dtype=np.int64))) + 1 if len(naming.clusters) else 0
    reference_labels = ((labels_of or (lambda: _annotated_labels(store, annotated, label_key)))()
                        if groups else {})
    for group, members_of in groups.items():
        fitted = _sibling_classifier(store, group, reference_labels, max_cells=max_cells, n_genes=n_genes,
                                     min_cells=min_part_cells, rng=rng)
        if fitted is None:
            continue
        k = np.searchsorted(names, group)
        block = confusion[np.ix_(k, k)]
        embedded = float(np.trace(block) / block.sum()) if block.sum() > 0 else 0.0
        for j in members_of:
            c = naming.clusters[j]
            members = np.flatnonzero(assignment == c)
            proba = _name_probabilities(store, rows[members], fitted)
            predicted = np.argmax(proba, axis=1)
            counts = np.bincount(predicted, minlength=len(group))
            share = own_share(counts, fitted["confusion"], group.index(str(naming.label[j])))
            if fitted["accuracy"] < min(embedded, share) + min_gain:
                logger.info("cluster %s (%s): expression tells %s apart with balanced accuracy %.3f on left-out "
                            "annotated experiments; the embedding %.3f on the annotated cells, and the cluster's "
                            "name fits an estimated %.3f of its cells; kept", c, naming.label[j], ", ".join(group),
                            fitted["accuracy"], embedded, share)
                named[c] = str(naming.label[j])
                continue
            resolved.append((members, group, proba))
            keep = int(np.argmax(counts))
            named[c] = group[keep]
            for g in np.flatnonzero(counts >= min_part_cells):
                if g == keep:
                    continue
                parts.append(Part(cluster=c, new_cluster=next_id, cells=members[predicted == g], novel=False,
                                  name=group[g], parent_name=group[keep], dprime=float("nan"),
                                  other_dprime=float("nan"), reference_dprime=float("nan"), evidence=0.0,
                                  siblings=group, genes=fitted["genes_up"][g], accuracy=fitted["accuracy"]))
                next_id += 1
            logger.info("cluster %s (%s): siblings %s resolved on expression (balanced accuracy %.3f against "
                        "the embedding's %.3f and the name's estimated share %.3f): %s", c, naming.label[j],
                        ", ".join(group), fitted["accuracy"], embedded, share,
                        ", ".join(f"{group[g]} {int(counts[g])}" for g in np.flatnonzero(counts)))
    return parts, named, resolved


def own_share(counts: np.ndarray, confusion: np.ndarray, own: int) -> float:
    """The estimated share of a cluster's cells that truly have name ``own``, from how many of
    them a classifier gave each name (``counts``) and how it confuses the names (``confusion``,
    rows: true name, columns: the predicted name's share, from left-out annotated
    experiments): the shares ``m`` that best explain the counts, ``counts / n ~ confusion^T m``
    (non-negative least squares, normalised to sum to 1), read at ``own``.

    With two names and a classifier right for a share ``a`` of each, ``m = (p - (1 - a)) /
    (2a - 1)``: the raw share ``p`` corrected for the classifier's errors, so a cluster of one
    name reads 1 however often the classifier errs on it.
    """
    from scipy.optimize import nnls

    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() <= 0:
        return 1.0
    shares, _ = nnls(np.asarray(confusion, dtype=np.float64).T, counts / counts.sum())
    total = shares.sum()
    return float(shares[own] / total) if total > 0 else 1.0


def _close_names(naming: NamingResult, k: int, sibling_share: float) -> np.ndarray:
    """Which names' prototypes lie within ``sibling_share`` of the median distance between
    prototypes from name ``k``'s (``k`` itself included)."""
    from scipy.spatial.distance import pdist

    prototypes = naming.prototypes
    scale = float(np.median(pdist(prototypes))) if prototypes.shape[0] > 1 else np.inf
    near = np.linalg.norm(prototypes - prototypes[k], axis=1) < sibling_share * scale
    near[k] = True
    return near


def _annotated_labels(store: Any, annotated: Sequence[str],
                      label_key: str) -> dict[str, tuple[int, np.ndarray, np.ndarray]]:
    """Per annotated experiment: its first row, its cells' label codes and the categories."""
    out = {}
    for e in annotated:
        lo, hi = store.experiment_ranges[e]
        codes, cats = store.categorical_codes(label_key, lo, hi)
        out[e] = (lo, codes, np.asarray(cats, dtype=object))
    return out


def _unseparated_siblings(naming: NamingResult, confusion: np.ndarray, name: str, sibling_share: float,
                          separated: float) -> tuple[str, ...]:
    """``name`` and the names near it that the embedding confuses with it, sorted."""
    names = np.asarray(naming.names).astype(str)
    if names.size < 2:
        return (name,)
    k = int(np.flatnonzero(names == name)[0])
    near = _close_names(naming, k, sibling_share)
    group = [name]
    for m in np.flatnonzero(near):
        if m == k:
            continue
        pair = confusion[np.ix_([k, m], [k, m])]
        if pair.sum() > 0 and np.trace(pair) / pair.sum() < separated:
            group.append(str(names[m]))
    return tuple(sorted(group))


def _sibling_classifier(store: Any, group: tuple[str, ...], labels_of: dict[str, tuple[int, np.ndarray, np.ndarray]],
                        *, max_cells: int, n_genes: int, min_cells: int, rng: np.random.Generator,
                        max_folds: int = 5) -> dict | None:
    """A logistic regression telling ``group``'s names apart on the reference's expression (at
    most ``max_cells`` cells per name over all annotated experiments), with its mean balanced
    accuracy over left-out annotated experiments (the ``max_folds`` largest); ``None`` when no
    annotated experiment can be left out (two names with ``min_cells`` cells in it, both in the
    rest)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score

    rows_of: list[list[np.ndarray]] = [[] for _ in group]  # per name, its cells in each annotated experiment
    for lo, codes, cats in labels_of.values():
        cats = cats.astype(str)
        for g, n in enumerate(group):
            hits = np.flatnonzero(cats == n)
            rows_of[g].append(lo + np.flatnonzero(codes == hits[0]) if hits.size else np.zeros(0, np.int64))
    rows, labels, origin = [], [], []
    for g, per_experiment in enumerate(rows_of):  # at most max_cells per name over all experiments
        where = np.concatenate([np.full(r.size, i) for i, r in enumerate(per_experiment)])
        take = _sample(np.arange(where.size), max_cells, rng)
        rows.append(np.concatenate(per_experiment)[take])
        labels.append(np.full(take.size, g))
        origin.append(where[take])
    rows_all = np.concatenate(rows)
    if rows_all.size == 0:
        return None
    order = np.argsort(rows_all, kind="stable")
    rows_all, y, origin_all = rows_all[order], np.concatenate(labels)[order], np.concatenate(origin)[order]
    matrix = normalized_rows(store, rows_all, dtype=np.float32)
    mean = np.asarray(matrix.mean(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(matrix.multiply(matrix).mean(axis=0), dtype=np.float64).ravel()
    genes = np.sort(np.argsort(-(sq - mean**2), kind="stable")[:n_genes])
    x = matrix[:, genes].toarray()
    folds = []  # annotated experiments that can be left out: two names with min_cells cells, both fitted
    for i in np.unique(origin_all):
        test, fit = origin_all == i, origin_all != i
        test_names = [g for g in np.unique(y[test]) if (y[test] == g).sum() >= min_cells]
        if len(test_names) >= 2 and set(test_names) <= set(np.unique(y[fit]).tolist()):
            folds.append((int(test.sum()), i, test_names))
    scores = []
    confusion = np.zeros((len(group), len(group)))  # left-out cells: true name x predicted name
    for _, i, test_names in sorted(folds, reverse=True)[:max_folds]:  # the largest
        test, fit = origin_all == i, origin_all != i
        model = _fit_logistic(x[fit], y[fit], LogisticRegression)
        mine = test & np.isin(y, test_names)
        predicted = np.argmax(model["proba"](x[mine]), axis=1)
        np.add.at(confusion, (y[mine], predicted), 1)
        with warnings.catch_warnings():  # a name predicted that the left-out experiment lacks: just wrong
            warnings.simplefilter("ignore", UserWarning)
            scores.append(balanced_accuracy_score(y[mine], predicted))
    if not scores:
        return None
    seen = confusion.sum(axis=1) > 0  # a name never left out: taken as told apart
    confusion[~seen] = np.eye(len(group))[~seen]
    confusion /= confusion.sum(axis=1, keepdims=True)
    fitted = _fit_logistic(x, y, LogisticRegression)
    coef = fitted["coef"]
    coef = np.vstack([coef, np.zeros((len(group) - coef.shape[0], coef.shape[1]))])  # names with no cells
    genes_up = [tuple(str(store.gene_ids[genes[i]]) for i in np.argsort(-coef[g])[:5]) for g in range(len(group))]
    return {"group": group, "genes": genes, "accuracy": float(np.mean(scores)), "confusion": confusion,
            "genes_up": genes_up, **fitted}


def _fit_logistic(x: np.ndarray, y: np.ndarray, estimator) -> dict[str, Any]:
    """A standardised logistic regression; ``proba`` maps raw rows to a probability per class
    code of ``y`` (0 for codes it never saw); ``coef`` holds one row per code (how much each
    gene favours it)."""
    center = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    model = estimator(C=CLASSIFIER_C, max_iter=1000).fit((x - center) / scale, y)
    coef = np.zeros((int(y.max()) + 1, x.shape[1]))
    if model.classes_.size == 2:
        coef[model.classes_[1]], coef[model.classes_[0]] = model.coef_[0], -model.coef_[0]
    else:
        coef[model.classes_] = model.coef_
    n_classes = coef.shape[0]

    def proba(rows: np.ndarray) -> np.ndarray:
        out = np.zeros((rows.shape[0], n_classes))
        out[:, model.classes_] = model.predict_proba((rows - center) / scale)
        return out

    return {"proba": proba, "coef": coef}


def _name_probabilities(store: Any, rows: np.ndarray, fitted: dict[str, Any], block: int = 65_536) -> np.ndarray:
    """``(len(rows), len(group))``: the classifier's probability of each name of its group for
    each of ``rows`` (sorted store rows)."""
    out = np.zeros((rows.shape[0], len(fitted["group"])))
    for begin in range(0, rows.shape[0], block):
        part = normalized_rows(store, rows[begin:begin + block], dtype=np.float32)
        out[begin:begin + block] = fitted["proba"](part[:, fitted["genes"]].toarray())
    return out


def with_parts(assignment: np.ndarray, parts: Sequence[Part]) -> np.ndarray:
    """``assignment`` with the cells of each part moved to the part's new cluster."""
    out = np.array(assignment, copy=True)
    for part in parts:
        out[part.cells] = part.new_cluster
    return out


def _sample(index: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    if index.size <= max_cells:
        return index
    return np.sort(rng.choice(index, size=max_cells, replace=False))


def _split(cells, *, n_genes: int, n_components: int, min_part_cells: int, rng: np.random.Generator,
           exclude: np.ndarray | None = None, mito: np.ndarray | None = None) -> dict[str, Any] | None:
    """Cross-fitted split of one cluster's sampled cells (sparse, log-normalised), or ``None``
    unless it replicates: the direction found on each random half must cut the other half in
    two (both bimodal). ``exclude``: ``(k, n_genes_all)`` directions over all genes whose span
    is projected out of the cells (on the genes chosen) first, so the split is orthogonal to
    them. ``None`` too for a split along the cells' quality (:func:`_quality_shift`, with the
    mitochondrial genes ``mito``)."""
    mean = np.asarray(cells.mean(axis=0), dtype=np.float64).ravel()
    sq = np.asarray(cells.multiply(cells).mean(axis=0), dtype=np.float64).ravel()
    genes = excess_variance_genes(mean, sq - mean**2, n_genes)
    x = cells[:, genes].toarray().astype(np.float64) - mean[genes]
    if exclude is not None and len(exclude):
        basis, _ = np.linalg.qr(np.asarray(exclude, dtype=np.float64)[:, genes].T)  # orthonormal span
        x -= (x @ basis) @ basis.T
    order = rng.permutation(x.shape[0])
    fit, test = x[np.sort(order[::2])], x[np.sort(order[1::2])]
    found = []
    for a, b in ((fit, test), (test, fit)):
        w = _two_means_direction(a, n_components=n_components, min_part_cells=min_part_cells, rng=rng)
        if w is None:
            return None
        projected = b @ w
        dprime, cut = bimodality(projected)
        threshold = bimodal_threshold(b.shape[0])
        if dprime < threshold:
            return None
        found.append((w, projected, dprime, cut, threshold))
    (w, projected, dprime, cut, threshold), (_, _, replicate, _, replicate_threshold) = found
    shift = _quality_shift(cells, x @ w > cut, mito)
    if shift >= QUALITY_SHARE * min(dprime, replicate):
        logger.debug("a split (d' %.2f) whose sides differ in the cells' quality by %.2f standard deviations; "
                     "not a cell type", dprime, shift)
        return None
    # the cut in the units of the raw projection (without the centring by the sampled mean)
    return {"genes": genes, "w": w, "dprime": dprime, "threshold": threshold,
            "margin": min(dprime / threshold, replicate / replicate_threshold),
            "cut": cut + float(mean[genes] @ w),
            "gap": float(projected[projected > cut].mean() - projected[projected <= cut].mean())}


def _quality_shift(cells, side: np.ndarray, mito: np.ndarray | None = None) -> float:
    """How far apart the two sides of a split lie in the cells' quality, in pooled standard
    deviations: the larger of the log number of genes detected and, with ``mito`` (the
    mitochondrial genes' columns), their share of the cell's normalised expression."""
    quality = [np.log1p(np.diff(cells.indptr))]
    if mito is not None and mito.size:
        level = cells.expm1()
        total = np.asarray(level.sum(axis=1)).ravel()
        quality.append(np.asarray(level[:, mito].sum(axis=1)).ravel() / np.maximum(total, 1e-12))
    shift = 0.0
    for q in quality:
        high, low = q[side], q[~side]
        if high.size < 2 or low.size < 2:
            continue
        spread = np.sqrt((high.var() * high.size + low.var() * low.size) / q.size)
        if spread > 0:
            shift = max(shift, abs(high.mean() - low.mean()) / spread)
    return float(shift)


def mitochondrial_genes(gene_ids: Sequence[str]) -> np.ndarray:
    """Columns of the genes named as mitochondrial (``MT-`` or ``mt-``, as 10x references name
    them; none for Ensembl identifiers)."""
    names = np.asarray(gene_ids, dtype=str)
    return np.flatnonzero(np.char.startswith(np.char.upper(names), "MT-"))


def _two_means_direction(x: np.ndarray, *, n_components: int, min_part_cells: int,
                         rng: np.random.Generator) -> np.ndarray | None:
    """Unit direction between the two K-means parts of ``x``'s top principal components, or
    ``None`` (too few cells, or a part below ``min_part_cells // 2``)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    k = int(min(n_components, x.shape[0] - 1, x.shape[1]))
    if k < 1:
        return None
    seed = int(rng.integers(2**31 - 1))
    scores = PCA(n_components=k, random_state=seed).fit_transform(x)
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(scores)
    if np.bincount(labels, minlength=2).min() < min_part_cells // 2:
        return None
    w = x[labels == 1].mean(axis=0) - x[labels == 0].mean(axis=0)
    norm = np.linalg.norm(w)
    return w / norm if norm > 0 else None


def _genes_up(store: Any, split: dict[str, Any], high_side: bool) -> tuple[str, ...]:
    raised = split["w"] if high_side else -split["w"]
    return tuple(str(store.gene_ids[g]) for g in split["genes"][np.argsort(-raised)[:5]])


def _new_part(store: Any, rows: np.ndarray, members: np.ndarray, embedding: np.ndarray, split: dict[str, Any],
              ref: dict[str, Any], naming: NamingResult, j: int, new_id: int, min_part_cells: int) -> Part | None:
    """The part of cluster ``j`` that the reference lacks: the side farther from its name's
    prototype in the embedding."""
    side = _side(store, rows[members], split)
    prototype = naming.prototypes[int(np.flatnonzero(naming.names == naming.compared_name[j])[0])]
    far = [float(np.linalg.norm(np.asarray(embedding[members[side == s]], dtype=np.float64).mean(axis=0)
                                - prototype)) if (side == s).any() else -np.inf for s in (False, True)]
    new_side = bool(far[1] > far[0])
    cells = members[side == new_side]
    if cells.size < min_part_cells or cells.size == members.size:
        return None
    evidence = min(split["margin"], 1.0 / max(split["other_ratio"], 1e-9),
                   1.0 / max(ref["ratio"], 1e-9))
    genes = _genes_up(store, split, new_side)
    name = str(naming.compared_name[j])
    logger.info("cluster %s (%s): %d of its %d cells form a population the reference lacks (d' %.2f; in the "
                "reference %.2f; evidence %.2f; up: %s)", naming.clusters[j], name, cells.size, members.size,
                split["dprime"], ref["dprime"], evidence, ", ".join(genes))
    return Part(cluster=naming.clusters[j], new_cluster=new_id, cells=cells, novel=True, name=name,
                parent_name=None, dprime=split["dprime"], other_dprime=split["other_dprime"],
                reference_dprime=ref["dprime"], evidence=float(evidence), siblings=ref["siblings"], genes=genes)


def _known_part(store: Any, rows: np.ndarray, members: np.ndarray, split: dict[str, Any], sides: tuple[str, str],
                ref: dict[str, Any], naming: NamingResult, j: int, new_id: int, min_part_cells: int) -> Part | None:
    """Cluster ``j`` holds two known siblings: the side of the one it was not named after
    becomes a part with that sibling's name (the cluster keeps the other)."""
    side = _side(store, rows[members], split)
    kept = str(naming.compared_name[j])
    moved_high = sides[1] != kept if kept in sides else side.sum() <= (~side).sum()
    cells = members[side == moved_high]
    if cells.size < min_part_cells or cells.size == members.size:
        return None
    name, parent_name = (sides[1], sides[0]) if moved_high else (sides[0], sides[1])
    logger.info("cluster %s (%s): two known types, %d of its %d cells are %s (d' %.2f; in the reference %.2f)",
                naming.clusters[j], kept, cells.size, members.size, name, split["dprime"], ref["dprime"])
    return Part(cluster=naming.clusters[j], new_cluster=new_id, cells=cells, novel=False, name=name,
                parent_name=parent_name, dprime=split["dprime"], other_dprime=split["other_dprime"],
                reference_dprime=ref["dprime"], evidence=0.0, siblings=ref["siblings"],
                genes=_genes_up(store, split, moved_high))


def _reference_projections(store: Any, splits: list[dict[str, Any]], naming: NamingResult, *,
                           labels_of: dict[str, tuple[int, np.ndarray, np.ndarray]], sibling_share: float,
                           max_cells: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per split, along its direction, the reference's cells of the cluster's name (or of
    ``split["name"]``) and its siblings per annotated experiment: the largest bimodality ratio
    (``d'`` over its threshold) and ``d'``, the siblings, and per experiment the median of each
    sibling's cells. ``labels_of``: :func:`_annotated_labels`."""
    names = np.asarray(naming.names).astype(str)
    wanted: list[dict[str, tuple[np.ndarray, np.ndarray]]] = []
    siblings_of = []
    for split in splits:
        if "name" in split:
            name = split["name"]
        else:
            name = str(naming.compared_name[int(np.flatnonzero(naming.clusters == split["cluster"])[0])])
        k = int(np.flatnonzero(names == name)[0])
        siblings = tuple(sorted(names[_close_names(naming, k, sibling_share)]))
        siblings_of.append(siblings)
        per_experiment = {}
        for e, (lo, codes, cats) in labels_of.items():
            ok = np.isin(cats, list(siblings))
            hits = _sample(np.flatnonzero((codes >= 0) & ok[np.maximum(codes, 0)]), max_cells, rng)
            per_experiment[e] = (lo + hits, cats[codes[hits]].astype(str) if hits.size else np.zeros(0, str))
        wanted.append(per_experiment)
    rows = np.unique(np.concatenate([r for per in wanted for r, _ in per.values()] + [np.zeros(0, np.int64)]))
    matrix = normalized_rows(store, rows, dtype=np.float32)
    out = []
    for split, per, siblings in zip(splits, wanted, siblings_of):
        found = {"ratio": 0.0, "dprime": 0.0, "siblings": siblings, "medians": {}}
        for e, (r, labels) in per.items():
            if r.size < 6:
                continue
            values = np.asarray(matrix[np.searchsorted(rows, r)][:, split["genes"]] @ split["w"]).ravel()
            dprime, _ = bimodality(values)
            ratio = dprime / bimodal_threshold(r.size)
            if ratio > found["ratio"]:
                found["ratio"], found["dprime"] = ratio, dprime
            found["medians"][e] = {n: float(np.median(values[labels == n])) for n in siblings
                                   if (labels == n).sum() >= 6}
        out.append(found)
    return out


def _known_sides(medians: dict[str, dict[str, float]], gap: float) -> tuple[str, str] | None:
    """Two sibling names that the split separates, (low side, high side): in every annotated
    experiment holding both, their cells' medians lie in the same order at least half the
    split's gap apart (the pair furthest apart when several are); else ``None``."""
    names = sorted({n for m in medians.values() for n in m})
    best, best_gap = None, 0.0
    for i, low in enumerate(names):
        for high in names[i + 1:]:
            gaps = [m[high] - m[low] for m in medians.values() if low in m and high in m]
            if not gaps or not (all(g >= 0.5 * gap for g in gaps) or all(g <= -0.5 * gap for g in gaps)):
                continue
            if abs(float(np.mean(gaps))) > best_gap:
                best_gap = abs(float(np.mean(gaps)))
                best = (low, high) if gaps[0] > 0 else (high, low)
    return best


def _reference_spread(store: Any, naming: NamingResult, name: str, genes: np.ndarray, w: np.ndarray, *,
                      labels_of: dict[str, tuple[int, np.ndarray, np.ndarray]], max_cells: int,
                      rng: np.random.Generator) -> float:
    """How far apart the annotated experiments' cells of ``name`` lie along ``w`` (on ``genes``):
    :func:`_experiment_spread` of their medians."""
    split = {"name": name, "genes": genes, "w": w}
    ref = _reference_projections(store, [split], naming, labels_of=labels_of, sibling_share=0.0,
                                 max_cells=max_cells, rng=rng)[0]
    return _experiment_spread(ref["medians"], name)


def _experiment_spread(medians: dict[str, dict[str, float]], name: str) -> float:
    """How far apart the annotated experiments' medians of ``name``'s cells lie along a split
    (largest less smallest; 0 with fewer than two experiments holding the name)."""
    values = [m[name] for m in medians.values() if name in m]
    return float(max(values) - min(values)) if len(values) > 1 else 0.0


def _side(store: Any, rows: np.ndarray, split: dict[str, Any], block: int = 65_536) -> np.ndarray:
    """Which side of the split's cut each of ``rows`` (sorted store rows) falls on."""
    side = np.zeros(rows.shape[0], dtype=bool)
    for begin in range(0, rows.shape[0], block):
        part = normalized_rows(store, rows[begin:begin + block], dtype=np.float32)
        side[begin:begin + block] = (part[:, split["genes"]] @ split["w"]) > split["cut"]
    return side
