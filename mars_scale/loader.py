"""Block-shuffled, rank- and worker-sharded streaming loader over an atlas store.

How an epoch is drawn (all of it a function of ``(seed, epoch)``, nothing global):

1. **Blocks.** The selected rows are cut into blocks of contiguous rows aligned with the
   store's chunks of ``X/data`` (a zarr chunk is decompressed whole, so a block that covered
   part of a chunk would pay for all of it). Blocks never cross an experiment boundary.
2. **Permutation.** The blocks are permuted with ``np.random.default_rng([seed, epoch])`` and
   laid end to end: a sequence of the ``N`` selected rows.
3. **Ranks.** Rank ``r`` of ``world_size`` takes positions ``[r R, (r + 1) R)`` of that
   sequence, ``R = ceil(N / world_size)``; positions past ``N`` wrap around to the start and are
   flagged as padding (``Batch.is_padding``), fewer than ``world_size`` rows in all. Every rank
   therefore yields the same number of batches of the same sizes, which DDP needs.
   ``drop_last=True`` uses ``R = floor(N / world_size)`` and full batches only, without padding.
4. **Buffers and workers.** A rank's batches are grouped into shuffle buffers of about
   ``blocks_per_buffer`` blocks (a whole number of batches). Worker ``w`` of ``W`` takes every
   ``W``-th buffer, and the final partial round of buffers is split batch-wise, so the worker
   counts differ by at most one, the extra batches going to the lowest worker ids. A torch
   ``DataLoader`` polls its workers round-robin, so the rank's ``i``-th batch is the
   ``i // W``-th batch of worker ``i % W`` (``Batch.step == i``). The batches of an epoch are
   the same for any ``W``; their order is not (it interleaves the workers' buffers).
5. **Within a buffer.** The row pointers of its blocks are read first; then a thread pool
   decompresses each block straight into its place in the buffer's values and indices
   (:class:`~mars_scale.store.RangeReader`, which bypasses zarr's per-call machinery; blosc
   releases the GIL; column indices stay in the store's dtype, uint16 for up to 65,536
   genes), checks its rows and normalises them there while they are still in cache (log1p of
   counts scaled to ``target_sum``; one compiled pass, :mod:`mars_scale.kernels`), unless
   ``normalize=False``: then the batches hold the stored counts and :func:`normalize_batch`
   normalises them wherever they go (e.g. on the GPU). The buffer's rows are shuffled with a
   generator seeded by ``(seed, epoch, rank, first batch)`` and gathered into batches by a
   compiled loop that widens the indices to int32, into arrays reused once the consumer has
   let go of the batch that held them. A background thread reads the next buffer (into a
   second set of arrays) while the current one is consumed and keeps at most ``prefetch``
   batches ready.

Memory is bounded by two buffers plus ``prefetch`` batches per worker, whatever the number of
cells. The position in an epoch is part of :meth:`Loader.state_dict`; resuming yields exactly
the remaining batches.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mars_scale.errors import ConfigError, StoreError, positive_int
from mars_scale.preprocess import row_scale
from mars_scale.store import Atlas, RangeReader, as_store, x_rows_damage

__all__ = ["Batch", "Loader", "MemorySample", "normalize_batch"]

logger = logging.getLogger(__name__)

# Emitted by torch for the first sparse CSR tensor of a process and when one crosses from a
# DataLoader worker; nothing a user can act on.
for _message in ("Sparse CSR tensor support is in beta", "Sparse invariant checks are implicitly"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)

_STATE_VERSION = 1
_INDPTR_WINDOW = 1 << 20  # rows of indptr read at a time while cutting blocks
_LABEL_COLUMN = "obs/cell_type/codes"
_NO_SCALE = np.empty(0, dtype=np.float32)  # check_scale_rows: check only


# ---------------------------------------------------------------------------------------------
# Batch


@dataclass
class Batch:
    """One minibatch of cells.

    Attributes
    ----------
    x
        ``torch.sparse_csr_tensor`` of shape ``(n_rows, n_genes)``, float32: the
        log1p-normalised values (target sum 10,000), or the stored values of a ``lognorm``
        store or of a raw loader (``Loader(normalize=False)``). Row pointer and column indices share one dtype: int32, or int64 for a batch of
        2**31 values or more.
    experiment
        int64 experiment code of each row (position in ``Atlas.experiments``).
    label
        int64 cell-type code of each row (position in ``Atlas.cell_types``), -1 = unannotated.
    index
        int64 global row id of each row in the store.
    is_padding
        bool, true for rows repeated only to give every rank the same number of batches;
        a loss can drop them with ``~batch.is_padding``.
    epoch
        The epoch the batch belongs to.
    step
        Position of the batch in its rank's epoch (0-based, ``len(loader)`` batches).
    x_csc
        The same values as a ``torch.sparse_csc_tensor`` (``Loader(csc=True)``), for the
        column-wise weight gradient of :class:`mars_scale.nn.SparseScaledLinear`; else ``None``.
    total
        float32 total of each row over all of the store's genes, given by a raw loader
        (``Loader(normalize=False)``) with a gene selection, for :func:`normalize_batch`;
        else ``None`` (the rows of ``x`` hold every gene, so their sums are the totals).
    """

    x: torch.Tensor
    experiment: torch.Tensor
    label: torch.Tensor
    index: torch.Tensor
    is_padding: torch.Tensor
    epoch: int = 0
    step: int = 0
    x_csc: torch.Tensor | None = None
    total: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        """Number of rows (cells), padding included."""
        return int(self.index.shape[0])

    @property
    def n_padding(self) -> int:
        """Number of padding rows."""
        return int(self.is_padding.sum())

    def _map(self, fn) -> "Batch":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                values[key] = fn(value)
        return Batch(**values)

    def to(self, device: str | torch.device, *, non_blocking: bool = False) -> "Batch":
        """Copy every tensor to ``device``.

        Parameters
        ----------
        device
            Target device, e.g. ``"cuda"``.
        non_blocking
            Passed to :meth:`torch.Tensor.to` (asynchronous from pinned memory).

        Returns
        -------
        Batch
            A new batch; this one is unchanged.
        """
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-lock every tensor (used by ``DataLoader(pin_memory=True)``).

        Returns
        -------
        Batch
            A new batch in pinned memory.
        """
        return self._map(lambda t: t.pin_memory())


