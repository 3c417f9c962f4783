"""The on-disk atlas store: an anndata-compatible zarr group, versioned, written atomically.

Layout (see ``docs/store.md``)::

    atlas.zarr/                 root attrs: anndata's own + "mars-scale" {encoding-type, -version}
      X/                        csr_matrix: data float32, indices int32, indptr int64 (raw counts)
      obs/                      experiment (categorical), cell_type (categorical, NaN = unannotated),
                                n_counts, n_genes, and result columns mars_*
      var/                      n_cells, mean, std (of log1p-normalised values, target sum 1e4)
      obsm/ varm/ obsp/ varp/ layers/
      uns/mars_scale/           spec version, experiment names and row ranges, sources, input kind,
                                preprocessing parameters

Cells are stored grouped by experiment: experiment ``e`` owns the rows
``experiment_ranges[e] = (start, stop)``.

This module imports nothing else from mars_scale except the errors.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from mars_scale.errors import ConfigError, StoreError

__all__ = [
    "SPEC_TYPE",
    "SPEC_VERSION",
    "spec_compatible",
    "StoreLayout",
    "Atlas",
    "open_store",
    "as_store",
    "atomic_directory",
    "atomic_file",
    "check_replaceable",
    "store_lock",
    "RangeReader",
    "x_rows_damage",
    "chunk_codecs",
    "has_checksum",
    "seal",
    "metadata_damage",
    "write_attrs",
]

logger = logging.getLogger(__name__)

SPEC_TYPE = "mars-scale-atlas"
SPEC_VERSION = "0.1.2"
#: The first spec version whose chunks and metadata carry checksums (see ``docs/store.md``).
CHECKSUM_SPEC = (0, 1, 1)
#: Attribute holding the crc32c of a node's own metadata (see :func:`seal`).
METADATA_CHECKSUM_ATTR = "mars-scale-crc32c"
_SPEC_ATTR = "mars-scale"
_LOCK_NAME = ".mars-scale.lock"
_ANNDATA_GROUPS = ("obsm", "varm", "obsp", "varp", "layers")
#: Default cells per row block of readers (whole chunks of X, at least this many cells).
ROWS_PER_BLOCK = 1024
#: Gene counts up to this store ``X/indices`` as uint16 (spec 0.1.2), above it as int32.
UINT16_GENES = 2**16


@dataclass(frozen=True)
class StoreLayout:
    """How X is chunked on disk.

    Parameters
    ----------
    rows_per_chunk
        Target number of cells per chunk of ``X/data`` and ``X/indices``. The chunk length in
        non-zeros is ``rows_per_chunk`` times the mean non-zeros per cell, so one chunk holds
        about this many cells; the loader reads blocks of whole chunks (at least
        :data:`ROWS_PER_BLOCK` cells). Small chunks cost little inside shards and keep a block's
        overlap into the next chunk cheap to decode (docs/benchmarks.md, "Loader against
        annbatch").
    zarr_format
        3 (default: chunks grouped into shard files) or 2 (one file per chunk).
    chunks_per_shard
        Chunks per shard file (zarr format 3 only). Fewer, larger files suit cluster filesystems.
    compression_level
        Blosc lz4 level (0 disables compression).
    """

    rows_per_chunk: int = 128
    zarr_format: int = 3
    chunks_per_shard: int = 256
    compression_level: int = 3

    def __post_init__(self) -> None:
        if self.rows_per_chunk < 1:
            raise ConfigError(f"rows_per_chunk must be >= 1, got {self.rows_per_chunk}")
        if self.zarr_format not in (2, 3):
            raise ConfigError(f"zarr_format must be 2 or 3, got {self.zarr_format}")
        if self.chunks_per_shard < 1:
            raise ConfigError(f"chunks_per_shard must be >= 1, got {self.chunks_per_shard}")
        if not 0 <= self.compression_level <= 9:
            raise ConfigError(f"compression_level must be in 0..9, got {self.compression_level}")


# ---------------------------------------------------------------------------------------------
# Atomic writes and locking


def _sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a directory under a temporary sibling name and move it into place on success.

    The caller writes into the yielded path. If the block raises (or the process is
    interrupted), the temporary is removed and ``target`` is untouched. An existing target is
    replaced only with ``overwrite=True``; it is moved aside first and deleted only after the new
    directory is in place, so some complete version exists at every moment.

    Raises
    ------
    StoreError
        If ``target`` exists and ``overwrite`` is false.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise StoreError(f"{target}: already exists (pass --overwrite to replace it)")
    if overwrite:
        check_replaceable(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    leftovers = sorted(p.name for p in target.parent.iterdir() if p.name.startswith(prefixes))
    if leftovers:
        logger.warning(
            "%s: %s left by an interrupted run (delete them once no other run writes %s)",
            target.parent, ", ".join(leftovers), target.name,
        )
    tmp = _sibling(target, "tmp")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if target.exists():
            if not overwrite:
                raise StoreError(f"{target}: appeared while writing (pass --overwrite to replace it)")
            check_replaceable(target)
            old = _sibling(target, "old")
            os.replace(target, old)
        os.replace(tmp, target)
    except OSError as exc:  # another writer put a directory there in between
        raise StoreError(f"{target}: appeared while writing ({exc.strerror}); nothing was replaced") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clone_for_append(path: str | os.PathLike, target: str | os.PathLike, arrays: list[str]) -> None:
    """Copy the store at ``path`` to the new directory ``target``, sharing what an append keeps.

    The full write units (shard files, or chunk files without shards) of the 1-D ``arrays``
    (written by :class:`AppendArray` or :class:`StringAppendArray`) are hard links to the
    store's own files, which an append never writes; everything else (metadata, the last,
    partial unit of each array, the small elements) is copied. Hidden directories (staging,
    temporaries) and the writer lock are left out. Where hard links are not supported the
    units are copied.
    """
    path, target = Path(path), Path(target)
    root = zarr.open_group(path, mode="r")
    linked: set[str] = set()
    for key in arrays:
        array = root[key]
        shards = getattr(array, "shards", None)
        unit = int(shards[0] if shards else array.chunks[0])
        linked.update(f"{key}/{array.metadata.encode_chunk_key((i,))}" for i in range(int(array.shape[0]) // unit))
    for dirpath, dirnames, files in os.walk(path):
        rel = Path(dirpath).relative_to(path)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            if name == _LOCK_NAME:
                continue
            src, dst = Path(dirpath) / name, target / rel / name
            if (rel / name).as_posix() in linked:
                try:
                    os.link(src, dst)
                    continue
                except OSError:  # no hard links here: copy
                    pass
            shutil.copy2(src, dst)


def exchange_directories(a: str | os.PathLike, b: str | os.PathLike) -> None:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Where the call is not available (another OS, an old kernel, some network filesystems),
    ``b`` is renamed to ``a``'s place in two steps, with a warning: between them ``b`` does not
    exist, though one complete version always exists under one of the two names.
    """
    import ctypes

    a, b = os.fsencode(a), os.fsencode(b)
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is not None and renameat2(-100, a, -100, b, 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return
    logger.warning("%s: no atomic directory exchange here; replacing it in two renames", b.decode())
    aside = Path(b.decode()).with_name(f".{Path(b.decode()).name}.swap-{uuid.uuid4().hex[:12]}")
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


def check_replaceable(target: str | os.PathLike) -> None:
    """Refuse to let ``--overwrite`` replace anything but a mars-scale store or an empty directory.

    Raises
    ------
    StoreError
        If ``target`` exists and is a file, or a directory that holds something other than a
        mars-scale store.
    """
    target = Path(target)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    spec = None
    if target.is_dir():
        try:
            spec = zarr.open_group(target, mode="r").attrs.get(_SPEC_ATTR)
        except Exception:
            spec = None
    if not (isinstance(spec, dict) and spec.get("encoding-type") == SPEC_TYPE):
        raise StoreError(
            f"{target}: exists and is not a mars-scale store; --overwrite only replaces a store "
            "(remove it yourself or choose another output)"
        )


@contextlib.contextmanager
def store_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive writer lock on a store (the file ``.mars-scale.lock`` in it).

    The holder keeps an ``flock`` on the file, which the kernel releases when the process
    ends, however it ends. A lock file left by a killed writer is therefore recognised as
    stale and taken over (with a warning). On a filesystem without ``flock`` the file alone is
    the lock (created with ``O_EXCL``), and a stale one must be removed by hand.

    Raises
    ------
    StoreError
        If another live process holds the lock.
    """
    lock = Path(path) / _LOCK_NAME
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            created = True
        except FileExistsError:
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:  # released in between: try again
                continue
            created = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _locked_error(path, lock) from None
        except OSError:  # no flock on this filesystem: the O_EXCL file is the lock
            if not created:
                os.close(fd)
                raise _locked_error(path, lock) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file we locked was removed by its holder in between: try again
    try:
        if not created:
            owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            logger.warning("%s: taking over the lock of writer pid %s, which is gone", path, owner)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def _locked_error(path, lock: Path) -> StoreError:
    try:
        owner = lock.read_text(errors="replace").strip() or "?"
    except OSError:
        owner = "?"
    return StoreError(
        f"{path}: another process (pid {owner}) is writing to this store; wait for it, "
        f"or remove {lock.name} if that process is gone"
    )


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file under a unique temporary sibling name and move it into place on success.

    The caller writes the yielded path (which keeps ``path``'s suffix, for writers that pick
    the format from it). On success the temporary is flushed to disk (``fsync``) and renamed
    over ``path``, so a reader or a crash sees the old file or the new one, never a part. If
    the block raises (or the process is interrupted), the temporary is removed and ``path`` is
    untouched. Every file that mars-scale replaces atomically is written through this.

    Parameters
    ----------
    path
        The file to write; its directory must exist.

    Yields
    ------
    Path
        The temporary file to write.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}{path.suffix}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: dict) -> None:
    """Replace a JSON file atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def replace_file_bytes(path: Path, content: bytes) -> None:
    """Replace a file's content atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(content)


# ---------------------------------------------------------------------------------------------
# Streaming writers


def chunk_codecs(zarr_format: int, *, compression_level: int = 3, strings: bool = False) -> dict:
    """Keyword arguments of ``zarr.Group.create_array`` for checksummed chunks.

    Every chunk ends (format 3) or starts (format 2) with a checksum of its encoded bytes, so
    zarr and :class:`RangeReader` check a chunk before decompressing it: format 3 chunks go
    ``bytes`` -> ``blosc`` -> ``crc32c``; format 2 chunks go through blosc as a filter and
    numcodecs' ``CRC32`` as the compressor (the outermost codec, so that damaged bytes never
    reach blosc, which trusts its header).

    Parameters
    ----------
    zarr_format
        2 or 3.
    compression_level
        Blosc lz4 level; 0 leaves the chunk bytes uncompressed (still checksummed).
    strings
        For a variable-length string array: zstd instead of blosc (zarr's default for
        strings), after the ``vlen-utf8`` encoding.

    Returns
    -------
    dict
        ``compressors`` and, for format 2, ``filters``.
    """
    if zarr_format == 3:
        from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

        if strings:
            inner = [ZstdCodec()]
        elif compression_level:
            inner = [BloscCodec(cname="lz4", clevel=compression_level, shuffle="shuffle")]
        else:
            inner = []
        return {"compressors": [*inner, Crc32cCodec()]}
    from numcodecs import CRC32, Blosc, VLenUTF8, Zstd

    if strings:
        filters = [VLenUTF8(), Zstd()]
    elif compression_level:
        filters = [Blosc(cname="lz4", clevel=compression_level, shuffle=Blosc.SHUFFLE)]
    else:
        filters = None
    return {"filters": filters, "compressors": CRC32()}


def has_checksum(array: zarr.Array) -> bool:
    """Whether every chunk of ``array`` carries a checksum (as :func:`chunk_codecs` writes)."""
    meta = array.metadata
    if meta.zarr_format == 2:
        return getattr(meta.compressor, "codec_id", None) in ("crc32", "crc32c")
    from zarr.codecs import Crc32cCodec, ShardingCodec

    codecs = tuple(meta.codecs)
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        codecs = tuple(codecs[0].codecs)
    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


class AppendArray:
    """A 1-D zarr array written by appends, in whole chunks.

    Appends are buffered so every chunk (or shard) is written exactly once; memory is bounded
    by one write unit.
    """

    def __init__(
        self, group: zarr.Group, name: str, dtype, *, chunk: int, layout: StoreLayout
    ) -> None:
        fmt = group.metadata.zarr_format
        self._unit = chunk * (layout.chunks_per_shard if fmt == 3 else 1)
        kwargs: dict[str, Any] = {"chunks": (chunk,)}
        if fmt == 3:
            kwargs["shards"] = (self._unit,)
        self.array = group.create_array(
            name,
            shape=(0,),
            dtype=dtype,
            fill_value=0,
            **chunk_codecs(fmt, compression_level=layout.compression_level),
            **kwargs,
        )
        self._start(np.dtype(dtype), size=0)

    @classmethod
    def resume(cls, array: zarr.Array) -> "AppendArray":
        """Append to an existing array (written by this class) after its last element.

        The first write completes the array's last, partial write unit (chunk or shard); every
        full unit before it is left as it is.
        """
        self = cls.__new__(cls)
        self.array = array
        shards = getattr(array, "shards", None)
        self._unit = int(shards[0] if shards else array.chunks[0])
        self._start(np.dtype(array.dtype), size=int(array.shape[0]))
        return self

    def _start(self, dtype: np.dtype, *, size: int) -> None:
        self.dtype = dtype
        # One preallocated write unit, filled in place: no list of pieces, no concatenation.
        self._buffer = np.empty(0, dtype=self.dtype)
        self._n_pending = 0
        self.size = size  # elements written to disk

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.dtype).reshape(-1)
        while values.size:
            if self._buffer.size == 0:
                self._buffer = np.empty(self._unit, dtype=self.dtype)
            room = self._unit - self.size % self._unit  # writes end on a unit boundary
            take = min(values.size, room - self._n_pending)
            self._buffer[self._n_pending : self._n_pending + take] = values[:take]
            self._n_pending += take
            values = values[take:]
            if self._n_pending == room:
                self._flush()

    def _flush(self) -> None:
        if self._n_pending == 0:
            return
        n = self._n_pending
        self.array.resize((self.size + n,))
        self.array[self.size : self.size + n] = self._buffer[:n]
        self.size += n
        self._n_pending = 0

    def close(self) -> None:
        self._flush()
        self._buffer = np.empty(0, dtype=self.dtype)


class StringAppendArray:
    """A 1-D variable-length string array written by appends (anndata ``string-array``)."""

    def __init__(self, group: zarr.Group, name: str, *, chunk: int) -> None:
        self._chunk = chunk
        self.array = group.create_array(
            name, shape=(0,), dtype=str, chunks=(chunk,),
            **chunk_codecs(group.metadata.zarr_format, strings=True),
        )
        encode(self.array, "string-array", "0.2.0")
        self._pending: list[str] = []
        self.size = 0

    @classmethod
    def resume(cls, array: zarr.Array) -> "StringAppendArray":
        """Append to an existing string array after its last element."""
        self = cls.__new__(cls)
        self.array, self._chunk = array, int(array.chunks[0])
        self._pending, self.size = [], int(array.shape[0])
        return self

    def append(self, values) -> None:
        self._pending.extend(str(v) for v in values)
        if len(self._pending) >= self._chunk:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        end = self.size + len(self._pending)
        n = len(self._pending) if final else (end // self._chunk) * self._chunk - self.size
        if n > 0:
            self.array.resize((self.size + n,))
            self.array[self.size : self.size + n] = np.array(self._pending[:n], dtype=object)
            self.size += n
            del self._pending[:n]

    def close(self) -> None:
        self._flush(final=True)


class CSRWriter:
    """Stream row blocks of a CSR matrix into an anndata ``csr_matrix`` group.

    Parameters
    ----------
    group
        Parent group; the matrix is written as ``group[name]``.
    n_cols
        Number of columns. Column indices are stored as uint16 up to :data:`UINT16_GENES`
        columns (half the bytes to store and decompress), else as int32.
    nnz_per_chunk
        Chunk length of ``data`` and ``indices`` in non-zeros.
    """

    def __init__(
        self,
        group: zarr.Group,
        name: str,
        *,
        n_cols: int,
        nnz_per_chunk: int,
        rows_per_chunk: int,
        layout: StoreLayout,
    ) -> None:
        self.group = group.create_group(name)
        self.n_cols = n_cols
        self.data = AppendArray(self.group, "data", np.float32, chunk=nnz_per_chunk, layout=layout)
        self.indices = AppendArray(
            self.group, "indices", np.uint16 if n_cols <= UINT16_GENES else np.int32,
            chunk=nnz_per_chunk, layout=layout,
        )
        self.indptr = AppendArray(
            self.group, "indptr", np.int64, chunk=rows_per_chunk * 16, layout=layout
        )
        self.indptr.append(np.zeros(1, dtype=np.int64))
        self.n_rows = 0
        self.nnz = 0

    @classmethod
    def resume(cls, group: zarr.Group) -> "CSRWriter":
        """Append rows to an existing ``csr_matrix`` group (written by this class)."""
        self = cls.__new__(cls)
        self.group = group
        self.n_rows, self.n_cols = (int(v) for v in group.attrs["shape"])
        self.data, self.indices, self.indptr = (AppendArray.resume(group[k]) for k in ("data", "indices", "indptr"))
        self.nnz = int(group["indptr"][self.n_rows])
        return self

    def append(self, block: sp.csr_matrix) -> None:
        """Append the rows of ``block`` (a CSR matrix with ``n_cols`` columns)."""
        if block.shape[1] != self.n_cols:
            raise ValueError(f"block has {block.shape[1]} columns, expected {self.n_cols}")
        self.data.append(block.data)
        self.indices.append(block.indices)
        self.indptr.append(block.indptr[1:].astype(np.int64) + self.nnz)
        self.nnz += int(block.indptr[-1])
        self.n_rows += block.shape[0]

    def close(self) -> None:
        for arr in (self.data, self.indices, self.indptr):
            arr.close()
        encode(self.group, "csr_matrix", "0.1.0", shape=[self.n_rows, self.n_cols])


def init_anndata_root(path: Path, *, zarr_format: int) -> zarr.Group:
    """Create an empty anndata root group at ``path``."""
    root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    encode(root, "anndata", "0.1.0")
    from anndata.io import write_elem

    for key in _ANNDATA_GROUPS:
        write_elem(root, key, {})
    return root


def stamp_spec(root: zarr.Group) -> None:
    """Stamp the mars-scale spec version on the root group, then :func:`seal` the store.

    This is the last write of a new store: every array gets chunk checksums and every node's
    metadata its own checksum.
    """
    root.attrs[_SPEC_ATTR] = spec_record()
    seal(Path(root.store_path.store.root) / root.path)


# ---------------------------------------------------------------------------------------------
# anndata elements: the one place that writes their encoding attributes

_ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}


def encode(node, encoding_type: str, encoding_version: str, **attrs: Any) -> None:
    """Stamp anndata's ``encoding-type``/``-version`` (and ``attrs``) on a zarr or h5py node.

    Every element mars-scale writes by hand (streamed columns, ``X`` of a new store, the
    h5ad export) is stamped through this function, so the format is spelled in one module.
    """
    node.attrs.update({"encoding-type": encoding_type, "encoding-version": encoding_version, **attrs})


def encode_array(array) -> None:
    """Stamp a dense array element (anndata ``array`` 0.2.0) on a zarr or h5py array."""
    encode(array, _ARRAY["encoding-type"], _ARRAY["encoding-version"])


def _column_array(group: zarr.Group, name: str, n_cells: int, dtype, fill, chunk: int) -> zarr.Array:
    return group.create_array(
        name, shape=(n_cells,), dtype=dtype, chunks=(max(1, min(n_cells, chunk)),), fill_value=fill,
        **chunk_codecs(group.metadata.zarr_format),
    )


def column_array(group: zarr.Group, name: str, n_cells: int, dtype, fill, *, chunk: int) -> zarr.Array:
    """A new obs column of ``n_cells`` values filled with ``fill``, checksummed and stamped."""
    array = _column_array(group, name, n_cells, dtype, fill, chunk)
    encode_array(array)
    return array


def encode_categorical(group: zarr.Group, categories: list[str]) -> None:
    """Make ``group`` (holding ``codes``) an anndata categorical with these categories.

    This is the one categorical writer: ingest streams the codes into the group before the
    categories are written, annotate fills them in place (:func:`write_categorical`).
    """
    from anndata.io import write_elem

    encode(group, "categorical", "0.2.0", ordered=False)
    write_elem(group, "categories", np.asarray(categories, dtype=object))
    encode_array(group["codes"])


def write_categorical(group: zarr.Group, name: str, n_cells: int, rows: tuple[int, int],
                      codes: np.ndarray, categories: list[str], *, chunk: int) -> None:
    """A categorical obs column whose codes are ``codes`` in ``rows`` and missing (-1) elsewhere."""
    cat = group.create_group(name)
    dtype = np.int16 if len(categories) < 2**15 else np.int32
    arr = _column_array(cat, "codes", n_cells, dtype, -1, chunk)
    if rows[1] > rows[0]:
        arr[rows[0] : rows[1]] = codes.astype(dtype)
    encode_categorical(cat, categories)


def encode_dataframe(group: zarr.Group, column_order: list[str]) -> None:
    """Stamp ``group`` as an anndata dataframe indexed by its ``_index`` array."""
    encode(group, "dataframe", "0.2.0", _index="_index", **{"column-order": list(column_order)})


def spec_record() -> dict:
    """The spec fields that open ``uns['mars_scale']``."""
    return {"encoding-type": SPEC_TYPE, "encoding-version": SPEC_VERSION}


# ---------------------------------------------------------------------------------------------
# Publishing staged elements into a store (annotate, plot)

_RUNS_ATTR = "mars-scale-runs"  # obs attribute: {key_added: run id} of the published results


def obs_publication(root_dir: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """``obs``'s ``column-order`` and published run ids, read from its metadata file now.

    Read from the file rather than through an opened group, so a reader that polls during a
    commit sees each atomic replace of the file.
    """
    found = _node_metadata(Path(root_dir) / "obs")
    if found is None:
        raise StoreError(f"{root_dir}: obs is missing (re-run \"mars-scale ingest\")")
    attrs = found[2]
    runs = attrs.get(_RUNS_ATTR, {})
    return [str(c) for c in attrs.get("column-order", [])], dict(runs) if isinstance(runs, dict) else {}


def write_obs_publication(root_dir: str | os.PathLike, order: list[str], runs: dict[str, str] | None = None) -> None:
    """Replace ``obs``'s ``column-order`` (and the published run ids) in one atomic file replace."""
    write_attrs(Path(root_dir) / "obs", {"column-order": list(order), **({_RUNS_ATTR: runs} if runs is not None else {})})


