"""Per-gene and per-cell statistics in one streaming pass over row blocks.

Per-gene moments of the log1p-normalised values are accumulated in float64 as
``(count, mean, M2)`` per block and merged with Chan et al.'s parallel update, so blocks can be
computed anywhere (a thread, a dask worker) and merged in a fixed order: the result does not
depend on where the blocks ran.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from mars_scale.preprocess import normalize_log1p

__all__ = [
    "GeneMoments",
    "MomentAccumulator",
    "block_moments",
    "merge_moments",
    "compute_stats",
    "HighlyVariableGenes",
    "highly_variable_genes",
    "TARGET_SUM",
]

logger = logging.getLogger(__name__)

TARGET_SUM = 1e4


@dataclass(frozen=True)
class GeneMoments:
    """Mergeable per-gene moments over a set of cells.

    Attributes
    ----------
    n_obs
        Number of cells.
    mean, m2
        Per-gene mean and sum of squared deviations (float64).
    n_cells
        Per-gene number of cells with a non-zero value.
    """

    n_obs: int
    mean: np.ndarray
    m2: np.ndarray
    n_cells: np.ndarray

    @property
    def std(self) -> np.ndarray:
        """Sample standard deviation (ddof = 1), as scanpy's ``scale`` (and so MARS) uses."""
        if self.n_obs < 2:
            return np.zeros_like(self.mean)
        return np.sqrt(np.maximum(self.m2 / (self.n_obs - 1), 0.0))


def block_moments(block: sp.csr_matrix, *, kind: str, target_sum: float = TARGET_SUM) -> GeneMoments:
    """Per-gene moments of the log1p-normalised values of one CSR block of raw values."""
    n, g = block.shape
    values = normalize_log1p(
        block.indptr, block.indices, block.data, target_sum=target_sum, kind=kind, dtype=np.float64
    )
    s1 = np.bincount(block.indices, weights=values, minlength=g)
    s2 = np.bincount(block.indices, weights=values * values, minlength=g)
    nz = np.bincount(block.indices, minlength=g).astype(np.int64)
    if n == 0:
        return GeneMoments(0, np.zeros(g), np.zeros(g), nz)
    mean = s1 / n
    # Within one block (a few thousand rows of values below ~12) the two-sum form is accurate
    # in float64; blocks are then merged with Chan's update.
    m2 = np.maximum(s2 - n * mean * mean, 0.0)
    return GeneMoments(n, mean, m2, nz)


def merge_moments(a: GeneMoments, b: GeneMoments) -> GeneMoments:
    """Chan's parallel merge of two moment sets."""
    if a.n_obs == 0:
        return GeneMoments(b.n_obs, b.mean, b.m2, a.n_cells + b.n_cells)
    if b.n_obs == 0:
        return GeneMoments(a.n_obs, a.mean, a.m2, a.n_cells + b.n_cells)
    n = a.n_obs + b.n_obs
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.n_obs / n)
    m2 = a.m2 + b.m2 + delta * delta * (a.n_obs * b.n_obs / n)
    return GeneMoments(n, mean, m2, a.n_cells + b.n_cells)


