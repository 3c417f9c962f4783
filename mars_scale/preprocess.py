"""Sparse-aware preprocessing: normalise, log1p, scale and clip without a dense matrix.

The store holds raw counts (or log-normalised values, ``kind="lognorm"``) as CSR row blocks.
:func:`normalize_log1p` turns the ``data`` array of such a block into log1p-normalised values
without touching the zeros. Scaling to zero mean and unit variance with clipping, as scanpy's
``scale(zero_center=True, max_value=10)``, is never materialised: it is affine per gene up to
the clip, and a zero entry of gene ``g`` always scales to the same value
``c_g = clip(-mean_g / std_g)``. Hence, for a first layer ``W`` and bias ``b``,

.. math::

    W \\, \\mathrm{clip}((x - \\mu) / \\sigma) + b
    = (b + W c) + W_{:, nz} \\, (\\mathrm{clip}((x_{nz} - \\mu_{nz}) / \\sigma_{nz}) - c_{nz}),

which is exact for every entry, clipped or not, and costs time in proportion to the non-zeros.
:func:`fold_scaling` builds the per-gene constants and :func:`scaled_nonzero_values` the
per-non-zero weights of the sparse term.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from mars_scale.errors import ConfigError, InputError

__all__ = [
    "ScalingParams",
    "fold_scaling",
    "normalize_log1p",
    "row_scale",
    "scale_dense",
    "scaled_nonzero_values",
]

logger = logging.getLogger(__name__)

_KINDS = ("counts", "lognorm")


def normalize_log1p(
    indptr: npt.ArrayLike,
    indices: npt.ArrayLike,
    data: npt.ArrayLike,
    *,
    target_sum: float = 1e4,
    kind: Literal["counts", "lognorm"] = "counts",
    dtype: npt.DTypeLike = np.float32,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Normalise each row of a CSR block to ``target_sum`` and take ``log1p``.

    Only the stored values are touched: the result is the ``data`` array of a CSR matrix with
    the same ``indptr`` and ``indices``. Rows whose total is zero stay zero. The row totals are
    summed in the wider of the two dtypes, ``data``'s and the result's: float32 counts into a
    float32 result sum in float32 (5x faster than float64; exact for integer counts totalling
    under 2**24, else about 1e-7 relative, below the result's own rounding). The values are
    scaled and log-transformed in place in the result, which may be ``data`` itself
    (``out=data``, as the loader does).

    Parameters
    ----------
    indptr
        Row pointer of the block, length ``n_rows + 1``, starting at 0.
    indices
        Column index of each stored value (only its length is checked).
    data
        Raw counts (``kind="counts"``) or log-normalised values (``kind="lognorm"``).
    target_sum
        Total of each row after normalisation (scanpy's ``normalize_total(target_sum=...)``).
    kind
        ``"counts"`` normalises and log-transforms; ``"lognorm"`` means the values are already
        log-normalised and returns a copy of them unchanged.
    dtype
        Floating dtype of the result (ignored when ``out`` is given).
    out
        Floating array of ``len(data)`` values to write the result into; may be ``data``.

    Returns
    -------
    numpy.ndarray
        ``log1p(data * target_sum / row_total)`` for each stored value: ``out``, or a new
        array.

    Raises
    ------
    ConfigError
        If ``kind``, ``target_sum``, ``dtype`` or ``out`` is invalid.
    InputError
        If ``indptr``, ``indices`` and ``data`` do not describe a CSR block.
    """
    if kind not in _KINDS:
        raise ConfigError(f"kind must be one of {_KINDS}, got {kind!r}.")
    if not (np.isfinite(target_sum) and target_sum > 0):
        raise ConfigError(f"target_sum must be a positive finite number, got {target_sum!r}.")
    dtype = np.dtype(dtype if out is None else out.dtype)
    if not np.issubdtype(dtype, np.floating):
        raise ConfigError(f"dtype must be a floating dtype, got {dtype}.")
    indptr = np.asarray(indptr)
    data = np.asarray(data)
    _check_csr(indptr, np.asarray(indices), data)
    if out is None:
        out = np.empty(data.shape, dtype=dtype)
    elif out.shape != data.shape:
        raise ConfigError(f"out must have the shape of data {data.shape}, got {out.shape}.")

    if kind == "lognorm":
        np.copyto(out, data, casting="unsafe")
        return out

    _, scale = row_scale(indptr, data, target_sum=target_sum, dtype=dtype)
    np.multiply(data, np.repeat(scale, np.diff(indptr)), out=out, casting="unsafe")
    np.log1p(out, out=out)
    return out


