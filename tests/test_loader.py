"""The block-shuffle loader: coverage per epoch across ranks and workers, order, resume,
values against a dense reference, and damaged stores."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader

from conftest import build_loader_store
from mars_scale.errors import ConfigError, StoreError
from mars_scale.loader import Batch, Loader, MemorySample, normalize_batch
from mars_scale.store import open_store

pytestmark = pytest.mark.timeout(120)


def collect(batches) -> list[Batch]:
    return list(batches)


def real_index(batches: list[Batch]) -> np.ndarray:
    """Row ids of the non-padding rows, in yield order."""
    return np.concatenate([b.index[~b.is_padding].numpy() for b in batches])


def all_index(batches: list[Batch]) -> np.ndarray:
    return np.concatenate([b.index.numpy() for b in batches])


def assert_each_once(index: np.ndarray, expected: np.ndarray) -> None:
    assert len(index) == len(expected), "a row is missing or repeated"
    np.testing.assert_array_equal(np.sort(index), np.sort(expected))


def dense_reference(store) -> np.ndarray:
    """log1p of the counts normalised to 10,000 per cell, dense, in float64."""
    raw = ad.read_zarr(store).X.toarray().astype(np.float64)
    return np.log1p(raw / raw.sum(axis=1, keepdims=True) * 1e4)


@pytest.fixture(scope="module")
def atlas(loader_store):
    return open_store(loader_store)


# ------------------------------------------------------------------------------ coverage


@pytest.mark.parametrize("batch_size", [1, 37, 64, 2000])
def test_every_row_once_one_rank(atlas, batch_size):
    loader = Loader(atlas, batch_size=batch_size, blocks_per_buffer=3, seed=1)
    batches = collect(loader)
    assert len(batches) == len(loader) == -(-atlas.n_cells // batch_size)
    assert_each_once(all_index(batches), np.arange(atlas.n_cells))
    assert not any(b.n_padding for b in batches)
    sizes = [b.n_rows for b in batches]
    assert all(s == batch_size for s in sizes[:-1]) and 0 < sizes[-1] <= batch_size
    assert [b.step for b in batches] == list(range(len(loader)))
    assert all(b.x.layout == torch.sparse_csr and b.x.shape == (b.n_rows, atlas.n_genes) for b in batches)


@pytest.mark.parametrize("world_size,batch_size", [(2, 64), (3, 7), (4, 50)])
def test_every_row_once_across_ranks_with_equal_batch_counts(atlas, world_size, batch_size):
    loaders = [
        Loader(atlas, batch_size=batch_size, rank=r, world_size=world_size, blocks_per_buffer=2)
        for r in range(world_size)
    ]
    runs = [collect(loader) for loader in loaders]
    counts = {len(run) for run in runs}
    assert counts == {len(loaders[0])}, "ranks yield different numbers of batches"
    for run in runs[1:]:  # same batch sizes too, so DDP steps line up
        assert [b.n_rows for b in run] == [b.n_rows for b in runs[0]]
    real = np.concatenate([real_index(run) for run in runs])
    assert_each_once(real, np.arange(atlas.n_cells))
    n_pad = sum(b.n_padding for run in runs for b in run)
    assert n_pad == world_size * loaders[0].rows_per_rank - atlas.n_cells
    assert (atlas.n_cells % world_size == 0) == (n_pad == 0)
    padded = np.concatenate([b.index[b.is_padding].numpy() for run in runs for b in run])
    assert np.isin(padded, real).all()  # padding repeats real rows


def test_drop_last_gives_full_equal_batches_without_padding(atlas):
    loaders = [Loader(atlas, batch_size=64, rank=r, world_size=3, drop_last=True) for r in range(3)]
    runs = [collect(loader) for loader in loaders]
    assert {len(run) for run in runs} == {len(loaders[0])} == {(atlas.n_cells // 3) // 64}
    assert all(b.n_rows == 64 and b.n_padding == 0 for run in runs for b in run)
    index = np.concatenate([all_index(run) for run in runs])
    assert len(np.unique(index)) == len(index)


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_row_once_with_two_dataloader_workers(atlas, world_size):
    real, counts = [], []
    for rank in range(world_size):
        loader = Loader(
            atlas, batch_size=23, rank=rank, world_size=world_size, blocks_per_buffer=2, seed=3
        )
        batches = collect(DataLoader(loader, batch_size=None, num_workers=2))
        counts.append(len(batches))
        assert len(batches) == len(loader)
        # DataLoader polls workers round-robin; Batch.step is that position.
        assert [b.step for b in batches] == list(range(len(loader)))
        real.append(real_index(batches))
    assert len(set(counts)) == 1
    assert_each_once(np.concatenate(real), np.arange(atlas.n_cells))


def test_worker_shares_differ_by_at_most_one_batch(atlas):
    loader = Loader(atlas, batch_size=10, blocks_per_buffer=2)
    for n_workers in (1, 2, 3, 5):
        shares = [loader._worker_buffers(n_workers, w) for w in range(n_workers)]
        sizes = [sum(b.stop - b.first for b in bufs) for bufs in shares]
        assert sum(sizes) == len(loader)
        assert max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # extras go to the lowest worker ids


def test_worker_order_matches_in_process_simulation(atlas):
    """The DataLoader order with 2 workers is the documented interleaving of worker streams."""
    loader = Loader(atlas, batch_size=40, blocks_per_buffer=2, seed=5)
    with_workers = collect(DataLoader(loader, batch_size=None, num_workers=2))
    streams = [list(loader._iterate(0, 2, w, 0)) for w in range(2)]
    expected = [streams[i % 2][i // 2] for i in range(len(loader))]
    for got, want in zip(with_workers, expected, strict=True):
        np.testing.assert_array_equal(got.index.numpy(), want.index.numpy())


# ------------------------------------------------------------------------------ order


def test_order_depends_on_seed_and_epoch_only(atlas):
    def order(seed, epoch):
        loader = Loader(atlas, batch_size=50, seed=seed, blocks_per_buffer=2)
        loader.set_epoch(epoch)
        return all_index(collect(loader))

    first = order(0, 0)
    np.testing.assert_array_equal(first, order(0, 0))
    np.testing.assert_array_equal(order(0, 1), order(0, 1))
    assert not np.array_equal(first, order(0, 1))
    assert not np.array_equal(first, order(1, 0))
    assert not np.array_equal(first, np.arange(atlas.n_cells))


def test_iterating_again_repeats_the_epoch_until_set_epoch(atlas):
    loader = Loader(atlas, batch_size=50)
    a = all_index(collect(loader))
    np.testing.assert_array_equal(a, all_index(collect(loader)))
    loader.set_epoch(1)
    assert not np.array_equal(a, all_index(collect(loader)))


def test_shuffle_false_gives_store_order(atlas):
    loader = Loader(atlas, batch_size=64, shuffle=False)
    np.testing.assert_array_equal(all_index(collect(loader)), np.arange(atlas.n_cells))
    ranks = [Loader(atlas, batch_size=64, shuffle=False, rank=r, world_size=2) for r in range(2)]
    np.testing.assert_array_equal(
        np.concatenate([real_index(collect(l)) for l in ranks]), np.arange(atlas.n_cells)
    )


def test_batches_mix_blocks(atlas):
    """Rows are shuffled within the buffer: a batch draws on several blocks (of one chunk)."""
    loader = Loader(atlas, batch_size=64, blocks_per_buffer=8, rows_per_block=atlas.rows_per_chunk)
    starts, _ = loader.block_bounds()
    per_batch = [
        len(np.unique(np.searchsorted(starts, b.index.numpy(), side="right")))
        for b in collect(loader)
    ]
    assert np.median(per_batch) >= 5


def test_default_blocks_are_whole_chunks_of_at_least_1024_rows(atlas):
    """Small chunks (64 rows here, 128 by default) are read 16 at a time, not one by one."""
    assert atlas.rows_per_chunk == 64 and atlas.rows_per_block == 1024
    loader = Loader(atlas, batch_size=64)
    assert loader.rows_per_block == 1024
    one_chunk = Loader(atlas, batch_size=64, rows_per_block=atlas.rows_per_chunk)
    assert loader.n_blocks * 4 < one_chunk.n_blocks


def test_blocks_are_aligned_with_chunks(atlas):
    loader = Loader(atlas, batch_size=64)
    starts, stops = loader.block_bounds()
    indptr = np.asarray(atlas.x_group["indptr"][:])
    chunk = atlas.x_group["data"].chunks[0]
    np.testing.assert_array_equal(starts[1:], stops[:-1])
    exp_starts = {a for a, _ in atlas.experiment_ranges.values()}
    for row in starts[1:]:
        # each boundary is an experiment start or the first row at or after a chunk boundary
        k = indptr[row] // chunk
        assert row in exp_starts or indptr[row - 1] < k * chunk <= indptr[row]


# ------------------------------------------------------------------------------ selection


def test_experiment_selection(atlas):
    a, b = atlas.experiment_ranges["exp1"]
    loader = Loader(atlas, batch_size=32, experiments=["exp1"])
    assert loader.n_rows == b - a
    batches = collect(loader)
    assert_each_once(all_index(batches), np.arange(a, b))
    assert all((x.experiment == 1).all() for x in batches)

    two = Loader(atlas, batch_size=32, experiments=["exp2", "exp0"], rank=1, world_size=2)
    other = Loader(atlas, batch_size=32, experiments=["exp2", "exp0"], rank=0, world_size=2)
    got = np.concatenate([real_index(collect(two)), real_index(collect(other))])
    want = np.concatenate([np.arange(*atlas.experiment_ranges[e]) for e in ("exp0", "exp2")])
    assert_each_once(got, want)


def test_experiment_and_label_codes(atlas):
    labels, _ = atlas.categorical_codes("cell_type", 0, atlas.n_cells)
    exp_codes = atlas.experiment_codes()
    for b in collect(Loader(atlas, batch_size=100)):
        idx = b.index.numpy()
        np.testing.assert_array_equal(b.label.numpy(), labels[idx])
        np.testing.assert_array_equal(b.experiment.numpy(), exp_codes[idx])
        assert b.label.dtype == b.experiment.dtype == b.index.dtype == torch.int64
    a, b_ = atlas.experiment_ranges["exp0"]
    assert (labels[a:b_] == -1).all() and (labels[b_:] >= 0).all()


# ------------------------------------------------------------------------------ values


def test_values_equal_dense_normalise_log1p(loader_store, atlas):
    expected = dense_reference(loader_store)
    for b in collect(Loader(atlas, batch_size=100, rank=1, world_size=2)):
        dense = b.x.to_dense().numpy()
        assert dense.dtype == np.float32
        np.testing.assert_allclose(dense, expected[b.index.numpy()], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("zarr_format,compression_level", [(2, 3), (2, 0), (3, 0)])
def test_values_equal_dense_on_other_layouts(tmp_path, zarr_format, compression_level):
    """The chunk reader handles one file per chunk, shards, and uncompressed chunks alike."""
    store = build_loader_store(
        tmp_path, zarr_format=zarr_format, compression_level=compression_level, n_cells=700
    )
    loader = Loader(store, batch_size=64, blocks_per_buffer=3)
    assert all(r.direct for r in loader._readers().values())
    expected = dense_reference(store)
    batches = collect(loader)
    assert_each_once(all_index(batches), np.arange(700))
    for b in batches:
        np.testing.assert_allclose(
            b.x.to_dense().numpy(), expected[b.index.numpy()], rtol=1e-5, atol=1e-6
        )


def test_reading_through_zarr_gives_the_same_batches(atlas, monkeypatch):
    """The direct chunk reader and zarr's own reads yield identical batches."""
    import mars_scale.store as store_module

    def run():  # a fresh opening: readers are kept per opened store
        loader = Loader(open_store(atlas.path), batch_size=50, seed=2, rank=1, world_size=2,
                        blocks_per_buffer=3)
        return loader, collect(loader)

    direct_loader, direct = run()
    assert all(r.direct for r in direct_loader._readers().values())
    monkeypatch.setattr(store_module, "_chunk_files", lambda array: None)
    zarr_loader, through_zarr = run()
    assert not any(r.direct for r in zarr_loader._readers().values())
    for got, want in zip(through_zarr, direct, strict=True):
        np.testing.assert_array_equal(got.index.numpy(), want.index.numpy())
        np.testing.assert_array_equal(got.label.numpy(), want.label.numpy())
        assert torch.equal(got.x.to_dense(), want.x.to_dense())