# ---------------------------------------------------------------------------------------------
# Plan of an epoch


@dataclass(frozen=True)
class _Buffer:
    """A contiguous range of one rank's batches, read and shuffled together."""

    first: int  # first batch (rank-local index)
    stop: int  # one past the last batch


@dataclass
class _BufferData:
    ptr: np.ndarray  # int64 row pointer of the buffer's rows
    values: np.ndarray  # float32, normalised or stored
    indices: np.ndarray  # column indices, in the store's dtype (uint16 or int32)
    n_cols: int
    experiment: np.ndarray
    label: np.ndarray
    index: np.ndarray
    is_padding: np.ndarray
    total: np.ndarray | None = None  # row totals over all genes (raw mode with a gene selection)


class _Scratch:
    """Values, indices and row totals of a buffer, kept and reused from buffer to buffer."""

    def __init__(self, index_dtype) -> None:
        self.values = np.empty(0, dtype=np.float32)
        self.indices = np.empty(0, dtype=index_dtype)
        self.totals = np.empty(0, dtype=np.float32)

    def take(self, n: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``n`` values and indices and ``rows`` totals, grown by a quarter when too small."""
        if self.values.shape[0] < n:
            capacity = int(n * 1.25) + 1
            self.values = np.empty(capacity, dtype=np.float32)
            self.indices = np.empty(capacity, dtype=self.indices.dtype)
        if self.totals.shape[0] < rows:
            self.totals = np.empty(int(rows * 1.25) + 1, dtype=np.float32)
        return self.values[:n], self.indices[:n], self.totals[:rows]


@dataclass
class _Pending:
    """A buffer whose values and indices are being read by the pool."""

    spans: list[tuple[int, int, bool]]
    ptrs: list[np.ndarray]  # X/indptr of each span
    offsets: np.ndarray  # where each span starts in values and indices
    values: np.ndarray
    indices: np.ndarray
    totals: np.ndarray | None  # float32 total of each row over all genes, if wanted
    futures: list[Future]  # label codes of each span


class _OutputRing:
    """Arrays that batches are gathered into, reused once nothing else refers to them.

    A batch's tensors share memory with these arrays (``torch.from_numpy``). A fresh array of
    a megabyte or two per batch is mapped anew by the allocator and page-faulted in, which
    cost as much system time as the gather itself. A slot is reused only when this ring holds
    the only reference to its arrays (``sys.getrefcount``): a batch the consumer still keeps,
    or has handed to a ``DataLoader``'s queue, is never written over; its slot gets new arrays.
    """

    def __init__(self, size: int) -> None:
        self._values: list[np.ndarray | None] = [None] * size
        self._indices: list[np.ndarray | None] = [None] * size
        self._next = 0

    def take(self, n: int, index_dtype) -> tuple[np.ndarray, np.ndarray]:
        """``n`` free slots of float32 values and of column indices of ``index_dtype``."""
        i = self._next
        self._next = (i + 1) % len(self._values)
        # 2 = the list's reference and getrefcount's argument: no batch holds them.
        free = (
            self._values[i] is not None and sys.getrefcount(self._values[i]) == 2
            and sys.getrefcount(self._indices[i]) == 2
            and self._values[i].shape[0] >= n and self._indices[i].dtype == index_dtype
        )
        if not free:
            capacity = int(n * 1.25) + 1
            self._values[i] = np.empty(capacity, dtype=np.float32)
            self._indices[i] = np.empty(capacity, dtype=index_dtype)
        return self._values[i][:n], self._indices[i][:n]


def _gather_rows(data: _BufferData, rows: np.ndarray, ring: _OutputRing) -> sp.csr_matrix:
    """Rows ``rows`` of a buffer, in that order, as a CSR matrix over arrays of ``ring``.

    One compiled pass copies the rows and widens uint16 column indices to the batch's index
    dtype (int32, or int64 for a batch of 2**31 values or more).
    """
    from mars_scale.kernels import gather_rows

    ptr = data.ptr
    lengths = ptr[rows + 1] - ptr[rows]
    n = int(lengths.sum())
    index_dtype = np.int32 if n < np.iinfo(np.int32).max else np.int64
    out_ptr = np.empty(rows.shape[0] + 1, dtype=index_dtype)
    values, indices = ring.take(n, index_dtype)
    gather_rows(ptr, data.values, data.indices, rows, out_ptr, values, indices)
    return sp.csr_matrix((values, indices, out_ptr), shape=(rows.shape[0], data.n_cols), copy=False)


def _to_torch(matrix: sp.csr_matrix | sp.csc_matrix, factory) -> torch.Tensor:
    """A torch sparse CSR/CSC tensor sharing memory with a scipy matrix (one index dtype)."""
    index_dtype = np.result_type(matrix.indptr.dtype, matrix.indices.dtype)
    return factory(
        torch.from_numpy(matrix.indptr.astype(index_dtype, copy=False)),
        torch.from_numpy(matrix.indices.astype(index_dtype, copy=False)),
        torch.from_numpy(np.ascontiguousarray(matrix.data, dtype=np.float32)),
        size=matrix.shape,
        check_invariants=False,
    )


def normalize_batch(
    x: torch.Tensor, *, target_sum: float = 1e4, total: torch.Tensor | None = None
) -> torch.Tensor:
    """Normalise each row of a raw batch to ``target_sum`` and take ``log1p``, on its device.

    The loader's normalised mode, for the batches of ``Loader(normalize=False)`` (raw counts
    of a ``counts`` store), so that normalisation can run where the batch goes, e.g. on the
    GPU after ``batch.to("cuda")``: ``normalize_batch(batch.x, total=batch.total)`` equals the
    ``batch.x`` of ``Loader(normalize=True)`` (to float32 rounding). Zeros stay zero, a row
    whose total is zero stays zero. A ``lognorm`` store's values are already normalised.

    Parameters
    ----------
    x
        Raw values: a ``torch.sparse_csr_tensor`` (as the loader yields) or a dense 2-D tensor,
        floating point.
    target_sum
        Total of each row after normalisation.
    total
        Total of each row before normalisation, shape ``(n_rows,)``; default: the row sums of
        ``x``. A loader with a gene selection gives it as ``Batch.total``.

    Returns
    -------
    torch.Tensor
        ``log1p(x * target_sum / total)`` in the layout, dtype and device of ``x``.

    Raises
    ------
    ConfigError
        If ``x`` is not a 2-D floating CSR or dense tensor, ``total`` has the wrong shape or
        ``target_sum`` is not a positive number.
    """
    if not (np.isfinite(target_sum) and target_sum > 0):
        raise ConfigError(f"target_sum must be a positive number, got {target_sum!r}.")
    if x.dim() != 2 or not x.dtype.is_floating_point or x.layout not in (torch.sparse_csr, torch.strided):
        raise ConfigError(
            f"x must be a 2-D floating sparse CSR or dense tensor, got {x.layout} {x.dtype} "
            f"of {x.dim()} dimensions."
        )
    if total is not None and tuple(total.shape) != (x.shape[0],):
        raise ConfigError(f"total must have shape ({x.shape[0]},), got {tuple(total.shape)}.")
    sparse = x.layout == torch.sparse_csr
    values = x.values() if sparse else x
    if total is None:
        if sparse:
            total = torch.segment_reduce(values, "sum", offsets=x.crow_indices())
        else:
            total = x.sum(dim=1)
    total = total.to(device=x.device, dtype=x.dtype)
    scale = torch.where(total > 0, target_sum / total, torch.zeros_like(total))
    if sparse:
        counts = x.crow_indices().diff()
        out = torch.log1p(values * torch.repeat_interleave(scale, counts))
        return torch.sparse_csr_tensor(
            x.crow_indices(), x.col_indices(), out, size=x.shape, check_invariants=False
        )
    return torch.log1p(x * scale[:, None])


def _resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ConfigError("rank and world_size must be given together (or both left out).")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}.")
    return int(rank), int(world_size)


class Loader(IterableDataset):
    """Minibatches of sparse log1p-normalised (or raw) cells streamed from an atlas store.

    Iterate it directly (one process, one background reader thread) or wrap it in a torch
    ``DataLoader(loader, batch_size=None, num_workers=W)``; :meth:`data_loader` does that and
    keeps :meth:`state_dict` up to date. Call :meth:`set_epoch` before each epoch, as with
    ``DistributedSampler``: the order is a function of ``(seed, epoch)`` only.

    Parameters
    ----------
    store
        An :class:`~mars_scale.store.Atlas` or the path of a store.
    batch_size
        Rows per batch. The last batch of an epoch may be smaller (same size on every rank)
        unless ``drop_last``.
    experiments
        Names of the experiments to draw from (default: all).
    shuffle
        Permute blocks and rows (default). ``False`` yields rows in store order (with
        ``W > 1`` workers, each batch is a contiguous range but batches from different workers
        interleave; use ``Batch.index``).
    seed
        Seed of the permutations; the order depends on ``(seed, epoch)`` only.
    rank, world_size
        This process's rank and the number of ranks. By default from an initialised
        ``torch.distributed`` process group, else 0 and 1.
    rows_per_block
        Target rows per I/O block (default: ``Atlas.rows_per_block``, whole chunks of at
        least 1,024 rows). Blocks are
        aligned to whole chunks of ``X/data`` when at least one chunk long.
    blocks_per_buffer
        Blocks per shuffle buffer: rows are shuffled within a buffer. Memory grows with it.
    drop_last
        Drop the rows that do not fill a batch (and do not pad ranks) instead of yielding a
        smaller last batch.
    prefetch
        Batches kept ready by the background thread.
    n_threads
        Concurrent block reads (default: ``min(blocks_per_buffer, 4)``).
    target_sum
        Total of each cell after normalisation (``counts`` stores).
    csc
        Also give each batch a CSC copy (``Batch.x_csc``).
    genes
        Store positions of the genes to yield (ascending), e.g. a model's highly variable
        genes; cells are still normalised by their total over all genes, as scanpy normalises
        before selecting genes. Default: every gene.
    normalize
        Yield log1p-normalised values (default). ``False`` yields the stored values (the raw
        counts of a ``counts`` store) and leaves normalisation to the consumer, for example on
        the GPU with :func:`normalize_batch`; with ``genes``, each batch then carries the row
        totals over all genes (``Batch.total``).

    Raises
    ------
    ConfigError
        For an invalid option, an unknown experiment or a selection with no rows.
    StoreError
        If the store cannot be opened or its ``X/indptr`` cannot be read.
    """

    def __init__(
        self,
        store: Atlas | str | os.PathLike,
        *,
        batch_size: int,
        experiments: Sequence[str] | str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        rows_per_block: int | None = None,
        blocks_per_buffer: int = 16,
        drop_last: bool = False,
        prefetch: int = 2,
        n_threads: int | None = None,
        target_sum: float = 1e4,
        csc: bool = False,
        genes: Sequence[int] | np.ndarray | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.batch_size = positive_int(batch_size, name="batch_size")
        self.blocks_per_buffer = positive_int(blocks_per_buffer, name="blocks_per_buffer")
        self.prefetch = positive_int(prefetch, name="prefetch")
        self.n_threads = positive_int(
            min(self.blocks_per_buffer, 4) if n_threads is None else n_threads, name="n_threads"
        )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
        if not (np.isfinite(target_sum) and target_sum > 0):
            raise ConfigError(f"target_sum must be a positive number, got {target_sum!r}.")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.csc = bool(csc)
        self.normalize = bool(normalize)
        self.target_sum = float(target_sum)
        self.rank, self.world_size = _resolve_rank(rank, world_size)

        self._store: Atlas | None = as_store(store)
        self.path = Path(self._store.path)
        self._store_genes = self._store.n_genes
        self.genes = None
        if genes is not None:
            self.genes = np.asarray(genes, dtype=np.int64)
            if (self.genes.ndim != 1 or len(self.genes) == 0 or (np.diff(self.genes) <= 0).any()
                    or self.genes[0] < 0 or self.genes[-1] >= self._store_genes):
                raise ConfigError(
                    f"{self.path}: genes must be ascending positions in 0..{self._store_genes - 1}."
                )
        self.n_genes = self._store_genes if self.genes is None else len(self.genes)
        self._gene_position = None  # store gene -> position in genes, or -1
        if self.genes is not None:
            self._gene_position = np.full(self._store_genes, -1, dtype=np.int64)
            self._gene_position[self.genes] = np.arange(len(self.genes))
        self.input_kind = self._store.input_kind
        self.rows_per_block = positive_int(
            self._store.rows_per_block if rows_per_block is None else rows_per_block, name="rows_per_block"
        )
        self.experiments = self._select(experiments)
        names = self._store.experiments
        self._exp_starts = np.array(
            [self._store.experiment_ranges[n][0] for n in names], dtype=np.int64
        )
        self._starts, self._stops = self._cut_blocks()
        self.n_rows = int((self._stops - self._starts).sum())
        if self.n_rows == 0:
            raise ConfigError(f"{self.path}: the selected experiments hold no cells.")
        per_rank = (
            self.n_rows // self.world_size
            if self.drop_last
            else -(-self.n_rows // self.world_size)
        )
        self.rows_per_rank = per_rank
        self._n_batches = (
            per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)
        )
        if self._n_batches == 0:
            raise ConfigError(
                f"{self.path}: {self.n_rows} selected cells over {self.world_size} ranks do not "
                f"fill one batch of {self.batch_size} with drop_last=True."
            )
        mean_rows = self.n_rows / len(self._starts)
        self.batches_per_buffer = max(
            1, int(round(self.blocks_per_buffer * mean_rows / self.batch_size))
        )
        self._epoch = 0
        self._consumed = 0
        self._num_workers: int | None = None  # worker count the position was counted with
        logger.debug(
            "loader over %s: %d cells in %d blocks (%.0f rows each), %d batches of %d per rank "
            "(rank %d of %d), %d batches per buffer",
            self.path, self.n_rows, len(self._starts), mean_rows, self._n_batches,
            self.batch_size, self.rank, self.world_size, self.batches_per_buffer,
        )

    # -- setup ----------------------------------------------------------------------------
    def _select(self, experiments) -> list[str]:
        names = self._store.experiments
        if experiments is None:
            return list(names)
        if isinstance(experiments, str):
            experiments = [experiments]
        chosen = list(dict.fromkeys(str(e) for e in experiments))
        unknown = [e for e in chosen if e not in self._store.experiment_ranges]
        if unknown:
            raise ConfigError(
                f"{self.path}: experiment {unknown[0]!r} is not in the store "
                f"(experiments: {', '.join(names)})."
            )
        if not chosen:
            raise ConfigError(f"{self.path}: experiments is empty; name at least one.")
        return [n for n in names if n in chosen]  # store order

    def _cut_blocks(self) -> tuple[np.ndarray, np.ndarray]:
        """Row blocks of about ``rows_per_block`` rows, aligned with chunks of ``X/data``."""
        store = self._store
        n = store.n_cells
        x = store.x_group
        key = "X/indptr"
        try:
            indptr = x["indptr"]
            nnz = int(indptr[n])
            key = "X/data"
            chunk = int(x["data"].chunks[0])
            n_data = int(x["data"].shape[0])
        except Exception as exc:
            raise StoreError(
                f"{self.path}: {key} cannot be read ({type(exc).__name__}: {exc}); "
                "the store is damaged, re-run \"mars-scale ingest\"."
            ) from exc
        target = self.rows_per_block * nnz / max(n, 1)
        if target >= chunk:  # whole chunks per block
            step = chunk * max(1, int(round(target / chunk)))
        else:
            step = max(1, int(round(target)))
        if nnz != n_data:
            raise StoreError(
                f"{self.path}: X/indptr ends at {nnz} but X/data holds {n_data} values; "
                "the store is damaged, re-run \"mars-scale ingest\"."
            )
        cuts = [np.array([0, n], dtype=np.int64)]
        marks = np.arange(step, nnz, step, dtype=np.int64)
        prev = 0
        for w0 in range(0, n, _INDPTR_WINDOW):
            w1 = min(n, w0 + _INDPTR_WINDOW)
            try:
                ptr = np.asarray(indptr[w0 : w1 + 1], dtype=np.int64)
            except Exception as exc:
                raise StoreError(
                    f"{self.path}: X/indptr rows {w0}:{w1} cannot be read "
                    f"({type(exc).__name__}); the store is damaged, re-run \"mars-scale ingest\"."
                ) from exc
            # indptr starts at 0 and never decreases; a missing chunk reads back as zeros.
            if ptr[0] != prev or (np.diff(ptr) < 0).any():
                raise StoreError(
                    f"{self.path}: X/indptr rows {w0}:{w1} decrease (a chunk is missing or "
                    "corrupt); the store is damaged, re-run \"mars-scale ingest\"."
                )
            prev = int(ptr[-1])
            lo, hi = np.searchsorted(marks, [ptr[0], ptr[-1]], side="right")
            if hi > lo:  # first row whose data starts at or after each mark
                cuts.append(w0 + np.searchsorted(ptr, marks[lo:hi], side="left"))
        cuts.append(self._exp_starts)
        bounds = np.unique(np.concatenate(cuts))
        starts, stops = bounds[:-1], bounds[1:]
        keep = np.zeros(len(starts), dtype=bool)
        for name in self.experiments:
            a, b = self._store.experiment_ranges[name]
            keep |= (starts >= a) & (stops <= b)
        return starts[keep].copy(), stops[keep].copy()

    @property
    def store(self) -> Atlas:
        """The opened store (reopened lazily in a worker process)."""
        if self._store is None:
            self._store = open_store(self.path)
        return self._store

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None  # reopened in the worker, with its own readers
        return state

    # -- public state ---------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per rank in one epoch."""
        return self._n_batches

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._epoch

    @property
    def n_blocks(self) -> int:
        """Number of I/O blocks over the selected experiments."""
        return int(len(self._starts))

    def block_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Start and stop rows of the I/O blocks (copies), in store order."""
        return self._starts.copy(), self._stops.copy()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its order) and rewind to its start.

        Parameters
        ----------
        epoch
            Non-negative epoch number.

        Raises
        ------
        ConfigError
            If ``epoch`` is negative.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ConfigError(f"epoch must be a non-negative integer, got {epoch!r}.")
        self._epoch = int(epoch)
        self._consumed = 0
        self._num_workers = None

    def state_dict(self) -> dict:
        """The position of the loader, as plain values for a checkpoint.

        Returns
        -------
        dict
            ``epoch``, ``batches_consumed`` (of this rank's epoch), ``seed``, ``num_workers``
            (the worker count the position was counted with, ``None`` if unknown) and the
            options that fix the order (``batch_size``, ``world_size``, ``shuffle``,
            ``drop_last``, ``blocks_per_buffer``, ``n_rows``, ``n_blocks``, ``experiments``).
        """
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "batches_consumed": self._consumed,
            "seed": self.seed,
            "num_workers": self._num_workers,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "blocks_per_buffer": self.blocks_per_buffer,
            "n_rows": self.n_rows,
            "n_blocks": self.n_blocks,
            "experiments": list(self.experiments),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by :meth:`state_dict`; the next iteration resumes there.

        The seed is taken from ``state``; every other option that fixes the order must match.

        Parameters
        ----------
        state
            A dictionary from :meth:`state_dict` (possibly of another rank).

        Raises
        ------
        ConfigError
            If a key is missing or an option differs from this loader's.
        """
        required = ("epoch", "batches_consumed", "seed")
        missing = [k for k in required if k not in state]
        if missing:
            raise ConfigError(f"loader state lacks {missing[0]!r}; it is not from Loader.state_dict.")
        ours = self.state_dict()
        for key in (
            "batch_size", "world_size", "shuffle", "drop_last", "blocks_per_buffer",
            "n_rows", "n_blocks", "experiments",
        ):
            if key in state and state[key] != ours[key]:
                raise ConfigError(
                    f"{self.path}: loader state has {key}={state[key]!r} but this loader has "
                    f"{ours[key]!r}; build the loader with the options it was saved with."
                )
        consumed = int(state["batches_consumed"])
        if not 0 <= consumed <= self._n_batches:
            raise ConfigError(
                f"loader state has batches_consumed={consumed}, outside 0..{self._n_batches}."
            )
        self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._consumed = consumed
        nw = state.get("num_workers")
        self._num_workers = None if nw is None else int(nw)

    def data_loader(self, *, num_workers: int = 0, **kwargs: Any) -> "_TrackedDataLoader":
        """Wrap this loader in a torch ``DataLoader`` that keeps :meth:`state_dict` current.

        Parameters
        ----------
        num_workers
            Worker processes (0: read in this process).
        **kwargs
            Other ``DataLoader`` options (``pin_memory``, ``multiprocessing_context``, ...).
            ``batch_size`` is fixed to ``None``; ``persistent_workers`` must stay false so
            each epoch's workers see :meth:`set_epoch`.

        Returns
        -------
        iterable
            Yields :class:`Batch` objects; ``len()`` is batches per rank per epoch.

        Raises
        ------
        ConfigError
            If ``persistent_workers``, ``batch_size`` or ``sampler`` is passed.
        """
        for key in ("batch_size", "sampler", "batch_sampler", "collate_fn"):
            if key in kwargs:
                raise ConfigError(f"data_loader sets {key} itself; do not pass it.")
        if kwargs.get("persistent_workers"):
            raise ConfigError(
                "persistent_workers=True would keep each worker's first epoch; leave it false."
            )
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be a non-negative integer, got {num_workers!r}.")
        return _TrackedDataLoader(self, num_workers, kwargs)

    # -- the epoch plan -------------------------------------------------------------------
    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Block order of an epoch and the cumulative row offsets along it."""
        n = len(self._starts)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        cum = np.zeros(n + 1, dtype=np.int64)
        np.cumsum((self._stops - self._starts)[order], out=cum[1:])
        return order, cum

    def _spans(self, order, cum, p0: int, p1: int) -> list[tuple[int, int, bool]]:
        """Store row ranges of the epoch sequence positions ``[p0, p1)``; past ``N`` wraps."""
        n = self.n_rows
        spans: list[tuple[int, int, bool]] = []
        while p0 < p1:
            lap, q0 = divmod(p0, n)
            q1 = min(n, q0 + (p1 - p0))
            i = int(np.searchsorted(cum, q0, side="right")) - 1
            q = q0
            while q < q1:
                blk = order[i]
                take = min(q1, int(cum[i + 1])) - q
                a = int(self._starts[blk] + (q - cum[i]))
                spans.append((a, a + take, lap > 0))
                q += take
                i += 1
            p0 += q1 - q0
        return spans

    def _batch_rows(self, b: int) -> tuple[int, int]:
        """Rank-local positions of batch ``b``."""
        return b * self.batch_size, min((b + 1) * self.batch_size, self.rows_per_rank)

    def _worker_buffers(self, n_workers: int, worker: int) -> list[_Buffer]:
        """The buffers of one worker, in the order it yields them."""
        nb, per, w_n = self._n_batches, self.batches_per_buffer, n_workers
        rounds = nb // (per * w_n)
        out = [_Buffer(r * per * w_n + worker * per, r * per * w_n + (worker + 1) * per)
               for r in range(rounds)]
        rest = nb - rounds * per * w_n
        base, extra = divmod(rest, w_n)
        count = base + (worker < extra)
        first = rounds * per * w_n + worker * base + min(worker, extra)
        for b in range(first, first + count, per):
            out.append(_Buffer(b, min(b + per, first + count)))
        return out

    # -- reading --------------------------------------------------------------------------
    def _readers(self) -> dict[str, RangeReader]:
        """Readers of X and the labels: the store's own, shared by every loader on it."""
        key = "X"
        try:
            readers = {}
            for name, key in (
                ("indptr", "X/indptr"), ("data", "X/data"), ("indices", "X/indices"),
                ("label", _LABEL_COLUMN),
            ):
                readers[name] = self.store.reader(key)
            return readers
        except KeyError:
            raise StoreError(
                f"{self.path}: {key} is missing (re-run \"mars-scale ingest\")."
            ) from None
        except Exception as exc:  # unreadable metadata
            raise StoreError(
                f"{self.path}: {key} cannot be opened ({type(exc).__name__}: {exc}); "
                "the store is damaged, re-run \"mars-scale ingest\"."
            ) from exc

    def _damaged(self, what: str, exc: BaseException | None = None) -> StoreError:
        cause = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        return StoreError(
            f"{self.path}: {what}{cause}; the store is damaged, re-run \"mars-scale ingest\"."
        )

    def _read_indptr(self, a: int, b: int) -> np.ndarray:
        """``X/indptr[a : b + 1]`` (int64), checked to be non-decreasing."""
        try:
            ptr = self._readers()["indptr"].read(a, b + 1).astype(np.int64, copy=False)
        except Exception as exc:
            raise self._damaged(f"X rows {a}:{b} cannot be read", exc) from exc
        problem = x_rows_damage(ptr, nnz=self._readers()["data"].size)
        if problem:
            raise self._damaged(f"X rows {a}:{b} {problem}")
        return ptr

    def _read_span(
        self, a: int, b: int, ptr: np.ndarray, values: np.ndarray, indices: np.ndarray,
        totals: np.ndarray | None,
    ) -> np.ndarray:
        """Read rows ``a:b`` into ``values`` (normalised in place), ``indices`` and ``totals``.

        ``ptr`` is ``X/indptr[a : b + 1]``; ``values`` and ``indices`` are its
        ``ptr[-1] - ptr[0]`` slots of the buffer, ``totals`` (if given) its ``b - a`` row
        totals. Runs in the reader pool: decompression, numpy and the compiled loop release the
        GIL. The rows are summed as :func:`~mars_scale.preprocess.normalize_log1p` sums them,
        then checked and scaled in one pass while still in cache
        (:func:`mars_scale.kernels.check_scale_rows`), then log-transformed: the values equal
        ``normalize_log1p``'s bit for bit. Returns the label codes of the rows.
        """
        from mars_scale.kernels import check_scale_rows

        readers = self._readers()
        lo, hi = int(ptr[0]), int(ptr[-1])
        try:
            readers["data"].read(lo, hi, out=values)
            readers["indices"].read(lo, hi, out=indices)
        except Exception as exc:
            raise self._damaged(f"X rows {a}:{b} cannot be read", exc) from exc
        normalize = self.normalize and self.input_kind == "counts"
        if normalize or totals is not None:
            row_totals, scale = row_scale(ptr, values, target_sum=self.target_sum)
            if totals is not None:
                totals[:] = row_totals
        bad = check_scale_rows(
            ptr - lo, values, indices, self._store_genes, scale if normalize else _NO_SCALE
        )
        if bad >= 0:  # x_rows_damage says what is wrong
            problem = x_rows_damage(ptr, values, indices, n_genes=self._store_genes)
            raise self._damaged(f"X rows {a}:{b} {problem or f'are damaged at row {a + bad}'}")
        if normalize:  # log1p(values * target_sum / total), as normalize_log1p
            np.log1p(values, out=values)
        try:
            return readers["label"].read(a, b).astype(np.int64, copy=False)
        except Exception as exc:
            raise self._damaged(f"obs/cell_type rows {a}:{b} cannot be read", exc) from exc

    def _submit(self, spans, pool: ThreadPoolExecutor, scratch: _Scratch) -> _Pending:
        """Start reading a buffer: row pointers here, values and indices in the pool.

        Each span is decompressed straight into its place in the buffer's arrays, which are
        kept in ``scratch`` and reused (a fresh array this size would be mapped anew from the
        system each time, and its page faults cost as much as a copy).
        """
        ptrs = [self._read_indptr(a, b) for a, b, _ in spans]
        offsets = np.zeros(len(spans) + 1, dtype=np.int64)
        np.cumsum([int(p[-1] - p[0]) for p in ptrs], out=offsets[1:])
        row_offsets = np.zeros(len(spans) + 1, dtype=np.int64)
        np.cumsum([b - a for a, b, _ in spans], out=row_offsets[1:])
        values, indices, totals = scratch.take(int(offsets[-1]), int(row_offsets[-1]))
        if self.genes is None or self.normalize:
            totals = None  # only a raw loader with a gene selection gives them
        futures = [
            pool.submit(self._read_span, a, b, ptr, values[o0:o1], indices[o0:o1],
                        None if totals is None else totals[r0:r1])
            for (a, b, _), ptr, o0, o1, r0, r1 in zip(
                spans, ptrs, offsets[:-1], offsets[1:], row_offsets[:-1], row_offsets[1:]
            )
        ]
        return _Pending(spans, ptrs, offsets, values, indices, totals, futures)

    def _collect(self, pending: _Pending) -> _BufferData:
        """Wait for a buffer's reads and describe it as one CSR matrix with its row data."""
        label = np.concatenate([f.result() for f in pending.futures])
        ptr = np.concatenate(
            [np.zeros(1, dtype=np.int64)]
            + [p[1:] - p[0] + off for p, off in zip(pending.ptrs, pending.offsets[:-1])]
        )
        values, indices, n_cols, total = pending.values, pending.indices, self._store_genes, None
        if self.genes is not None:  # after normalising by the total over all genes
            from mars_scale.kernels import select_columns

            if not self.normalize:
                total = pending.totals.copy()
            kept = np.empty_like(ptr)
            n = select_columns(ptr, values, indices, self._gene_position, kept)
            ptr, values, indices, n_cols = kept, values[:n], indices[:n], len(self.genes)
        spans = pending.spans
        index = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b, _ in spans])
        pad = np.concatenate([np.full(b - a, p, dtype=bool) for a, b, p in spans])
        experiment = np.searchsorted(self._exp_starts, index, side="right") - 1
        return _BufferData(
            ptr, values, indices, n_cols, experiment.astype(np.int64), label, index, pad, total
        )

    def _make_batch(
        self, data: _BufferData, rows: np.ndarray, epoch: int, step: int, ring: _OutputRing
    ) -> Batch:
        sub = _gather_rows(data, rows, ring)
        x = _to_torch(sub, torch.sparse_csr_tensor)
        x_csc = _to_torch(sub.tocsc(), torch.sparse_csc_tensor) if self.csc else None
        return Batch(
            x=x,
            experiment=torch.from_numpy(np.ascontiguousarray(data.experiment[rows])),
            label=torch.from_numpy(np.ascontiguousarray(data.label[rows])),
            index=torch.from_numpy(np.ascontiguousarray(data.index[rows])),
            is_padding=torch.from_numpy(np.ascontiguousarray(data.is_padding[rows])),
            epoch=epoch,
            step=step,
            x_csc=x_csc,
            total=None if data.total is None else torch.from_numpy(data.total[rows]),
        )

    # -- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        n_workers, worker = (1, 0) if info is None else (max(1, info.num_workers), info.id)
        consumed = self._consumed if self._consumed < self._n_batches else 0
        if consumed and self._num_workers is not None and self._num_workers != n_workers:
            raise ConfigError(
                f"{self.path}: the loader position was counted with {self._num_workers} "
                f"worker(s) but is resumed with {n_workers}; resume with the same num_workers."
            )
        if info is None:
            self._num_workers = 1
        # Worker role w yields batches i = j * W + w. The DataLoader polls its workers from
        # id 0, so on resuming at batch k worker d takes role (d + k) % W: the next batch
        # polled is then batch k, and the order stays that of an uninterrupted epoch.
        role = (worker + consumed) % n_workers
        skip = max(0, -(-(consumed - role) // n_workers))  # batches i < consumed of role
        return self._iterate(self._epoch, n_workers, role, skip)

    def _iterate(self, epoch: int, n_workers: int, worker: int, skip: int) -> Iterator[Batch]:
        buffers = self._worker_buffers(n_workers, worker)
        # Drop the buffers that were consumed whole; skip inside the first remaining one.
        local = 0
        todo: list[tuple[_Buffer, int]] = []
        for buf in buffers:
            size = buf.stop - buf.first
            if local + size <= skip:
                local += size
                continue
            todo.append((buf, max(0, skip - local)))
            local += size
        first_step = skip
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        producer = threading.Thread(
            target=self._produce,
            args=(epoch, todo, n_workers, worker, first_step, out, stop),
            name="mars-scale-loader",
            daemon=True,
        )
        in_process = get_worker_info() is None
        return self._consume(producer, out, stop, in_process)

    def _consume(self, producer, out: queue.Queue, stop: threading.Event, in_process: bool):
        producer.start()
        try:
            while True:
                kind, item = out.get()
                if kind == "batch":
                    if in_process:
                        self._consumed = item.step + 1
                    yield item
                elif kind == "error":
                    raise item
                else:
                    return
        finally:
            stop.set()
            while producer.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get(timeout=0.05)
                except queue.Empty:
                    pass
                producer.join(timeout=0.05)

    def _produce(self, epoch, todo, n_workers, worker, first_step, out, stop) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        pool = ThreadPoolExecutor(self.n_threads, thread_name_prefix="mars-scale-read")
        index_dtype = self._readers()["indices"].dtype
        scratch = (_Scratch(index_dtype), _Scratch(index_dtype))  # buffer k reads into scratch[k % 2]
        # Batches alive at once: the consumer's, the queue's and the one being gathered.
        ring = _OutputRing(self.prefetch + 3)
        try:
            order, cum = self._order(epoch)
            base = self.rank * self.rows_per_rank

            def submit(k: int) -> _Pending:
                buf = todo[k][0]
                p0 = self._batch_rows(buf.first)[0]
                p1 = self._batch_rows(buf.stop - 1)[1]
                spans = self._spans(order, cum, base + p0, base + p1)
                return self._submit(spans, pool, scratch[k % 2])

            pending = submit(0) if todo else None
            j = first_step  # worker-local batch counter
            for k, (buf, skip_in) in enumerate(todo):
                current = pending
                if k + 1 < len(todo):  # read the next buffer while this one is consumed
                    pending = submit(k + 1)
                data = self._collect(current)
                del current
                if stop.is_set():
                    return
                n = data.index.shape[0]
                if self.shuffle:
                    rng = np.random.default_rng([self.seed, epoch, self.rank, buf.first, 1])
                    perm = rng.permutation(n)
                p_first = self._batch_rows(buf.first)[0]
                for b in range(buf.first + skip_in, buf.stop):
                    r0, r1 = (p - p_first for p in self._batch_rows(b))
                    rows = perm[r0:r1] if self.shuffle else np.arange(r0, r1)
                    batch = self._make_batch(data, rows, epoch, j * n_workers + worker, ring)
                    j += 1
                    if not put(("batch", batch)):
                        return
                del data
            put(("done", None))
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(("error", exc))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return (
            f"Loader({str(self.path)!r}, n_rows={self.n_rows}, batch_size={self.batch_size}, "
            f"rank={self.rank}/{self.world_size}, blocks={self.n_blocks}, epoch={self._epoch})"
        )


class _TrackedDataLoader:
    """A torch ``DataLoader`` over a :class:`Loader` that records the position consumed."""

    def __init__(self, loader: Loader, num_workers: int, kwargs: dict) -> None:
        self.loader = loader
        self.num_workers = num_workers
        self.kwargs = kwargs

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        loader = self.loader
        n_workers = max(1, self.num_workers)
        if loader._consumed >= len(loader):
            loader._consumed = 0
        if loader._consumed and loader._num_workers not in (None, n_workers):
            raise ConfigError(
                f"{loader.path}: the loader position was counted with {loader._num_workers} "
                f"worker(s) but is resumed with {n_workers}; resume with the same num_workers."
            )
        loader._num_workers = n_workers
        dl = torch.utils.data.DataLoader(
            loader, batch_size=None, num_workers=self.num_workers, **self.kwargs
        )
        for batch in dl:
            loader._consumed = batch.step + 1
            yield batch


class MemorySample:
    """A sample of a loader's rows, drawn once and held in memory, streamed in a new order each pass.

    The sample is the first ``max_rows`` rows of the loader's epoch 0 (this rank's share): with
    a shuffling loader, a uniform random subset of whole shuffled blocks, normalised and with
    the loader's gene selection, as the loader yields them. It costs about 8 bytes per stored
    non-zero (float32 value, int32 column) and is read from the store once; every later pass
    over it reads nothing. Padding rows of the loader are kept, flagged in ``Batch.is_padding``.

    Parameters
    ----------
    loader
        The loader to draw from (its batch size is the sample's; no CSC copies are made).
    max_rows
        Rows to keep (fewer when the loader's share has fewer).
    seed
        Seeds the order of the passes of :meth:`stream`.

    Raises
    ------
    ConfigError
        If ``max_rows`` is not a positive integer.
    """

    def __init__(self, loader: Loader, max_rows: int, *, seed: int) -> None:
        max_rows = positive_int(max_rows, name="max_rows")
        self.batch_size, self.seed = loader.batch_size, int(seed)
        parts: list[Batch] = []
        n = 0
        loader.set_epoch(0)
        for batch in loader:
            parts.append(batch)
            n += batch.n_rows
            if n >= max_rows:
                break
        x = sp.vstack([sp.csr_matrix((b.x.values().numpy(), b.x.col_indices().numpy(), b.x.crow_indices().numpy()),
                                     shape=tuple(b.x.shape)) for b in parts], format="csr")
        n = min(n, max_rows)
        self.x = x[:n]
        self.x.indices = self.x.indices.astype(np.int32, copy=False)
        self.x.indptr = self.x.indptr.astype(np.int64 if self.x.nnz >= 2**31 else np.int32, copy=False)
        self.experiment, self.label, self.index, self.is_padding = (
            torch.cat([getattr(b, name) for b in parts])[:n].numpy()
            for name in ("experiment", "label", "index", "is_padding"))

    @property
    def n_rows(self) -> int:
        """Rows in the sample, padding included."""
        return int(self.x.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the sample's arrays."""
        arrays = (self.x.data, self.x.indices, self.x.indptr, self.experiment, self.label, self.index, self.is_padding)
        return int(sum(a.nbytes for a in arrays))

    def __len__(self) -> int:
        """Batches in one pass."""
        return -(-self.n_rows // self.batch_size)

    def _batch(self, rows: np.ndarray, epoch: int, step: int) -> Batch:
        from mars_scale.kernels import gather_rows

        ptr = self.x.indptr
        n = int((ptr[rows + 1] - ptr[rows]).sum())
        out_ptr = np.empty(rows.shape[0] + 1, dtype=ptr.dtype)
        values, indices = np.empty(n, dtype=np.float32), np.empty(n, dtype=self.x.indices.dtype)
        gather_rows(ptr, self.x.data, self.x.indices, rows, out_ptr, values, indices)
        x = sp.csr_matrix((values, indices, out_ptr), shape=(rows.shape[0], self.x.shape[1]), copy=False)
        return Batch(
            x=_to_torch(x, torch.sparse_csr_tensor),
            experiment=torch.from_numpy(self.experiment[rows]),
            label=torch.from_numpy(self.label[rows]),
            index=torch.from_numpy(self.index[rows]),
            is_padding=torch.from_numpy(self.is_padding[rows]),
            epoch=epoch,
            step=step,
        )

    def batches(self, batch_size: int | None = None) -> Iterator[Batch]:
        """One pass in sample order, ``batch_size`` rows at a time (default: the loader's)."""
        size = batch_size or self.batch_size
        for step, start in enumerate(range(0, self.n_rows, size)):
            yield self._batch(np.arange(start, min(start + size, self.n_rows)), 0, step)

    def stream(self, epoch: int, *, skip: int = 0) -> Iterator[Batch]:
        """Endless passes of ``len(self)`` batches, each in a new random order, a function of
        ``(seed, epoch, pass)`` only; the first ``skip`` batches are passed over (a resume)."""
        n_pass, first = divmod(skip, len(self))
        while True:
            order = np.random.default_rng([self.seed, epoch, n_pass]).permutation(self.n_rows)
            for step in range(first, len(self)):
                yield self._batch(order[step * self.batch_size:(step + 1) * self.batch_size], epoch, step)
            first, n_pass = 0, n_pass + 1
