"""The loader's compiled loops against numpy and dense references: the row check against
``x_rows_damage``, check + scale + log1p against ``normalize_log1p`` (bit for bit), the batch
gather against scipy, and the reuse of batch arrays."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from mars_scale.kernels import check_scale_rows, gather_rows
from mars_scale.loader import _OutputRing
from mars_scale.preprocess import normalize_log1p, row_scale
from mars_scale.store import x_rows_damage

NO_SCALE = np.empty(0, dtype=np.float32)


def random_csr(rng, n_rows: int, n_genes: int, *, integer: bool, index_dtype=np.uint16):
    lengths = rng.integers(0, min(n_genes, 400), size=n_rows)
    lengths[rng.random(n_rows) < 0.1] = 0
    ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = np.concatenate(
        [np.sort(rng.choice(n_genes, size=n, replace=False)) for n in lengths]
    ).astype(index_dtype)
    if integer:
        data = rng.integers(1, 50, size=ptr[-1]).astype(np.float32)
    else:  # fractional values over many magnitudes: the summation order shows in the totals
        data = (rng.random(ptr[-1]) * 10.0 ** rng.integers(-3, 6, size=ptr[-1]) + 1e-6).astype(np.float32)
    return ptr, data, indices


@pytest.mark.parametrize("integer", [True, False])
def test_check_scale_and_log1p_equal_normalize_log1p_bit_for_bit(integer):
    rng = np.random.default_rng(3)
    ptr, data, indices = random_csr(rng, 300, 2000, integer=integer)
    want = normalize_log1p(ptr, indices, data, target_sum=1e4)
    values = data.copy()
    totals, scale = row_scale(ptr, values, target_sum=1e4)
    assert check_scale_rows(ptr, values, indices, 2000, scale) == -1
    np.log1p(values, out=values)
    np.testing.assert_array_equal(values, want)
    # and both against a dense float64 reference, to float32 rounding
    dense = sp.csr_matrix((data.astype(np.float64), indices, ptr), shape=(300, 2000)).toarray()
    row_sum = dense.sum(axis=1, keepdims=True)
    reference = np.log1p(np.divide(dense * 1e4, row_sum, out=np.zeros_like(dense), where=row_sum > 0))
    got = sp.csr_matrix((values, indices, ptr), shape=(300, 2000)).toarray()
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(totals, row_sum.ravel(), rtol=1e-6)


def test_check_only_leaves_the_values_and_accepts_good_rows():
    rng = np.random.default_rng(4)
    for index_dtype in (np.uint16, np.int32, np.int64):
        ptr, data, indices = random_csr(rng, 50, 300, integer=True, index_dtype=index_dtype)
        values = data.copy()
        assert check_scale_rows(ptr, values, indices, 300, NO_SCALE) == -1
        np.testing.assert_array_equal(values, data)
        assert x_rows_damage(ptr, data, indices, n_genes=300) is None


@pytest.mark.parametrize("damage", [
    "zero", "nan", "inf", "negative", "index_too_large", "index_negative", "duplicate", "unsorted",
])
def test_check_finds_the_row_that_x_rows_damage_rejects(damage):
    rng = np.random.default_rng(5)
    ptr, data, indices = random_csr(rng, 40, 300, integer=True, index_dtype=np.int32)
    row = int(np.flatnonzero(np.diff(ptr) >= 3)[5])
    k = int(ptr[row]) + 1  # the row's second value
    data, indices = data.copy(), indices.copy()
    if damage in ("zero", "nan", "inf", "negative"):
        data[k] = {"zero": 0.0, "nan": np.nan, "inf": np.inf, "negative": -1.0}[damage]
    elif damage == "index_too_large":
        indices[ptr[row + 1] - 1] = 300
    elif damage == "index_negative":
        indices[ptr[row]] = -1
    elif damage == "duplicate":
        indices[k] = indices[k - 1]
    else:
        indices[k - 1], indices[k] = indices[k], indices[k - 1]
    assert x_rows_damage(ptr, data, indices, n_genes=300) is not None
    _, scale = row_scale(ptr, data)
    assert check_scale_rows(ptr, data.copy(), indices, 300, scale) == row
    assert check_scale_rows(ptr, data.copy(), indices, 300, NO_SCALE) == row


def test_gather_rows_equals_scipy_and_widens_indices():
    rng = np.random.default_rng(6)
    ptr, data, indices = random_csr(rng, 200, 3000, integer=False)
    rows = rng.integers(0, 200, size=90)  # repeats and empty rows included
    rows[:3] = np.flatnonzero(np.diff(ptr) == 0)[:3]
    lengths = ptr[rows + 1] - ptr[rows]
    out_ptr = np.empty(91, dtype=np.int32)
    out_values = np.empty(int(lengths.sum()), dtype=np.float32)
    out_indices = np.empty(int(lengths.sum()), dtype=np.int32)
    gather_rows(ptr, data, indices, rows, out_ptr, out_values, out_indices)
    want = sp.csr_matrix((data, indices.astype(np.int32), ptr), shape=(200, 3000))[rows]
    np.testing.assert_array_equal(out_ptr, want.indptr)
    np.testing.assert_array_equal(out_indices, want.indices)
    np.testing.assert_array_equal(out_values, want.data)


def test_output_ring_reuses_only_arrays_nothing_else_holds():
    ring = _OutputRing(2)
    held = ring.take(100, np.int32)[0]  # a batch still alive: its slot must get new arrays
    ring.take(100, np.int32)
    again = ring.take(100, np.int32)[0]
    assert not np.shares_memory(again, held)
    del held, again
    addr = ring.take(100, np.int32)[0].__array_interface__["data"][0]  # slot 1, then let go
    ring.take(100, np.int32)
    reused = ring.take(80, np.int32)[0]  # slot 1 again, nothing holds it
    assert reused.__array_interface__["data"][0] == addr
    assert ring.take(10_000, np.int32)[0].shape == (10_000,)  # too small: new arrays


def test_loader_batches_equal_normalize_log1p_of_the_stored_rows(loader_store):
    import anndata as ad

    from mars_scale.loader import Loader

    stored = ad.read_zarr(loader_store).X.tocsr()
    for batch in Loader(loader_store, batch_size=97, seed=2, blocks_per_buffer=3):
        rows = stored[batch.index.numpy()]
        want = normalize_log1p(rows.indptr, rows.indices, rows.data.astype(np.float32))
        np.testing.assert_array_equal(batch.x.values().numpy(), want)
        np.testing.assert_array_equal(batch.x.col_indices().numpy(), rows.indices)
        np.testing.assert_array_equal(batch.x.crow_indices().numpy(), rows.indptr)


def test_select_columns_in_place_equals_scipy_column_indexing():
    from mars_scale.kernels import select_columns

    rng = np.random.default_rng(7)
    ptr, data, indices = random_csr(rng, 120, 500, integer=False)
    genes = np.sort(rng.choice(500, size=90, replace=False))
    position = np.full(500, -1, dtype=np.int64)
    position[genes] = np.arange(90)
    want = sp.csr_matrix((data, indices.astype(np.int32), ptr), shape=(120, 500))[:, genes]
    values, cols, kept = data.copy(), indices.copy(), np.empty_like(ptr)
    n = select_columns(ptr, values, cols, position, kept)
    np.testing.assert_array_equal(kept, want.indptr)
    np.testing.assert_array_equal(cols[:n], want.indices)
    np.testing.assert_array_equal(values[:n], want.data)