def test_csc_copy_holds_the_same_values(atlas):
    for b in collect(Loader(atlas, batch_size=100, csc=True, experiments=["exp2"])):
        assert b.x_csc.layout == torch.sparse_csc
        assert torch.equal(b.x_csc.to_dense(), b.x.to_dense())
    assert next(iter(Loader(atlas, batch_size=100))).x_csc is None


# ------------------------------------------------------------------------------ raw mode


def test_raw_mode_yields_the_stored_counts(loader_store, atlas):
    stored = ad.read_zarr(loader_store).X.toarray()
    batches = collect(Loader(atlas, batch_size=100, normalize=False, seed=4))
    assert_each_once(all_index(batches), np.arange(atlas.n_cells))
    for b in batches:
        assert b.x.dtype == torch.float32 and b.total is None
        np.testing.assert_array_equal(b.x.to_dense().numpy(), stored[b.index.numpy()])


@pytest.mark.parametrize("dense", [False, True])
def test_normalize_batch_equals_the_normalised_mode(loader_store, atlas, dense):
    """normalize_batch on raw batches gives the loader's normalised batches and the dense
    float64 reference; the same seed gives the same rows in both modes."""
    expected = dense_reference(loader_store)
    raw = collect(Loader(atlas, batch_size=64, normalize=False, seed=5, rank=0, world_size=2))
    norm = collect(Loader(atlas, batch_size=64, seed=5, rank=0, world_size=2))
    assert len(raw) == len(norm)
    for r, n in zip(raw, norm):
        np.testing.assert_array_equal(r.index.numpy(), n.index.numpy())
        x = normalize_batch(r.x.to_dense() if dense else r.x)
        assert x.layout == (torch.strided if dense else torch.sparse_csr)
        got = x.to_dense().numpy() if not dense else x.numpy()
        np.testing.assert_allclose(got, n.x.to_dense().numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got, expected[r.index.numpy()], rtol=1e-5, atol=1e-6)