def _tree_merge(parts: list):
    """Merge in a fixed pairwise order; works on values and on dask delayed objects alike.

    The same blocks give bit-identical results wherever they ran.
    """
    import dask

    merge = dask.delayed(merge_moments) if parts and hasattr(parts[0], "dask") else merge_moments
    while len(parts) > 1:
        nxt = [merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            nxt.append(parts[-1])
        parts = nxt
    return parts[0]


class MomentAccumulator:
    """Merge a stream of block moments with O(log n_blocks) memory (a binary counter)."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, GeneMoments]] = []

    def add(self, part: GeneMoments) -> None:
        level = 0
        while self._stack and self._stack[-1][0] == level:
            _, prev = self._stack.pop()
            part = merge_moments(prev, part)
            level += 1
        self._stack.append((level, part))

    def result(self) -> GeneMoments:
        if not self._stack:
            raise ValueError("no blocks were added")
        out = self._stack[-1][1]
        for _, prev in reversed(self._stack[:-1]):
            out = merge_moments(prev, out)
        return out


@functools.lru_cache(maxsize=2)
def _opened(path: str, call: str):
    """The store at ``path``, opened once per process for one :func:`compute_stats` call.

    Opening reads the store's metadata (about 30 ms); once per block it cost more than the
    statistics of a 1,000-row block.
    """
    from mars_scale.store import open_store

    return open_store(path)


def compute_stats(store, *, rows_per_block: int | None = None, client=None):
    """Recompute the per-gene statistics of a store over dask blocks.

    Parameters
    ----------
    store
        An :class:`~mars_scale.store.Atlas` (from :func:`~mars_scale.store.open_store`).
    rows_per_block
        Rows per dask task (default: one chunk of the store).
    client
        A ``dask.distributed.Client`` to run on; the default runs on the local threaded
        scheduler. Results are identical either way.

    Returns
    -------
    GeneMoments
        Over all cells of the store.
    """
    import dask

    path, kind = str(store.path), store.input_kind
    blocks = store.row_blocks(rows_per_block=rows_per_block)
    call = uuid.uuid4().hex  # one opening per process and call, never a stale one

    def one(a: int, b: int) -> GeneMoments:
        return block_moments(_opened(path, call).read_rows(a, b), kind=kind)

    total = _tree_merge([dask.delayed(one)(a, b) for a, b in blocks])
    if client is not None:
        result = client.compute(total).result()
    else:
        (result,) = dask.compute(total, scheduler="threads")
        _opened.cache_clear()  # this process's opening (workers' expire with their cache)
    logger.info("statistics over %d cells in %d blocks", result.n_obs, len(blocks))
    return result


# ---------------------------------------------------------------------------------------------
# highly variable genes (seurat_v3 flavour, over experiments)


@dataclass(frozen=True)
class HighlyVariableGenes:
    """Genes chosen by :func:`highly_variable_genes`, with the statistics scanpy reports.

    Attributes
    ----------
    index
        Store positions of the chosen genes, ascending (store order).
    highly_variable_rank
        Per gene: median over experiments of its rank by normalised variance, among the
        experiments where it is within the top ``n_top_genes``; NaN elsewhere
        (scanpy's ``var['highly_variable_rank']``).
    highly_variable_nbatches
        Per gene: the number of experiments where it is within the top ``n_top_genes``.
    variances_norm
        Per gene: mean over experiments of the variance of its standardised, clipped counts.
    means, variances
        Per gene: mean and variance (ddof = 1) of the raw counts over all cells.
    experiments
        The experiments the ranks came from (those with at least 2 cells).
    n_top_genes
        The number asked for (``len(index)`` is at most this).
    """

    index: np.ndarray
    highly_variable_rank: np.ndarray
    highly_variable_nbatches: np.ndarray
    variances_norm: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    experiments: tuple[str, ...]
    n_top_genes: int


def _loess_fit(x: np.ndarray, y: np.ndarray, *, span: float, n_vertices: int = 2048) -> np.ndarray:
    """Fitted values of a local quadratic regression (loess, degree 2) of ``y`` on ``x``.

    The local fit at a point uses its ``floor(span * n)`` nearest neighbours in ``x`` with
    tricube weights, as ``skmisc.loess(x, y, span=span, degree=2)``, which scanpy's
    ``seurat_v3`` uses. The fit is computed exactly at every distinct value of ``x`` when there
    are at most ``n_vertices`` of them (log10 mean counts take few distinct values: 2,469 for
    20,411 genes of a CEL-seq2 experiment); beyond that, like loess's default
    ``surface="interpolate"``, exactly at ``n_vertices`` vertices (spread evenly over the sorted
    values and over their range) and by cubic Hermite interpolation of values and slopes
    between them (skmisc places a few dozen vertices on a k-d tree).
    """
    n = x.shape[0]
    if n == 0:
        return np.zeros(0)
    order = np.argsort(x, kind="stable")
    xs, ys = x[order].astype(np.float64), y[order].astype(np.float64)
    q = min(n, max(int(np.floor(n * span)), 3))
    # Left end of each point's q-nearest window: the first l with xs[l] + xs[l + q] >= 2 x
    # (the window slides right while its next point is nearer than its first).
    lo = np.minimum(np.searchsorted(xs[: n - q] + xs[q:], 2 * xs, side="left"), n - q)
    first = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first position of each distinct value
    if len(first) <= n_vertices:
        vert = first
    else:
        half = n_vertices // 2
        by_rank = first[np.linspace(0, len(first) - 1, half).round().astype(np.int64)]
        by_value = first[np.clip(np.searchsorted(xs[first], np.linspace(xs[0], xs[-1], half)), 0, len(first) - 1)]
        vert = np.union1d(by_rank, by_value)
    value, slope = np.empty(len(vert)), np.empty(len(vert))
    step = max(1, (1 << 22) // q)
    offsets = np.arange(q)
    for c0 in range(0, len(vert), step):
        at = vert[c0:c0 + step]
        window = lo[at, None] + offsets  # vertices x q
        u = xs[window] - xs[at, None]
        dmax = np.abs(u).max(axis=1, keepdims=True)
        dmax = np.where(dmax > 0, dmax, 1.0)
        u = u / dmax
        w = np.clip(1 - np.abs(u) ** 3, 0, None) ** 3
        yw = ys[window] * w
        s, p = [w.sum(1)], w
        for _ in range(4):
            p = p * u
            s.append(p.sum(1))
        t = [yw.sum(1), (yw * u).sum(1), (yw * u * u).sum(1)]
        a = np.stack([np.stack([s[0], s[1], s[2]], -1),
                      np.stack([s[1], s[2], s[3]], -1),
                      np.stack([s[2], s[3], s[4]], -1)], 1)
        # a window of fewer than 3 distinct values: the ridge keeps the system solvable
        a = a + np.eye(3) * (1e-12 * s[0])[:, None, None]
        coef = np.linalg.solve(a, np.stack(t, -1)[..., None])[..., 0]
        value[c0:c0 + step] = coef[:, 0]
        slope[c0:c0 + step] = coef[:, 1] / dmax[:, 0]
    # cubic Hermite between consecutive vertices (exact at the vertices and their ties)
    k = np.clip(np.searchsorted(xs[vert], xs, side="right") - 1, 0, max(len(vert) - 2, 0))
    if len(vert) == 1:
        fitted = np.full(n, value[0])
    else:
        x0, x1 = xs[vert[k]], xs[vert[k + 1]]
        t = (xs - x0) / (x1 - x0)
        h = x1 - x0
        fitted = ((2 * t**3 - 3 * t**2 + 1) * value[k] + (t**3 - 2 * t**2 + t) * h * slope[k]
                  + (-2 * t**3 + 3 * t**2) * value[k + 1] + (t**3 - t**2) * h * slope[k + 1])
    out = np.empty(n)
    out[order] = fitted
    return out


def _count_sums(store, ranges, *, rows_per_block: int, clip: list[np.ndarray] | None = None):
    """Per experiment: sums and sums of squares of the raw counts (clipped per gene if given)."""
    g = store.n_genes
    out = []
    for e, (a, b) in enumerate(ranges):
        s1, s2 = np.zeros(g), np.zeros(g)
        for lo in range(a, b, rows_per_block):
            block = store.read_rows(lo, min(b, lo + rows_per_block))
            values = block.data.astype(np.float64)
            if clip is not None:
                values = np.minimum(values, clip[e][block.indices])
            s1 += np.bincount(block.indices, weights=values, minlength=g)
            s2 += np.bincount(block.indices, weights=values * values, minlength=g)
        out.append((s1, s2))
    return out


def _stored_count_sums(store, names: list[str]):
    """Per experiment (sum, sum of squares) of the raw counts from ``varm``, written by ingest."""
    varm = store.root["varm"] if "varm" in store.root else None
    if varm is None or "mars_counts_sum" not in varm or "mars_counts_sumsq" not in varm:
        return None
    s1, s2 = np.asarray(varm["mars_counts_sum"][...]), np.asarray(varm["mars_counts_sumsq"][...])
    if s1.shape != (store.n_genes, len(store.experiments)) or s2.shape != s1.shape:
        return None
    order = list(store.experiments)
    return [(s1[:, order.index(n)].astype(np.float64), s2[:, order.index(n)].astype(np.float64)) for n in names]


def highly_variable_genes(
    store,
    *,
    n_top_genes: int,
    span: float = 0.3,
    rows_per_block: int | None = None,
) -> HighlyVariableGenes:
    """Highly variable genes from raw counts over experiments, as scanpy's ``seurat_v3`` flavour.

    ``sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N,
    batch_key="experiment")`` on the store's counts, computed from the per-experiment count sums
    that ingest keeps in ``varm`` and one streaming pass over row blocks (two for a store
    without them); memory grows with genes x experiments, never with cells:

    1. per experiment, each gene's mean and variance (ddof = 1) of the raw counts; a loess
       (degree 2, ``span``) of log10 variance on log10 mean over the genes with non-zero
       variance gives each gene's expected standard deviation ``sigma``;
    2. counts are clipped at ``mean + sqrt(n_cells) * sigma`` and the variance of the
       standardised clipped counts is each gene's normalised variance.

    Genes are ranked by normalised variance within each experiment; a gene's rank is the median
    of its ranks among the experiments where it is in the top ``n_top_genes``; genes are chosen
    by that rank, ties broken by the number of such experiments (more first), then by store
    order. Experiments with fewer than 2 cells are left out of the ranking.

    Parameters
    ----------
    store
        An :class:`~mars_scale.store.Atlas` of raw counts.
    n_top_genes
        Number of genes to keep (all genes when the store has no more).
    span
        Fraction of the genes in each local regression (scanpy's default 0.3).
    rows_per_block
        Rows read at a time (default: one chunk of the store).

    Returns
    -------
    HighlyVariableGenes
        The chosen genes and the per-gene statistics.

    Raises
    ------
    ConfigError
        For ``n_top_genes < 1`` or ``span`` outside (0, 1].
    InputError
        If the store holds log-normalised values (``seurat_v3`` needs counts) or no
        experiment has 2 cells.
    """
    from mars_scale.errors import ConfigError, InputError

    if isinstance(n_top_genes, bool) or not isinstance(n_top_genes, (int, np.integer)) or n_top_genes < 1:
        raise ConfigError(f"n_top_genes must be a positive integer, got {n_top_genes!r}")
    if not 0 < span <= 1:
        raise ConfigError(f"span must be in (0, 1], got {span!r}")
    if store.input_kind != "counts":
        raise InputError(
            f"{store.path}: n_top_genes selects genes from raw counts, but the store holds "
            f"{store.input_kind} values (re-ingest counts, e.g. with --layer counts)"
        )
    t0 = time.perf_counter()
    g = store.n_genes
    step = rows_per_block or store.rows_per_block
    names = [n for n, (a, b) in store.experiment_ranges.items() if b - a >= 2]
    if not names:
        raise InputError(f"{store.path}: no experiment has 2 cells to estimate gene variances from")
    ranges = [store.experiment_ranges[n] for n in names]
    sums = _stored_count_sums(store, names)
    passes = 1 if sums is not None else 2
    if sums is None:  # a store from before ingest kept them: one more pass
        sums = _count_sums(store, ranges, rows_per_block=step)
    means, reg_std, clip = [], [], []
    for (a, b), (s1, s2) in zip(ranges, sums):
        n = b - a
        mean = s1 / n
        var = np.maximum(s2 - n * mean * mean, 0.0) / (n - 1)
        not_const = var > 0
        log_expected = np.zeros(g)
        log_expected[not_const] = _loess_fit(np.log10(mean[not_const]), np.log10(var[not_const]), span=span)
        sd = np.sqrt(10.0**log_expected)
        means.append(mean)
        reg_std.append(sd)
        clip.append(mean + sd * np.sqrt(n))
    clipped = _count_sums(store, ranges, rows_per_block=step, clip=clip)
    norm_var = np.empty((len(names), g))
    for e, ((a, b), (c1, c2)) in enumerate(zip(ranges, clipped)):
        n, mean, sd = b - a, means[e], reg_std[e]
        norm_var[e] = (n * mean * mean + c2 - 2 * c1 * mean) / ((n - 1) * sd * sd)
    top = min(int(n_top_genes), g)
    ranks = np.empty_like(norm_var)
    for e in range(len(names)):  # rank 0 = most variable; ties in store order
        ranks[e, np.argsort(-norm_var[e], kind="stable")] = np.arange(g)
    in_top = ranks < top
    nbatches = in_top.sum(0)
    masked = np.where(in_top, ranks, np.nan)
    median = np.full(g, np.nan)
    some = nbatches > 0
    median[some] = np.nanmedian(masked[:, some], axis=0)
    key = np.where(np.isnan(median), np.inf, median)
    chosen = np.lexsort((np.arange(g), -nbatches, key))[:top]
    n_all = sum(b - a for a, b in ranges)
    s1_all = sum(s[0] for s in sums)
    s2_all = sum(s[1] for s in sums)
    mean_all = s1_all / n_all
    var_all = np.maximum(s2_all - n_all * mean_all**2, 0.0) / max(n_all - 1, 1)
    logger.info("highly variable genes: %d of %d (seurat_v3 over %d experiments; %d pass%s over X) in %.1f s",
                top, g, len(names), passes, "" if passes == 1 else "es", time.perf_counter() - t0)
    return HighlyVariableGenes(
        index=np.sort(chosen).astype(np.int64),
        highly_variable_rank=median,
        highly_variable_nbatches=nbatches.astype(np.int64),
        variances_norm=norm_var.mean(0),
        means=mean_all,
        variances=var_all,
        experiments=tuple(names),
        n_top_genes=int(n_top_genes),
    )