def row_scale(
    indptr: np.ndarray, data: np.ndarray, *, target_sum: float = 1e4,
    dtype: npt.DTypeLike = np.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """Row totals of a CSR block and the factors that scale each row to ``target_sum``.

    The first step of :func:`normalize_log1p` (which documents the summation dtype), shared
    with the loader, which applies the factors in its own compiled pass. Inputs are not
    checked.

    Parameters
    ----------
    indptr
        Row pointer, length ``n_rows + 1`` (need not start at 0).
    data
        The block's values, ``indptr[-1] - indptr[0]`` of them.
    target_sum
        Total of each row after scaling.
    dtype
        Floating dtype of the factors and of the result ``normalize_log1p`` builds from them.

    Returns
    -------
    totals : numpy.ndarray
        float64 holding each row's total as summed (0 for an empty row).
    scale : numpy.ndarray
        ``target_sum / total`` in ``dtype``; 0 for a row whose total is not positive.
    """
    lengths = np.diff(indptr)
    n_rows = lengths.shape[0]
    totals = np.zeros(n_rows, dtype=np.float64)
    nonempty = lengths > 0
    if data.size:
        # contiguous row sums (reduceat) and a repeat, not a scatter and a gather: the loader's
        # hot path (measured 3.8x faster than bincount + fancy indexing on 4,096 rows x 1,000 values)
        starts = (indptr[:-1] - indptr[0])[nonempty]
        acc = np.result_type(data.dtype, dtype, np.float32)
        totals[nonempty] = np.add.reduceat(data, starts, dtype=acc)
    positive = totals > 0
    scale = np.zeros(n_rows, dtype=dtype)
    scale[positive] = target_sum / totals[positive]
    return totals, scale


def normalized_rows(store, rows: npt.ArrayLike, *, block_rows: int | None = None,
                    dtype: npt.DTypeLike = np.float64):
    """Store rows ``rows`` (sorted), log1p-normalised to the store's target sum, as CSR.

    Rows are read in blocks of ``block_rows`` (default: the store's rows per chunk, so each
    chunk is decoded once) and only blocks holding a wanted row are read.
    """
    import scipy.sparse as sp

    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return sp.csr_matrix((0, store.n_genes), dtype=dtype)
    if np.any(np.diff(rows) < 0):
        raise InputError("rows must be sorted")
    block_rows = int(block_rows or store.rows_per_chunk)
    target_sum = float(store.meta.get("preprocessing", {}).get("target_sum", 1e4))
    blocks = []
    lo = (int(rows[0]) // block_rows) * block_rows
    while lo <= int(rows[-1]):
        hi = lo + block_rows
        first, last = np.searchsorted(rows, [lo, hi])
        if first < last:
            block = store.read_rows(lo, min(hi, store.n_cells))[rows[first:last] - lo]
            data = normalize_log1p(block.indptr, block.indices, block.data, target_sum=target_sum,
                                   kind=store.input_kind, dtype=dtype)
            blocks.append(sp.csr_matrix((data, block.indices, block.indptr), shape=block.shape))
            lo = hi
        else:  # jump to the block of the next wanted row
            lo = (int(rows[first]) // block_rows) * block_rows
    return sp.vstack(blocks, format="csr")


def _check_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
    """Check the cheap invariants of a CSR block (cost grows with rows, not with values)."""
    if indptr.ndim != 1 or indptr.shape[0] < 1 or not np.issubdtype(indptr.dtype, np.integer):
        raise InputError("indptr must be a one-dimensional integer array of length n_rows + 1.")
    if data.ndim != 1 or indices.shape != data.shape:
        raise InputError(
            f"indices and data must be one-dimensional and of equal length, "
            f"got shapes {indices.shape} and {data.shape}."
        )
    if indptr[0] != 0 or indptr[-1] != data.shape[0] or np.any(np.diff(indptr) < 0):
        raise InputError(
            "indptr must start at 0, never decrease and end at len(data) "
            f"({data.shape[0]}), got start {indptr[0]} and end {indptr[-1]}."
        )


@dataclass(frozen=True, eq=False)
class ScalingParams:
    """Per-gene constants of the folded scale-and-clip transform.

    Build it with :func:`fold_scaling`, which validates the inputs.

    Attributes
    ----------
    mean
        Per-gene mean of the log1p-normalised values, float64, shape ``(n_genes,)``.
    std
        Per-gene standard deviation with zeros replaced by 1 (as scanpy), float64.
    zero_value
        ``c_g = clip(-mean_g / std_g)``: what a zero entry of gene ``g`` scales to, float64.
    max_value
        Clipping bound: scaled values are clipped to ``[-max_value, max_value]``; ``None``
        means no clipping.
    """

    mean: np.ndarray
    std: np.ndarray
    zero_value: np.ndarray
    max_value: float | None

    @property
    def n_genes(self) -> int:
        """Number of genes."""
        return int(self.mean.shape[0])


def fold_scaling(
    mean: npt.ArrayLike,
    std: npt.ArrayLike,
    *,
    max_value: float | None = 10.0,
) -> ScalingParams:
    """Build the per-gene constants that fold scaling and clipping into a sparse layer.

    The transform matched is scanpy's ``scale(zero_center=True, max_value=max_value)``:
    ``clip((x - mean) / std, -max_value, max_value)`` with ``std == 0`` replaced by 1.

    Parameters
    ----------
    mean
        Per-gene mean of the log1p-normalised values, shape ``(n_genes,)``.
    std
        Per-gene standard deviation of the same values, shape ``(n_genes,)``, non-negative.
        The ``ddof`` convention is the caller's (scanpy uses ``ddof=1``).
    max_value
        Positive clipping bound, or ``None`` for no clipping.

    Returns
    -------
    ScalingParams
        Float64 copies of ``mean`` and the corrected ``std``, and the zero values
        ``clip(-mean / std)``.

    Raises
    ------
    ConfigError
        If ``max_value`` is not positive.
    InputError
        If ``mean`` or ``std`` is not a finite one-dimensional array of matching length, or
        ``std`` is negative.
    """
    if max_value is not None and not (np.isfinite(max_value) and max_value > 0):
        raise ConfigError(
            f"max_value must be a positive finite number or None, got {max_value!r}."
        )
    mean = np.array(mean, dtype=np.float64)
    std = np.array(std, dtype=np.float64)
    if mean.ndim != 1 or std.shape != mean.shape:
        raise InputError(
            f"mean and std must be one-dimensional and of equal length, "
            f"got shapes {mean.shape} and {std.shape}."
        )
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise InputError("mean and std must be finite (re-run the statistics pass).")
    if np.any(std < 0):
        raise InputError("std must be non-negative.")
    std[std == 0] = 1.0
    zero_value = _clip(-mean / std, max_value)
    for array in (mean, std, zero_value):
        array.setflags(write=False)
    return ScalingParams(
        mean=mean,
        std=std,
        zero_value=zero_value,
        max_value=None if max_value is None else float(max_value),
    )


def scaled_nonzero_values(
    indices: npt.ArrayLike,
    data: npt.ArrayLike,
    params: ScalingParams,
    *,
    dtype: npt.DTypeLike | None = None,
) -> np.ndarray:
    """Per-non-zero weights of the sparse term of the folded transform.

    Parameters
    ----------
    indices
        Gene index of each stored value.
    data
        Log1p-normalised stored values.
    params
        Per-gene constants from :func:`fold_scaling`.
    dtype
        Floating dtype of the result; by default that of ``data`` (float64 if ``data`` is not
        floating).

    Returns
    -------
    numpy.ndarray
        ``clip((data - mean[indices]) / std[indices]) - zero_value[indices]``.

    Raises
    ------
    InputError
        If ``indices`` and ``data`` differ in shape or an index is out of range.
    """
    indices = np.asarray(indices)
    data = np.asarray(data)
    if indices.shape != data.shape:
        raise InputError(
            f"indices and data must have equal shapes, got {indices.shape} and {data.shape}."
        )
    if indices.size and (indices.min() < 0 or indices.max() >= params.n_genes):
        raise InputError(f"indices must lie in [0, {params.n_genes}), the number of genes.")
    if dtype is None:
        dtype = data.dtype if np.issubdtype(data.dtype, np.floating) else np.float64
    scaled = _clip((data - params.mean[indices]) / params.std[indices], params.max_value)
    scaled -= params.zero_value[indices]
    return scaled.astype(dtype, copy=False)


def scale_dense(x: npt.ArrayLike, params: ScalingParams) -> np.ndarray:
    """Scale and clip a dense block of log1p-normalised rows (small data and references).

    Parameters
    ----------
    x
        Array of shape ``(n_rows, n_genes)``.
    params
        Per-gene constants from :func:`fold_scaling`.

    Returns
    -------
    numpy.ndarray
        ``clip((x - mean) / std)`` in float64.

    Raises
    ------
    InputError
        If the last axis of ``x`` is not ``n_genes`` long.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != params.n_genes:
        raise InputError(f"x must have shape (n_rows, {params.n_genes}), got {x.shape}.")
    return _clip((x - params.mean) / params.std, params.max_value)


def _clip(values: np.ndarray, max_value: float | None) -> np.ndarray:
    """Clip to ``[-max_value, max_value]`` in place when ``max_value`` is set."""
    if max_value is not None:
        np.clip(values, -max_value, max_value, out=values)
    return values