def test_normalize_batch_with_a_gene_selection_uses_the_total_over_all_genes(loader_store, atlas):
    genes = np.arange(3, atlas.n_genes, 4)
    counts = ad.read_zarr(loader_store).X.toarray().astype(np.float64)
    raw = collect(Loader(atlas, batch_size=50, normalize=False, genes=genes, seed=6))
    norm = collect(Loader(atlas, batch_size=50, genes=genes, seed=6))
    for r, n in zip(raw, norm, strict=True):
        rows = r.index.numpy()
        np.testing.assert_allclose(r.total.numpy(), counts[rows].sum(axis=1), rtol=1e-6)
        got = normalize_batch(r.x, total=r.total).to_dense().numpy()
        np.testing.assert_allclose(got, n.x.to_dense().numpy(), rtol=1e-6, atol=1e-6)
        reference = np.log1p(counts[rows][:, genes] / counts[rows].sum(axis=1, keepdims=True) * 1e4)
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)


def test_normalize_batch_keeps_empty_rows_zero_and_rejects_bad_input():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 3.0]])
    got = normalize_batch(x.to_sparse_csr(), target_sum=4.0).to_dense()
    np.testing.assert_allclose(got.numpy(), [[0, 0, 0], [np.log1p(1.0), 0, np.log1p(3.0)]], rtol=1e-6)
    for bad in (torch.ones(3), torch.ones(2, 3, dtype=torch.int64)):
        with pytest.raises(ConfigError, match="2-D floating"):
            normalize_batch(bad)
    with pytest.raises(ConfigError, match="total must have shape"):
        normalize_batch(x, total=torch.ones(3))
    with pytest.raises(ConfigError, match="target_sum"):
        normalize_batch(x, target_sum=0.0)