def _move(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def commit_elements(root_dir: str | os.PathLike, staging: Path, elements: list[tuple[str, str]], *,
                    obs_columns: list[str] = (), run: tuple[str, str] | None = None) -> None:
    """Move staged elements into place and publish the obs columns; undo everything on error.

    Each element ``(group, name)`` is moved from ``staging/group/name`` to the store; one that
    is already there is moved aside (into ``staging/replaced``) first and put back if anything
    fails. ``obs_columns`` are then published by one replace of ``obs``'s metadata.

    ``run`` is ``(key, run id)``: the obs attribute ``mars-scale-runs`` names the published run
    of each key. It is removed for this key in the same write that hides the earlier columns,
    before any element moves, and set in the write that publishes the new ones, so a reader
    that finds the same run id before and after its reads, and on every element, read one
    whole run. The caller holds the :func:`store_lock`.

    Raises
    ------
    StoreError
        If a group of the store is missing; anything raised while moving, after the store was
        restored.
    """
    root_dir = Path(root_dir)
    found = _node_metadata(root_dir / "obs")
    if found is None:
        raise StoreError(f"{root_dir}: obs is missing (re-run \"mars-scale ingest\")")
    attrs_path = found[3]
    original = attrs_path.read_bytes()
    order, runs = obs_publication(root_dir)
    if run is not None:
        runs.pop(run[0], None)
    kept = [c for c in order if c not in obs_columns]
    done: list[tuple[Path, Path | None]] = []
    try:
        if kept != order:  # hide the earlier result columns before their elements move
            write_obs_publication(root_dir, kept, runs)
        for group, name in elements:
            src, dst = staging / group / name, root_dir / group / name
            if not (root_dir / group).is_dir():
                raise StoreError(f"{root_dir}: {group} is missing (re-run \"mars-scale ingest\")")
            backup = None
            if dst.exists():
                backup = staging / "replaced" / group / name
                backup.parent.mkdir(parents=True, exist_ok=True)
                _move(dst, backup)
            done.append((dst, backup))
            _move(src, dst)
        if obs_columns or run is not None:
            published = {**runs, run[0]: run[1]} if run is not None else None
            write_obs_publication(root_dir, kept + list(obs_columns), published)
    except BaseException:
        logger.error("writing into %s failed; restoring the store as it was", root_dir)
        for dst, backup in reversed(done):
            if dst.exists():
                shutil.rmtree(dst, ignore_errors=True)
            if backup is not None and backup.exists():
                os.replace(backup, dst)
        replace_file_bytes(attrs_path, original)
        raise


# ---------------------------------------------------------------------------------------------
# Sealing: chunk checksums on every array, a checksum of every node's own metadata


def _canonical_crc(document: dict) -> str:
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{_crc32c(text.encode()):08x}"


def _node_metadata(directory: Path) -> tuple[int, dict, dict, Path] | None:
    """``(zarr_format, document, attributes, attributes file)`` of a zarr node, or ``None``.

    The document is what the node's checksum covers: for format 3 the whole ``zarr.json``, for
    format 2 ``.zarray``/``.zgroup`` together with ``.zattrs``. ``attributes`` is the dict
    inside it that holds the checksum. Raises ``ValueError`` if a metadata file is not JSON.
    """
    if (directory / "zarr.json").is_file():
        path = directory / "zarr.json"
        document = json.loads(path.read_bytes())
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        attrs = document.setdefault("attributes", {})
        if not isinstance(attrs, dict):
            raise ValueError("attributes are not a JSON object")
        return 3, document, attrs, path
    for name in (".zarray", ".zgroup"):
        if (directory / name).is_file():
            meta = json.loads((directory / name).read_bytes())
            path = directory / ".zattrs"
            attrs = json.loads(path.read_bytes()) if path.exists() else {}
            if not isinstance(meta, dict) or not isinstance(attrs, dict):
                raise ValueError("not a JSON object")
            return 2, {name: meta, ".zattrs": attrs}, attrs, path
    return None


def _node_dirs(path: Path) -> Iterator[Path]:
    """Every directory under ``path`` (itself included), skipping hidden ones (staging, temporaries)."""
    for dirpath, dirnames, _ in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(dirpath)


def _write_node(fmt: int, document: dict, attrs: dict, path: Path) -> None:
    attrs.pop(METADATA_CHECKSUM_ATTR, None)
    attrs[METADATA_CHECKSUM_ATTR] = _canonical_crc(document)
    write_json_atomic(path, document if fmt == 3 else attrs)


def write_attrs(directory: str | os.PathLike, updates: dict) -> None:
    """Update attributes of the zarr node at ``directory`` in one atomic file replace.

    The node's metadata checksum is recomputed in the same write (see :func:`seal`).
    """
    found = _node_metadata(Path(directory))
    if found is None:
        raise StoreError(f"{directory}: not a zarr node")
    fmt, document, attrs, path = found
    attrs.update(updates)
    _write_node(fmt, document, attrs, path)


def _rewrite_checksummed(group: zarr.Group, name: str, array: zarr.Array) -> None:
    """Write ``array`` again with checksummed chunks (small arrays written by anndata)."""
    if array.nbytes > 1 << 28:
        raise StoreError(f"{array.path}: written without chunk checksums and too large to rewrite")
    values = np.asarray(array[...])
    attrs = dict(array.attrs)
    fmt = group.metadata.zarr_format
    strings = np.dtype(array.dtype).kind in "OTU"
    kwargs: dict[str, Any] = {"chunks": array.chunks} if array.ndim else {}
    if strings:
        dtype, fill = str, ("" if fmt == 2 else None)
    else:
        dtype, fill = array.dtype, array.fill_value
    del group[name]
    new = group.create_array(
        name, shape=array.shape, dtype=dtype, fill_value=fill,
        **kwargs, **chunk_codecs(fmt, strings=strings),
    )
    if values.size:
        new[...] = values
    if attrs:
        new.attrs.update(attrs)


def _checksum_arrays(group: zarr.Group) -> None:
    for name, member in list(group.members()):
        if isinstance(member, zarr.Group):
            _checksum_arrays(member)
        elif not has_checksum(member):
            _rewrite_checksummed(group, name, member)


def seal(path: str | os.PathLike) -> None:
    """Give every array under ``path`` chunk checksums and every node a metadata checksum.

    Arrays written with :func:`chunk_codecs` are left as they are; the others (small elements
    written by anndata: categories, ``var`` columns, ``uns``) are written again with it. Then
    each node's metadata (format 3: ``zarr.json``; format 2: ``.zarray``/``.zgroup`` with
    ``.zattrs``) gets the attribute ``mars-scale-crc32c``: the crc32c of the metadata without
    that attribute, as sorted, compact JSON. :func:`metadata_damage` checks it. ``path`` is a
    store, or one element of it (a group or an array); hidden directories are skipped.
    """
    path = Path(path)
    node = zarr.open(path, mode="r+")
    if isinstance(node, zarr.Group):
        _checksum_arrays(node)
    elif not has_checksum(node):
        raise StoreError(f"{path}: written without chunk checksums")
    for directory in _node_dirs(path):
        found = _node_metadata(directory)
        if found is not None:
            _write_node(*found)


def metadata_damage(path: str | os.PathLike, *, required: bool = True) -> str | None:
    """The first node under ``path`` whose metadata is damaged, described, or ``None``.

    A node is damaged when a metadata file is not a JSON object or its ``mars-scale-crc32c``
    attribute differs from the checksum of the rest (see :func:`seal`). With ``required``
    (stores of spec 0.1.1 and later) a node without the attribute is damaged too.
    """
    path = Path(path)
    for directory in _node_dirs(path):
        where = directory.relative_to(path).as_posix()
        where = "the root" if where == "." else where
        try:
            found = _node_metadata(directory)
        except (ValueError, UnicodeDecodeError) as exc:
            return f"{where}: metadata is not valid JSON ({exc})"
        if found is None:
            continue
        _, document, attrs, _ = found
        stored = attrs.pop(METADATA_CHECKSUM_ATTR, None)
        if stored is None:
            if required:
                return f"{where}: metadata has no checksum"
            continue
        if stored != _canonical_crc(document):
            return f"{where}: metadata checksum differs"
    return None


# ---------------------------------------------------------------------------------------------
# Reading


def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in str(version).split("."))
    except ValueError:
        return (-1,)


