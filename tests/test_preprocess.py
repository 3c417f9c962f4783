"""Sparse preprocessing against dense numpy references on real data."""

from __future__ import annotations


import numpy as np
import pytest
import scipy.sparse as sp

from conftest import shared_file
from mars_scale.errors import ConfigError, InputError
from mars_scale.preprocess import (
    ScalingParams,
    fold_scaling,
    normalize_log1p,
    scale_dense,
    scaled_nonzero_values,
)

DATASETS = ["mesc_kolodziejczyk2015_mini.h5ad", "cellbench_3cl_3protocols_panel.h5ad"]


def _read_counts(name: str) -> sp.csr_matrix:
    anndata = pytest.importorskip("anndata")
    return sp.csr_matrix(anndata.read_h5ad(shared_file(name)).X)


def _dense_lognorm(counts: sp.csr_matrix, target_sum: float = 1e4) -> np.ndarray:
    dense = counts.toarray().astype(np.float64)
    totals = dense.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(dense * scale)


def _dense_stats(lognorm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = lognorm.mean(axis=0)
    std = lognorm.std(axis=0)  # ddof=0
    return mean, std


def _dense_scaled(lognorm: np.ndarray, mean, std, max_value=10.0) -> np.ndarray:
    std = np.where(std == 0, 1.0, std)
    return np.clip((lognorm - mean) / std, -max_value, max_value)


@pytest.fixture(scope="module", params=DATASETS)
def counts(request) -> sp.csr_matrix:
    return _read_counts(request.param)


# ------------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_normalize_log1p_matches_dense(counts, dtype):
    out = normalize_log1p(counts.indptr, counts.indices, counts.data, dtype=dtype)
    assert out.dtype == dtype
    assert out.shape == counts.data.shape
    got = sp.csr_matrix((out, counts.indices, counts.indptr), shape=counts.shape).toarray()
    np.testing.assert_allclose(got, _dense_lognorm(counts), rtol=1e-5, atol=1e-6)


def test_normalize_log1p_in_place(counts):
    """``out=data`` overwrites the values with the result (the loader's fused pass)."""
    values = counts.data.astype(np.float32)
    got = normalize_log1p(counts.indptr, counts.indices, values, out=values)
    assert got is values
    dense = sp.csr_matrix((values, counts.indices, counts.indptr), shape=counts.shape).toarray()
    np.testing.assert_allclose(dense, _dense_lognorm(counts), rtol=1e-5, atol=1e-6)
    wide = np.empty(counts.data.shape, dtype=np.float64)
    normalize_log1p(counts.indptr, counts.indices, counts.data, out=wide)
    np.testing.assert_allclose(wide, values, rtol=1e-6)
    with pytest.raises(ConfigError, match="out must have the shape"):
        normalize_log1p(counts.indptr, counts.indices, counts.data, out=wide[1:])


def test_normalize_log1p_float32_totals_stay_accurate():
    """float32 rows sum in float32: still within 1e-6 with non-integer values past 2**24."""
    rng = np.random.default_rng(0)
    n_rows, per_row = 6, 5000
    data = (rng.gamma(0.7, 8000.0, n_rows * per_row) + 0.25).astype(np.float32)
    indptr = np.arange(0, n_rows * per_row + 1, per_row)
    indices = np.tile(np.arange(per_row, dtype=np.int32), n_rows)
    totals = data.astype(np.float64).reshape(n_rows, per_row).sum(axis=1)
    assert totals.min() > 2**24  # float32 cannot hold these totals exactly
    expected = np.log1p(data.reshape(n_rows, per_row) / totals[:, None] * 1e4).ravel()
    got = normalize_log1p(indptr, indices, data)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_normalize_log1p_target_sum(counts):
    out = normalize_log1p(
        counts.indptr, counts.indices, counts.data, target_sum=1e6, dtype=np.float64
    )
    got = sp.csr_matrix((out, counts.indices, counts.indptr), shape=counts.shape)
    # expm1 undoes log1p: every row now sums to the target
    np.testing.assert_allclose(np.asarray(got.expm1().sum(axis=1)).ravel(), 1e6, rtol=1e-9)


def test_normalize_log1p_keeps_zero_total_rows_zero():
    # rows: empty, one count, an explicitly stored zero, empty at the end
    indptr = np.array([0, 0, 1, 2, 4, 4], dtype=np.int64)
    indices = np.array([2, 0, 1, 3], dtype=np.int32)
    data = np.array([5.0, 0.0, 1.0, 3.0], dtype=np.float32)
    out = normalize_log1p(indptr, indices, data, target_sum=4.0)
    np.testing.assert_allclose(out, np.log1p([4.0, 0.0, 1.0, 3.0]), rtol=1e-6)
    assert out[1] == 0.0
    assert np.all(np.isfinite(out))


def test_normalize_log1p_empty_block():
    out = normalize_log1p(np.zeros(4, dtype=np.int64), np.zeros(0, np.int32), np.zeros(0))
    assert out.shape == (0,)
    assert out.dtype == np.float32


def test_normalize_log1p_lognorm_passes_through():
    data = np.array([0.5, 2.25, 7.0], dtype=np.float32)
    out = normalize_log1p(np.array([0, 2, 3]), np.array([0, 1, 0]), data, kind="lognorm")
    np.testing.assert_array_equal(out, data)
    assert out is not data
    out[0] = 99.0
    assert data[0] == 0.5


def test_normalize_log1p_rejects_bad_options():
    indptr, indices, data = np.array([0, 1]), np.array([0]), np.array([1.0])
    with pytest.raises(ConfigError, match="kind must be one of"):
        normalize_log1p(indptr, indices, data, kind="raw")
    with pytest.raises(ConfigError, match="target_sum"):
        normalize_log1p(indptr, indices, data, target_sum=0)
    with pytest.raises(ConfigError, match="dtype"):
        normalize_log1p(indptr, indices, data, dtype=np.int32)
    with pytest.raises(InputError, match="indptr"):
        normalize_log1p(np.array([0, 2]), indices, data)
    with pytest.raises(InputError, match="equal length"):
        normalize_log1p(indptr, np.array([0, 1]), data)


# ------------------------------------------------------------------------------- scaling


def test_fold_scaling_replaces_zero_std_and_clips_zero_value():
    params = fold_scaling([1.0, 2.0, 50.0, 0.0], [0.5, 0.0, 1.0, 2.0], max_value=10.0)
    assert isinstance(params, ScalingParams)
    np.testing.assert_array_equal(params.std, [0.5, 1.0, 1.0, 2.0])
    np.testing.assert_array_equal(params.zero_value, [-2.0, -2.0, -10.0, 0.0])
    assert params.n_genes == 4
    assert not params.mean.flags.writeable
    unclipped = fold_scaling([50.0], [1.0], max_value=None)
    assert unclipped.zero_value[0] == -50.0


def test_fold_scaling_rejects_bad_input():
    with pytest.raises(ConfigError, match="max_value"):
        fold_scaling([0.0], [1.0], max_value=-1.0)
    with pytest.raises(InputError, match="equal length"):
        fold_scaling([0.0, 1.0], [1.0])
    with pytest.raises(InputError, match="non-negative"):
        fold_scaling([0.0], [-1.0])
    with pytest.raises(InputError, match="finite"):
        fold_scaling([np.nan], [1.0])


def _fold_case(counts: sp.csr_matrix):
    """Log-normalised CSR, its dense form, and the scaling constants from dense statistics."""
    lognorm = normalize_log1p(counts.indptr, counts.indices, counts.data, dtype=np.float64)
    x = sp.csr_matrix((lognorm, counts.indices, counts.indptr), shape=counts.shape)
    dense = x.toarray()
    mean, std = _dense_stats(dense)
    return x, dense, mean, std


def _with_extreme_genes(dense: np.ndarray) -> np.ndarray:
    """Append genes whose scaled values leave [-10, 10] on both sides, and constant genes."""
    n = dense.shape[0]
    rare = np.zeros(n)
    rare[[3, 17]] = [4.0, 5.0]  # expressed in two cells: scaled value about sqrt(n / 2) > 10
    common = np.full(n, 6.0)
    common[[5]] = 0.0  # zero in one cell: that zero scales to about -sqrt(n) < -10
    constant = np.full(n, 2.0)  # std 0 -> 1
    silent = np.zeros(n)
    return np.column_stack([dense, rare, common, constant, silent])


def test_scaled_nonzero_values_rebuild_the_dense_scaled_matrix(counts):
    x, dense, mean, std = _fold_case(counts)
    params = fold_scaling(mean, std, max_value=10.0)
    weights = scaled_nonzero_values(x.indices, x.data, params)
    assert weights.dtype == np.float64
    sparse_part = sp.csr_matrix((weights, x.indices, x.indptr), shape=x.shape).toarray()
    rebuilt = params.zero_value + sparse_part
    np.testing.assert_allclose(rebuilt, _dense_scaled(dense, mean, std), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scale_dense(dense, params), _dense_scaled(dense, mean, std))


def test_fold_identity_with_clipping_on_both_sides(counts):
    _, dense, _, _ = _fold_case(counts)
    dense = _with_extreme_genes(dense)
    mean, std = _dense_stats(dense)
    unclipped = (dense - mean) / np.where(std == 0, 1.0, std)
    assert unclipped.max() > 10  # a non-zero is clipped from above
    assert unclipped.min() < -10  # a zero is clipped from below: c itself is clipped
    x = sp.csr_matrix(dense)
    params = fold_scaling(mean, std, max_value=10.0)
    assert params.zero_value.min() == -10.0
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, x.shape[1]))
    b = rng.normal(size=5)
    reference = _dense_scaled(dense, mean, std) @ w.T + b
    weights = scaled_nonzero_values(x.indices, x.data, params)
    folded = (b + w @ params.zero_value) + sp.csr_matrix(
        (weights, x.indices, x.indptr), shape=x.shape
    ) @ w.T
    np.testing.assert_allclose(folded, reference, rtol=1e-10, atol=1e-10)
    # the clip matters: without it the result is different
    assert not np.allclose(unclipped @ w.T + b, reference, rtol=1e-3)


def test_real_mesc_data_exceed_the_clip():
    counts = _read_counts("mesc_kolodziejczyk2015_mini.h5ad")
    _, dense, mean, std = _fold_case(counts)
    assert ((dense - mean) / std).max() > 10


def test_scaled_nonzero_values_rejects_bad_indices():
    params = fold_scaling([0.0, 1.0], [1.0, 1.0])
    with pytest.raises(InputError, match="indices must lie"):
        scaled_nonzero_values(np.array([2]), np.array([1.0]), params)
    with pytest.raises(InputError, match="equal shapes"):
        scaled_nonzero_values(np.array([0, 1]), np.array([1.0]), params)
    out = scaled_nonzero_values(np.array([1]), np.array([3.0], dtype=np.float32), params)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [2.0 - (-1.0)])