def test_uint16_and_int32_indices_read_the_same_cells(tmp_path, monkeypatch, loader_store, atlas):
    """Spec 0.1.2 stores column indices as uint16 (up to 65,536 genes); a store written as
    0.1.1 did (int32) reads the same cells, through the loader, read_rows and anndata."""
    import mars_scale.store as store_module

    assert atlas.spec_version == "0.1.2" and atlas.x_group["indices"].dtype == np.uint16
    monkeypatch.setattr(store_module, "UINT16_GENES", 0)
    monkeypatch.setattr(store_module, "SPEC_VERSION", "0.1.1")
    older = open_store(build_loader_store(tmp_path))  # the same seed: the same cells
    monkeypatch.undo()
    assert older.spec_version == "0.1.1" and older.x_group["indices"].dtype == np.int32
    assert (older.read_rows(0, older.n_cells) != atlas.read_rows(0, atlas.n_cells)).nnz == 0
    assert (ad.read_zarr(older.path).X != ad.read_zarr(loader_store).X).nnz == 0
    for normalize in (True, False):
        a = collect(Loader(older, batch_size=64, seed=3, normalize=normalize))
        b = collect(Loader(atlas, batch_size=64, seed=3, normalize=normalize))
        for got, want in zip(a, b, strict=True):
            np.testing.assert_array_equal(got.index.numpy(), want.index.numpy())
            assert got.x.col_indices().dtype == want.x.col_indices().dtype == torch.int32
            assert torch.equal(got.x.to_dense(), want.x.to_dense())