def _compat_key(version: str) -> tuple[int, ...]:
    """The part of a spec version that must match: major, and minor while major is 0."""
    try:
        major, minor = (int(p) for p in str(version).split(".")[:2])
    except ValueError:
        return (-1,)
    return (major,) if major >= 1 else (0, minor)


def spec_compatible(version: str, other: str) -> bool:
    """Whether two store spec versions read alike: the same major, and minor while major is 0.

    Parameters
    ----------
    version, other
        Spec versions such as ``"0.1.1"``.

    Returns
    -------
    bool
        True when a reader of one reads the other (``"0.1.0"`` and ``"0.1.1"``), False
        otherwise or when either is not a version.
    """
    key = _compat_key(version)
    return key != (-1,) and key == _compat_key(other)


class Atlas:
    """An opened atlas store (read-only view). Use :func:`open_store`.

    Attributes
    ----------
    path
        The store directory.
    n_cells, n_genes
        Shape of X.
    gene_ids
        ``var_names`` in store order.
    experiments
        Experiment names in store order.
    experiment_ranges
        ``{name: (start, stop)}`` row ranges.
    input_kind
        ``"counts"`` or ``"lognorm"``.
    """

    def __init__(self, path: Path, root: zarr.Group, meta: dict) -> None:
        self.path = path
        self.root = root
        self.meta = meta
        x = root["X"]
        self.n_cells, self.n_genes = (int(v) for v in x.attrs["shape"])
        self.experiments: list[str] = [str(n) for n in meta["experiment_names"]]
        ranges = np.asarray(meta["experiment_ranges"], dtype=np.int64).reshape(-1, 2)
        self.experiment_ranges: dict[str, tuple[int, int]] = {
            n: (int(a), int(b)) for n, (a, b) in zip(self.experiments, ranges)
        }
        self.input_kind: str = str(meta["input_kind"])
        self.spec_version: str = str(meta["encoding-version"])
        self.rows_per_chunk: int = int(meta.get("rows_per_chunk", 1024))
        self._readers: dict[str, RangeReader] = {}  # opened on first use (reading metadata)

    @property
    def checksummed(self) -> bool:
        """Whether the store's spec has chunk and metadata checksums (0.1.1 and later).

        Older stores are read without checks: a damaged chunk can go unnoticed unless it
        breaks the structure of ``X`` (see ``docs/store.md``).
        """
        return _version_tuple(self.spec_version) >= CHECKSUM_SPEC

    # -- small elements --------------------------------------------------------------------
    def _read(self, key: str):
        from anndata.io import read_elem

        try:
            return read_elem(self.root[key])
        except KeyError:
            raise StoreError(
                f"{self.path}: {key} is missing (re-run \"mars-scale ingest\")"
            ) from None
        except Exception as exc:  # corrupt chunk or metadata
            raise StoreError(f"{self.path}: cannot read {key} ({type(exc).__name__}: {exc})") from exc

    @functools.cached_property
    def gene_ids(self) -> pd.Index:
        """The genes (var names), read once: a store's genes never change after ingest."""
        return pd.Index(self._read("var/_index"), name=None).astype(str)

    def var_column(self, name: str) -> np.ndarray:
        return np.asarray(self._read(f"var/{name}"))

    def obs_column(self, name: str):
        """Read one obs column (a categorical as a pandas Categorical)."""
        return self._read(f"obs/{name}")

    @property
    def obs_columns(self) -> list[str]:
        return list(self.root["obs"].attrs.get("column-order", []))

    def categorical_codes(self, name: str, start: int = 0, stop: int | None = None):
        """Codes (int, -1 = missing) and categories of a categorical obs column, for a row range."""
        try:
            grp = self.root[f"obs/{name}"]
            codes = np.asarray(grp["codes"][start:stop])
        except KeyError:
            raise StoreError(f"{self.path}: obs/{name} is missing") from None
        except Exception as exc:  # corrupt chunk or metadata
            raise _damaged(self.path, f"obs/{name}/codes", exc) from exc
        categories = [str(c) for c in self._read(f"obs/{name}/categories")]
        return codes, categories

    @property
    def cell_types(self) -> list[str]:
        return self.categorical_codes("cell_type", 0, 0)[1]

    def experiment_codes(self) -> np.ndarray:
        """Experiment index of every cell, in store order (int32)."""
        codes = np.empty(self.n_cells, dtype=np.int32)
        for i, (a, b) in enumerate(self.experiment_ranges.values()):
            codes[a:b] = i
        return codes

    # -- X --------------------------------------------------------------------------------
    @property
    def x_group(self) -> zarr.Group:
        return self.root["X"]

    def read_rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Raw values of rows ``start:stop`` as a CSR matrix (float32).

        Raises
        ------
        ValueError
            If the rows are outside ``0:n_cells``.
        StoreError
            If a chunk is missing or corrupt; the message names the store and the rows.
        """
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"rows {start}:{stop} are outside 0:{self.n_cells}")
        key = "X/indptr"
        try:
            nnz = self.reader("X/data").size
            indptr = self.reader("X/indptr").read(start, stop + 1).astype(np.int64, copy=False)
            problem = x_rows_damage(indptr, nnz=nnz)
            if not problem:
                lo, hi = int(indptr[0]), int(indptr[-1])
                key = "X/data"
                data = self.reader("X/data").read(lo, hi)
                key = "X/indices"
                indices = self.reader("X/indices").read(lo, hi)
                problem = x_rows_damage(indptr, data, indices, n_genes=self.n_genes, nnz=nnz)
        except Exception as exc:
            raise _damaged(self.path, f"{key} (rows {start}:{stop})", exc) from exc
        if problem:
            raise StoreError(
                f"{self.path}: X rows {start}:{stop} {problem}; the store is damaged, "
                "re-run \"mars-scale ingest\""
            )
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_genes))

    def reader(self, key: str) -> "RangeReader":
        """The :class:`RangeReader` of the 1-D array ``key`` (e.g. ``"X/data"``), opened once.

        Readers keep what they learn about chunks (shard indexes, chunk heads), so every loader
        and read of this opened store shares them.

        Raises
        ------
        KeyError
            If the store has no array ``key``.
        """
        found = self._readers.get(key)
        if found is None:
            found = self._readers[key] = RangeReader(self.root[key])
        return found

    @property
    def nnz(self) -> int:
        try:
            return int(self.root["X"]["indptr"][self.n_cells])
        except Exception as exc:
            raise _damaged(self.path, "X/indptr", exc) from exc

    @property
    def rows_per_block(self) -> int:
        """Default rows per read block: whole chunks of X, at least :data:`ROWS_PER_BLOCK`."""
        return self.rows_per_chunk * max(1, -(-ROWS_PER_BLOCK // self.rows_per_chunk))

    def row_blocks(self, *, rows_per_block: int | None = None) -> list[tuple[int, int]]:
        """Row ranges of ``rows_per_block`` rows (default: :attr:`rows_per_block`) covering the store."""
        step = rows_per_block or self.rows_per_block
        return [(a, min(a + step, self.n_cells)) for a in range(0, self.n_cells, step)]

    def summary(self) -> dict:
        """Sizes, experiments (cells, annotated fraction, cell types) and storage facts."""
        types = self.cell_types
        experiments = []
        for name, (a, b) in self.experiment_ranges.items():
            counts = np.zeros(len(types) + 1, dtype=np.int64)
            for lo in range(a, b, 1 << 20):
                c, _ = self.categorical_codes("cell_type", lo, min(b, lo + (1 << 20)))
                counts += np.bincount(c + 1, minlength=len(types) + 1)
            n = b - a
            experiments.append(
                {
                    "name": name,
                    "n_cells": n,
                    "annotated_fraction": float(1 - counts[0] / n) if n else 0.0,
                    "cell_types": {t: int(k) for t, k in zip(types, counts[1:]) if k},
                }
            )
        appended = np.asarray(self.meta.get("experiment_appended", np.zeros(len(experiments))), dtype=np.int64)
        absent = np.asarray(self.meta.get("experiment_absent_genes", np.zeros(len(experiments))), dtype=np.int64)
        runs = self.annotation_runs()
        for e, k, m in zip(experiments, appended, absent):
            e["appended"] = int(k)  # 0: the first ingest; k: the k-th append
            e["absent_genes"] = int(m)
            e["annotation_runs"] = [r["key"] for r in runs if e["name"] in r["experiments"]]
        nnz = self.nnz
        return {
            "path": str(self.path),
            "spec_version": self.spec_version,
            "n_cells": self.n_cells,
            "n_genes": self.n_genes,
            "nnz": nnz,
            "density": nnz / max(self.n_cells * self.n_genes, 1),
            "input_kind": self.input_kind,
            "size_bytes": size_on_disk(self.path),
            "experiments": experiments,
            "annotation_runs": runs,
            "cell_types": types,
            "zarr_format": int(self.root.metadata.zarr_format),
            "checksums": self.checksummed,
        }

    def annotation_runs(self) -> list[dict]:
        """The published annotation runs: ``key``, ``run_id``, ``experiments`` annotated, ``date``, ``model``."""
        from anndata.io import read_elem

        _, published = obs_publication(self.path)
        runs = []
        for key, run_id in published.items():
            record = {"key": key, "run_id": run_id, "experiments": [], "date": "", "model": ""}
            try:
                node = zarr.open_group(self.path / "uns" / key, mode="r")
                for field in ("unannotated", "date", "model"):
                    if field in node:
                        value = read_elem(node[field])
                        value = [str(v) for v in np.atleast_1d(value)] if field == "unannotated" else str(value)
                        record["experiments" if field == "unannotated" else field] = value
            except Exception as exc:  # a record that cannot be read is still listed
                logger.warning("%s: uns/%s cannot be read (%s)", self.path, key, exc)
            runs.append(record)
        return runs

    def __repr__(self) -> str:
        return (
            f"Atlas({str(self.path)!r}, n_cells={self.n_cells}, n_genes={self.n_genes}, "
            f"experiments={len(self.experiments)}, spec={self.spec_version})"
        )


def x_rows_damage(
    indptr: np.ndarray,
    data: np.ndarray | None = None,
    indices: np.ndarray | None = None,
    *,
    n_genes: int | None = None,
    nnz: int | None = None,
) -> str | None:
    """What is wrong with rows read back from ``X``, or ``None``.

    Ingest writes a non-decreasing ``indptr`` within ``0:nnz``, finite positive values only,
    and in each row gene indices within ``0:n_genes``, strictly increasing (sorted, each gene
    at most once). A chunk that is missing reads back as zeros (zarr's fill value), and a
    damaged chunk of an unchecksummed store can read back as anything; both break one of these
    rules, and rows that break one never reach scipy or torch (whose sparse code trusts them).

    Parameters
    ----------
    indptr
        ``X/indptr[start : stop + 1]`` of the rows.
    data, indices
        The rows' slice of ``X/data`` and ``X/indices`` (``indptr[0]:indptr[-1]``); may be
        left out to check ``indptr`` alone.
    n_genes
        Number of columns; the column range is checked when given.
    nnz
        Length of ``X/data``; the range of ``indptr`` is checked when given.

    Returns
    -------
    str or None
        The first problem found, worded to follow "X rows a:b", or ``None``.
    """
    if indptr.size and (indptr[0] < 0 or (nnz is not None and indptr[-1] > nnz)):
        return f"have X/indptr outside 0:{nnz if nnz is not None else 'nnz'}"
    if (np.diff(indptr) < 0).any():
        return "have a decreasing X/indptr"
    if data is not None and data.size:
        low, high = data.min(), data.max()
        if not (low > 0 and high < np.inf):  # NaN fails both
            if low == 0:
                return "read back zeros (a chunk of X/data is missing)"
            return "hold values that are not finite and positive in X/data"
    if indices is not None and indices.size:
        # One pass: strictly rising within each row. Then each row's first and last index are
        # its smallest and largest, so the range check needs only those.
        rising = indices[1:] > indices[:-1]
        bounds = (indptr - indptr[0]).astype(np.int64, copy=False)
        starts = bounds[1:-1]
        rising[starts[(starts > 0) & (starts < indices.size)] - 1] = True  # a row may start lower
        outside = f"hold gene indices outside 0:{n_genes if n_genes is not None else 'n_genes'} in X/indices"
        if not rising.all():  # say what is wrong (these passes run only on damage)
            if indices.size - np.count_nonzero(indices) > indptr.shape[0] - 1:
                return "read back zeros (a chunk of X/indices is missing)"
            if indices.min() < 0 or (n_genes is not None and indices.max() >= n_genes):
                return outside
            return "hold gene indices that are not sorted and unique within a row in X/indices"
        full = bounds[1:] > bounds[:-1]  # rows with at least one value
        first, last = indices[bounds[:-1][full]], indices[bounds[1:][full] - 1]
        if first.min() < 0 or (n_genes is not None and last.max() >= n_genes):
            return outside
    return None


# ---------------------------------------------------------------------------------------------
# Contiguous reads straight from the chunk files

_EMPTY_CHUNK = 2**64 - 1  # a shard index entry for a chunk that was never written


@dataclass(frozen=True)
class _ChunkFiles:
    """Where the chunks of a 1-D array lie and how they are encoded."""

    directory: Path  # the array's directory
    key: Callable[[tuple[int, ...]], str]  # file of a chunk (of a shard when sharded)
    dtype: np.dtype
    chunk: int  # elements per chunk
    per_shard: int  # chunks per shard file; 0 when every chunk is its own file
    index_at_end: bool  # where a shard keeps its index
    blosc: bool  # blosc-compressed, else raw little-endian bytes
    checksum: str | None = None  # "crc32c" (4 bytes after the chunk) or "crc32" (before it)


def _chunk_files(array: zarr.Array) -> _ChunkFiles | None:
    """The chunk files of ``array`` if they are a layout that ingest writes, else ``None``.

    That is a 1-D array in a local directory whose chunks are little-endian bytes, optionally
    blosc-compressed, optionally checksummed as :func:`chunk_codecs` writes them: zarr format 2
    with a blosc compressor and no filters, or a blosc filter (or none) and a ``crc32``
    compressor; or format 3 with a ``bytes`` codec, optionally ``blosc``, optionally
    ``crc32c``, optionally inside shards indexed with ``bytes`` + ``crc32c``.
    """
    from numcodecs import Blosc
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
    from zarr.codecs.bytes import Endian
    from zarr.codecs.sharding import ShardingCodecIndexLocation
    from zarr.storage import LocalStore

    store = array.store_path.store
    meta = array.metadata
    if not isinstance(store, LocalStore) or array.ndim != 1 or sys.byteorder != "little":
        return None

    def plain(codecs) -> bool | None:  # True: blosc, False: raw, None: anything else
        codecs = tuple(codecs)
        if not codecs or not isinstance(codecs[0], BytesCodec) or codecs[0].endian == Endian.big:
            return None
        if len(codecs) == 1:
            return False
        return True if len(codecs) == 2 and isinstance(codecs[1], BloscCodec) else None

    per_shard, at_end, checksum = 0, True, None
    if meta.zarr_format == 2:
        if getattr(meta.dtype, "endianness", None) == "big":
            return None
        compressor_id = getattr(meta.compressor, "codec_id", None)
        filters = tuple(meta.filters or ())
        if compressor_id == "crc32" and getattr(meta.compressor, "location", "start") == "start":
            checksum = "crc32"
            if not filters:
                blosc = False
            elif len(filters) == 1 and isinstance(filters[0], Blosc):
                blosc = True
            else:
                return None
        elif filters:
            return None
        elif meta.compressor is None:
            blosc = False
        elif compressor_id == "blosc":
            blosc = True
        else:
            return None
        chunk = int(meta.chunks[0])
    else:
        codecs = meta.codecs
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            shard = codecs[0]
            index = tuple(shard.index_codecs)
            if not (
                len(index) == 2
                and isinstance(index[0], BytesCodec)
                and index[0].endian != Endian.big
                and isinstance(index[1], Crc32cCodec)
            ):
                return None
            chunk = int(shard.chunk_shape[0])
            per_shard = int(array.shards[0]) // chunk
            at_end = shard.index_location == ShardingCodecIndexLocation.end
            codecs = shard.codecs
        else:
            chunk = int(array.chunks[0])
        codecs = tuple(codecs)
        if codecs and isinstance(codecs[-1], Crc32cCodec):
            codecs, checksum = codecs[:-1], "crc32c"
        blosc = plain(codecs)
        if blosc is None:
            return None
    return _ChunkFiles(
        directory=Path(store.root) / array.path,
        key=meta.encode_chunk_key,
        dtype=np.dtype(array.dtype),
        chunk=chunk,
        per_shard=per_shard,
        index_at_end=at_end,
        blosc=blosc,
        checksum=checksum,
    )


class RangeReader:
    """Contiguous ranges of a 1-D zarr array, decoded straight from its chunk files.

    zarr 3 spends more CPU per chunk on its asynchronous machinery than on decompression: the
    same contiguous reads ran 3.3x to 3.9x faster through this reader (docs/store.md, "Reading
    X"). For the layouts that ingest writes (zarr format 2 or 3, sharded or not, blosc or
    uncompressed, in a local directory) it takes the chunk bytes with ``os.pread``, checks the
    shard index checksum and the blosc header, and decompresses with numcodecs' blosc (which
    releases the GIL) straight into the result wherever a chunk is covered whole. Any other
    layout is read through zarr. As with zarr, a chunk that was never written reads as the
    fill value.

    Row blocks of a CSR store rarely end on a chunk boundary: the row that straddles one is
    read by the block before it, which then needs only the first few hundred elements of the
    next chunk. When a read decodes a chunk whole to take its tail, it keeps the head it skipped
    (if shorter than an eighth of a chunk, up to :attr:`head_cache_bytes` in all), so the
    other block takes the head from memory instead of decoding the chunk a second time. Shard
    indexes are read and checked once.

    Parameters
    ----------
    array
        A one-dimensional zarr array.
    """

    #: Bytes of chunk heads kept per reader (see :meth:`read`); about 16,000 boundaries.
    head_cache_bytes = 64 * 2**20

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.size = int(array.shape[0])
        self.dtype = np.dtype(array.dtype)
        self._fill = array.fill_value
        self._files = _chunk_files(array)
        self._shard_index: dict[int, np.ndarray] = {}  # checked shard indexes, 16 B per chunk
        self._shard_paths: dict[int, str] = {}
        self._heads: dict[int, np.ndarray] = {}  # chunk -> its first elements
        self._head_bytes = 0
        self._scratch = threading.local()  # a whole chunk, decoded for a partial read

    @property
    def direct(self) -> bool:
        """Whether chunks are decoded here rather than by zarr."""
        return self._files is not None

    def read(self, start: int, stop: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``start:stop``.

        Parameters
        ----------
        start, stop
            The range, ``0 <= start <= stop <= size``.
        out
            Array of ``stop - start`` elements to fill (e.g. a slice of a larger buffer); of
            the array's dtype, or a wider one (uint16 indices widen into an int32 buffer chunk
            by chunk, while each decoded chunk is still in cache).

        Returns
        -------
        numpy.ndarray
            ``out``, or a new array of the array's dtype.

        Raises
        ------
        ValueError
            If the range is out of bounds, or a chunk or shard index is corrupt or truncated.
        OSError, RuntimeError
            If a file cannot be read or blosc cannot decompress a chunk.
        """
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"range {start}:{stop} is outside 0:{self.size}")
        if out is None:
            out = np.empty(stop - start, dtype=self.dtype)
        elif out.shape != (stop - start,):
            raise ValueError(f"out has shape {out.shape}, expected ({stop - start},)")
        if self._files is None:
            out[:] = self.array[start:stop]
            return out
        chunk = self._files.chunk
        for i in range(start // chunk, -(-stop // chunk)):
            lo, hi = max(start, i * chunk), min(stop, (i + 1) * chunk)
            dest = out[lo - start : hi - start]
            head = self._heads.get(i)
            if lo == i * chunk and head is not None and head.shape[0] >= hi - lo:
                dest[:] = head[: hi - lo]
                continue
            blob = self._chunk_bytes(i)
            if blob is None:
                dest[:] = self._fill
            elif hi - lo == chunk and out.dtype == self.dtype:  # covered whole: in place
                self._decode(blob, dest)
            else:
                whole = self._decode(blob, self._whole_chunk())
                dest[:] = whole[lo - i * chunk : hi - i * chunk]
                self._keep_head(i, whole[: lo - i * chunk])
        return out

    def _whole_chunk(self) -> np.ndarray:
        """This thread's reused buffer of one chunk (a fresh one would be page-faulted in)."""
        buffer = getattr(self._scratch, "chunk", None)
        if buffer is None:
            buffer = self._scratch.chunk = np.empty(self._files.chunk, dtype=self.dtype)
        return buffer

    def _keep_head(self, i: int, head: np.ndarray) -> None:
        """Remember the first elements of chunk ``i`` that a partial read skipped."""
        small = 0 < head.shape[0] <= self._files.chunk // 8
        if small and i not in self._heads and self._head_bytes + head.nbytes <= self.head_cache_bytes:
            self._head_bytes += head.nbytes
            self._heads[i] = head.copy()

    def _chunk_bytes(self, i: int) -> bytes | None:
        """The encoded bytes of chunk ``i``, or ``None`` if it was never written."""
        files = self._files
        if not files.per_shard:
            try:
                return (files.directory / files.key((i,))).read_bytes()
            except FileNotFoundError:
                return None
        shard, j = divmod(i, files.per_shard)
        path = self._shard_paths.get(shard)
        if path is None:  # joined once: pathlib costs as much as the open itself
            path = self._shard_paths[shard] = str(files.directory / files.key((shard,)))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            index = self._shard_index.get(shard)
            if index is None:
                n_index = 16 * files.per_shard + 4  # (offset, length) uint64 pairs and a crc32c
                at = os.fstat(fd).st_size - n_index if files.index_at_end else 0
                raw = os.pread(fd, n_index, max(at, 0))
                if len(raw) != n_index or _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                    raise ValueError(
                        f"shard {shard}: the index is truncated or its checksum differs"
                    )
                index = self._shard_index[shard] = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
            offset, length = (int(v) for v in index[j])
            if offset == length == _EMPTY_CHUNK:
                return None
            blob = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(blob) != length:
            raise ValueError(f"shard {shard}: chunk {j} is truncated")
        return blob

    def _decode(self, blob: bytes, dest: np.ndarray) -> np.ndarray:
        """Decode one whole chunk into ``dest`` (``chunk`` elements)."""
        from numcodecs import blosc

        blob = _strip_checksum(blob, self._files.checksum)
        if self._files.blosc:
            # A blosc header records the decompressed size (bytes 4..8) and the frame's own
            # length (12..16); blosc trusts both, so check them before it reads or writes.
            size = int.from_bytes(blob[4:8], "little")
            if len(blob) < 16 or int.from_bytes(blob[12:16], "little") != len(blob):
                raise ValueError("a chunk is truncated")
        else:
            size = len(blob)
        if size != dest.nbytes:
            raise ValueError(f"a chunk decodes to {size} bytes, expected {dest.nbytes}")
        if self._files.blosc:
            blosc.decompress(blob, dest)
        else:
            dest[:] = np.frombuffer(blob, dtype=self.dtype)
        return dest


def _strip_checksum(blob: bytes, kind: str | None):
    """The chunk bytes inside their checksum (a memoryview), checked; ``blob`` if none."""
    if kind is None:
        return blob
    if len(blob) < 4:
        raise ValueError("a chunk is shorter than its checksum")
    view = memoryview(blob)
    if kind == "crc32c":
        # The crc32c of a message followed by its own crc32c (little-endian) is a constant,
        # so the whole blob is checked in place, without copying the payload out.
        payload, good = view[:-4], _crc32c(bytes(blob)) == _CRC32C_RESIDUE
    else:
        import zlib

        payload = view[4:]
        good = zlib.crc32(payload) == int.from_bytes(blob[:4], "little")
    if not good:
        raise ValueError(f"a chunk's {kind} checksum differs (the chunk is damaged)")
    return payload


_CRC32C_RESIDUE = 0x48674BC7


def _crc32c(data: bytes) -> int:
    import google_crc32c  # a dependency of zarr 3

    return google_crc32c.value(data)


def _damaged(path, key: str, exc: BaseException) -> StoreError:
    return StoreError(
        f"{path}: {key} cannot be read ({type(exc).__name__}: {exc}); "
        "the store is damaged, re-run \"mars-scale ingest\""
    )


def _read_meta(path: Path, root: zarr.Group) -> dict:
    from anndata.io import read_elem

    try:
        meta = read_elem(root["uns/mars_scale"])
    except KeyError:
        raise StoreError(f"{path}: uns/mars_scale is missing; not a mars-scale store") from None
    except Exception as exc:
        raise StoreError(f"{path}: uns/mars_scale cannot be read ({exc})") from exc
    return meta


def as_store(store: Atlas | str | os.PathLike) -> Atlas:
    """An opened store as it is, or a path opened with :func:`open_store`.

    Parameters
    ----------
    store
        An :class:`Atlas` or the path of a store.

    Returns
    -------
    Atlas
        ``store`` itself, or the store at that path.

    Raises
    ------
    StoreError
        As :func:`open_store`, for a path.
    """
    return store if isinstance(store, Atlas) else open_store(store)


def open_store(path: str | os.PathLike) -> Atlas:
    """Open an atlas store for reading and check its spec version.

    Raises
    ------
    StoreError
        If the path does not exist, is not a mars-scale store, or has a spec version this
        release cannot read (a newer major version asks to upgrade mars-scale).
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    try:
        root = zarr.open_group(path, mode="r")
    except Exception as exc:
        raise StoreError(f"{path}: not a zarr store ({type(exc).__name__})") from exc
    try:
        return _open_root(path, root)
    except StoreError:
        raise
    except Exception as exc:  # metadata of a group or of uns/mars_scale that zarr cannot parse
        raise StoreError(
            f"{path}: cannot be opened ({type(exc).__name__}: {exc}); the store is damaged "
            "(\"mars-scale verify\" names the element)"
        ) from exc


def _open_root(path: Path, root: zarr.Group) -> Atlas:
    spec = root.attrs.get(_SPEC_ATTR)
    if not isinstance(spec, dict) or spec.get("encoding-type") != SPEC_TYPE:
        raise StoreError(f"{path}: not a mars-scale atlas (root attribute {_SPEC_ATTR!r} missing)")
    version = str(spec.get("encoding-version", ""))
    if _compat_key(version) > _compat_key(SPEC_VERSION):
        raise StoreError(
            f"{path}: store spec {version} is newer than this mars-scale reads ({SPEC_VERSION}); "
            "upgrade mars_scale"
        )
    if _compat_key(version) != _compat_key(SPEC_VERSION):
        raise StoreError(
            f"{path}: store spec {version} is not supported (expected {SPEC_VERSION}); "
            "re-run \"mars-scale ingest\""
        )
    for key in ("X", "obs", "var"):
        if key not in root:
            raise StoreError(f"{path}: {key} is missing (re-run \"mars-scale ingest\")")
    meta = _read_meta(path, root)
    return Atlas(path, root, meta)


def size_on_disk(path: str | os.PathLike) -> int:
    """Total bytes of the files under ``path``."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total