def test_lognorm_store_passes_values_through(tmp_path):
    from conftest import make_adata
    from mars_scale.ingest import IngestConfig, ingest

    adata = make_adata(400, 80, seed=3)
    x = adata.X.toarray().astype(np.float64)
    adata.X = sp.csr_matrix(np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4).astype(np.float32))
    adata.write_h5ad(tmp_path / "lognorm.h5ad")
    store = ingest(
        [tmp_path / "lognorm.h5ad"], tmp_path / "lognorm.zarr",
        config=IngestConfig(experiment_key="experiment", label_key="cell_type"),
    )
    atlas = open_store(store)
    assert atlas.input_kind == "lognorm"
    stored = ad.read_zarr(store).X.toarray()
    for b in collect(Loader(atlas, batch_size=64)):
        np.testing.assert_array_equal(b.x.to_dense().numpy(), stored[b.index.numpy()])


def test_batch_to_and_pin_roundtrip(atlas):
    batch = next(iter(Loader(atlas, batch_size=8)))
    moved = batch.to("cpu")
    assert moved is not batch and moved.step == batch.step
    assert torch.equal(moved.x.to_dense(), batch.x.to_dense())
    assert torch.equal(moved.index, batch.index)


# ------------------------------------------------------------------------------ resume


@pytest.mark.parametrize("k", [1, 9, 17])
def test_resume_mid_epoch_gives_identical_remainder(atlas, k):
    def make():
        return Loader(atlas, batch_size=29, seed=11, rank=1, world_size=2, blocks_per_buffer=2)

    reference = make()
    reference.set_epoch(2)
    full = collect(reference)

    first = make()
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(k)]
    state = first.state_dict()
    it.close()
    assert state["epoch"] == 2 and state["batches_consumed"] == k

    resumed = make()
    resumed.load_state_dict(state)
    rest = collect(resumed)
    assert len(head) + len(rest) == len(full)
    for got, want in zip(head + rest, full, strict=True):
        np.testing.assert_array_equal(got.index.numpy(), want.index.numpy())
        assert got.step == want.step
        assert torch.equal(got.x.to_dense(), want.x.to_dense())
    # after the resumed epoch, the next one starts from its beginning
    resumed.set_epoch(3)
    assert resumed.state_dict()["batches_consumed"] == 0


@pytest.mark.parametrize("k", [6, 7])
def test_resume_with_workers(atlas, k):
    def make():
        return Loader(atlas, batch_size=31, seed=4, blocks_per_buffer=2)

    full = collect(make().data_loader(num_workers=2))
    first = make()
    head = []
    for batch in first.data_loader(num_workers=2):
        head.append(batch)
        if len(head) == k:
            break
    state = first.state_dict()
    assert state["batches_consumed"] == k and state["num_workers"] == 2

    resumed = make()
    resumed.load_state_dict(state)
    rest = collect(resumed.data_loader(num_workers=2))
    np.testing.assert_array_equal(all_index(head + rest), all_index(full))

    other = make()
    other.load_state_dict(state)
    with pytest.raises(ConfigError, match="worker"):
        collect(other.data_loader(num_workers=0))


def test_state_mismatch_is_rejected(atlas):
    state = Loader(atlas, batch_size=16).state_dict()
    with pytest.raises(ConfigError, match="batch_size=16"):
        Loader(atlas, batch_size=32).load_state_dict(state)
    with pytest.raises(ConfigError, match="batches_consumed"):
        Loader(atlas, batch_size=16).load_state_dict({"epoch": 0, "seed": 0})


# ------------------------------------------------------------------------------ errors


def test_bad_options(atlas, loader_store):
    with pytest.raises(ConfigError, match="experiment 'nope' is not in the store"):
        Loader(atlas, batch_size=8, experiments=["nope"])
    with pytest.raises(ConfigError, match="batch_size"):
        Loader(atlas, batch_size=0)
    with pytest.raises(ConfigError, match=r"batch_size must be a positive integer, got True"):
        Loader(atlas, batch_size=True)
    with pytest.raises(ConfigError, match=r"prefetch must be a positive integer, got 2\.0"):
        Loader(atlas, batch_size=8, prefetch=2.0)
    assert Loader(atlas, batch_size=np.int64(8)).batch_size == 8  # numpy integers are integers
    with pytest.raises(ConfigError, match="together"):
        Loader(atlas, batch_size=8, rank=1)
    with pytest.raises(ConfigError, match="rank must lie"):
        Loader(atlas, batch_size=8, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="drop_last"):
        Loader(atlas, batch_size=10_000, drop_last=True)
    with pytest.raises(ConfigError, match="persistent_workers"):
        Loader(atlas, batch_size=8).data_loader(num_workers=1, persistent_workers=True)
    assert Loader(loader_store, batch_size=8).n_rows == atlas.n_cells  # a path works too


def _data_chunk_files(store: Path) -> list[Path]:
    root = store / "X" / "data"
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr")))


@pytest.mark.parametrize("zarr_format,damage", [(2, "delete"), (2, "corrupt"), (3, "corrupt"), (3, "delete")])
def test_damaged_chunk_names_store_and_rows(tmp_path, zarr_format, damage):
    store = build_loader_store(tmp_path, zarr_format=zarr_format)
    files = _data_chunk_files(store)
    assert len(files) > 2
    victim = files[1]
    if damage == "delete":
        victim.unlink()
    else:
        blob = bytearray(victim.read_bytes())
        blob[: len(blob) // 2] = b"\x17" * (len(blob) // 2)
        victim.write_bytes(bytes(blob))
    loader = Loader(store, batch_size=32, blocks_per_buffer=2)
    with pytest.raises(StoreError, match=rf"{store.name}: X rows \d+:\d+ "):
        collect(loader)


def test_damaged_chunk_error_crosses_dataloader_workers(tmp_path):
    store = build_loader_store(tmp_path, zarr_format=2)
    _data_chunk_files(store)[0].unlink()
    loader = Loader(store, batch_size=32, blocks_per_buffer=2)
    with pytest.raises(StoreError, match=rf"{store.name}: X rows \d+:\d+ "):
        collect(DataLoader(loader, batch_size=None, num_workers=2))


def test_stopping_early_releases_the_reader(atlas):
    import threading

    def ours():
        return [t for t in threading.enumerate() if t.name.startswith("mars-scale")]

    loader = Loader(atlas, batch_size=4, prefetch=1)
    it = iter(loader)
    next(it)
    assert ours()
    it.close()
    assert not ours()


# ------------------------------------------------------------------------------ memory sample


@pytest.mark.parametrize("world_size", [1, 2])
def test_memory_sample_holds_a_random_subset_with_the_loaders_values(atlas, loader_store, world_size):
    dense = dense_reference(loader_store)
    genes = np.arange(0, atlas.n_genes, 3)
    a, b = atlas.experiment_ranges["exp1"]
    shares = []
    for rank in range(world_size):
        loader = Loader(atlas, batch_size=40, experiments=["exp1", "exp2"], seed=5, blocks_per_buffer=2, genes=genes,
                        rank=rank, world_size=world_size)
        sample = MemorySample(loader, 150, seed=9)
        assert sample.n_rows == 150 and len(sample) == 4
        one_pass = list(sample.batches(64))
        assert [x.n_rows for x in one_pass] == [64, 64, 22]
        index = all_index(one_pass)
        shares.append(index)
        assert len(np.unique(index)) == 150 and index.min() >= a  # distinct annotated rows, exp0 not among them
        x = np.concatenate([x.x.to_dense().numpy() for x in one_pass])
        np.testing.assert_allclose(x, dense[np.ix_(index, genes)], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.concatenate([x.experiment.numpy() for x in one_pass]), np.where(index < b, 1, 2))
    assert not (world_size == 2 and np.intersect1d(*shares).size)  # the ranks' samples are disjoint
    # not the first rows of the store: a shuffled draw
    assert not np.array_equal(np.sort(shares[0]), np.arange(a, a + 150))


def test_memory_sample_stream_is_a_new_permutation_each_pass_and_resumes(atlas):
    sample = MemorySample(Loader(atlas, batch_size=32, experiments=["exp1"], seed=1), 100, seed=3)
    stream = sample.stream(4)
    passes = [all_index([next(stream) for _ in range(len(sample))]) for _ in range(3)]
    for p in passes:
        assert_each_once(p, sample.index)
    assert not np.array_equal(passes[0], passes[1])
    again = sample.stream(4, skip=5)  # resumed 5 batches in: the second pass from its second batch
    np.testing.assert_array_equal(all_index([next(again) for _ in range(2)]), passes[1][32:96])
    other = sample.stream(5)
    assert not np.array_equal(all_index([next(other) for _ in range(len(sample))]), passes[0])
    with pytest.raises(ConfigError, match="max_rows"):
        MemorySample(Loader(atlas, batch_size=32, seed=1), 0, seed=3)
