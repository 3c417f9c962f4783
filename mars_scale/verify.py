"""Check a whole store: every chunk's checksum, every node's metadata, the structure of X.

``mars-scale verify STORE`` runs :func:`verify_store`. See ``docs/reliability.md``
("Damaged stores") and ``docs/store.md`` ("Checksums").
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from mars_scale.errors import StoreError
from mars_scale.store import (
    _EMPTY_CHUNK,
    _crc32c,
    has_checksum,
    metadata_damage,
    open_store,
)

__all__ = ["VerifyReport", "verify_store"]

logger = logging.getLogger(__name__)

#: Elements read per call when an array is read through zarr (whole chunks at a time).
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify_store` checked in an intact store.

    Attributes
    ----------
    path
        The store.
    spec_version
        Its spec version.
    checksums
        Whether its chunks and metadata carry checksums (spec 0.1.1 and later).
    quick
        Whether only shard indexes and chunk sizes were checked.
    n_arrays, n_chunk_files, n_bytes
        Arrays checked, chunk (or shard) files seen, and their bytes.
    n_cells
        Rows of X whose structure was checked (0 with ``quick``).
    seconds
        Wall time.
    """

    path: str
    spec_version: str
    checksums: bool
    quick: bool
    n_arrays: int
    n_chunk_files: int
    n_bytes: int
    n_cells: int
    seconds: float

    def summary(self) -> str:
        """One line for the CLI."""
        what = "shard indexes and chunk sizes" if self.quick else "every chunk"
        sums = "checksums" if self.checksums else f"no checksums in spec {self.spec_version}: structure only"
        rows = "" if self.quick else f", {self.n_cells:,} cells of X"
        return (
            f"{self.path}: intact ({what} of {self.n_arrays} arrays, {self.n_chunk_files} files, "
            f"{self.n_bytes / 1e6:,.1f} MB{rows}; {sums}) in {self.seconds:.1f} s"
        )


def _damaged(path, what: str) -> StoreError:
    return StoreError(f"{path}: {what}; the store is damaged (restore it from a copy or re-run \"mars-scale ingest\")")


def _arrays(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    found: list[tuple[str, zarr.Array]] = []
    for name, member in sorted(group.members(), key=lambda m: m[0]):
        if isinstance(member, zarr.Group):
            found.extend(_arrays(member, f"{prefix}{name}/"))
        else:
            found.append((prefix + name, member))
    return found


def _chunk_files(directory: Path) -> list[Path]:
    """The chunk (or shard) files of an array: everything but its metadata."""
    out = []
    for dirpath, dirnames, files in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.extend(Path(dirpath) / f for f in files if f not in ("zarr.json", ".zarray", ".zattrs", ".zgroup"))
    return sorted(out)


def _sharding(array: zarr.Array):
    from zarr.codecs import ShardingCodec

    if array.metadata.zarr_format != 3:
        return None
    codecs = tuple(array.metadata.codecs)
    return codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None


def _check_files(path: Path, key: str, array: zarr.Array, checksummed: bool) -> tuple[int, int]:
    """Shard indexes (checksum, entries within the file) and chunk sizes of one array."""
    files = _chunk_files(path / key)
    shard = _sharding(array)
    n_bytes = 0
    if shard is not None:
        per_shard = math.prod(int(s) for s in array.shards) // math.prod(int(c) for c in shard.chunk_shape)
    for f in files:
        size = f.stat().st_size
        n_bytes += size
        where = f"{key} ({f.relative_to(path / key).as_posix()})"
        if shard is None:
            if size < (4 if checksummed else 1):
                raise _damaged(path, f"{where} is truncated ({size} bytes)")
            continue
        n_index = 16 * per_shard + 4
        with open(f, "rb") as fh:
            fh.seek(max(size - n_index, 0) if shard.index_location.value == "end" else 0)
            raw = fh.read(n_index)
        if len(raw) != n_index or _crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise _damaged(path, f"{where}: the shard index is truncated or its checksum differs")
        index = np.frombuffer(raw[:-4], "<u8").reshape(-1, 2)
        used = ~((index[:, 0] == _EMPTY_CHUNK) & (index[:, 1] == _EMPTY_CHUNK))
        ends = index[used, 0] + index[used, 1]
        if used.any() and (ends.max() > size or index[used, 1].min() < (4 if checksummed else 1)):
            raise _damaged(path, f"{where}: the shard index points outside the file")
    return len(files), n_bytes


def _read_all(path: Path, key: str, array: zarr.Array, reader=None) -> None:
    """Read every element of ``array`` (zarr or the direct reader checks each chunk)."""
    if array.ndim == 0:
        try:
            array[...]
        except Exception as exc:
            raise _damaged(path, f"{key} cannot be read ({type(exc).__name__}: {exc})") from exc
        return
    n = int(array.shape[0])
    per_row = max(1, math.prod(int(s) for s in array.shape[1:]))
    chunk = int(array.chunks[0])
    step = max(chunk, (_BLOCK_ELEMENTS // per_row) // chunk * chunk)
    for a in range(0, n, step):
        b = min(n, a + step)
        try:
            if reader is not None:
                reader.read(a, b)
            else:
                array[a:b]
        except Exception as exc:
            raise _damaged(path, f"{key} elements {a}:{b} cannot be read ({type(exc).__name__}: {exc})") from exc


def verify_store(path: str | os.PathLike, *, quick: bool = False, rows_per_block: int | None = None) -> VerifyReport:
    """Read and check every chunk of every array of a store.

    Checks, in order: the store opens (spec version, required elements); every node's
    metadata checksum (spec 0.1.1 and later); every array carries chunk checksums; shard
    indexes (checksum, entries inside the file) and chunk file sizes; then, unless ``quick``,
    every chunk of every array is read (zarr, or :class:`~mars_scale.store.RangeReader` for
    ``X``, checks each chunk's checksum), the lengths of ``X``'s arrays agree, and every row of
    ``X`` passes :func:`~mars_scale.store.x_rows_damage`.

    Parameters
    ----------
    path
        The store.
    quick
        Check only metadata, shard indexes and chunk sizes (no chunk is decompressed).
    rows_per_block
        Rows of X read at a time (default: the store's rows per chunk x 16).

    Returns
    -------
    VerifyReport
        What was checked.

    Raises
    ------
    StoreError
        At the first damage found, naming the store, the array and the rows or elements.
    """
    started = time.perf_counter()
    path = Path(path)
    if path.is_dir():  # before opening: a node whose metadata is damaged is named here
        problem = metadata_damage(path, required=False)
        if problem:
            raise _damaged(path, problem)
    atlas = open_store(path)
    problem = metadata_damage(path, required=atlas.checksummed)
    if problem:
        raise _damaged(path, problem)
    root = zarr.open_group(path, mode="r")
    arrays = _arrays(root)
    n_files = n_bytes = 0
    for key, array in arrays:
        if atlas.checksummed and not has_checksum(array):
            raise _damaged(path, f"{key} has no chunk checksums, which spec {atlas.spec_version} requires")
        files, size = _check_files(path, key, array, atlas.checksummed)
        n_files += files
        n_bytes += size
    n_cells = 0
    if not quick:
        x_keys = ("X/data", "X/indices", "X/indptr")
        for key, array in arrays:
            if key not in x_keys:
                _read_all(path, key, array)
        sizes = {k: int(root[k].shape[0]) for k in x_keys}
        if sizes["X/indptr"] != atlas.n_cells + 1 or sizes["X/data"] != sizes["X/indices"]:
            raise _damaged(path, f"X/indptr, X/data and X/indices have inconsistent lengths {sizes}")
        try:
            ends = atlas.reader("X/indptr").read(0, 1), atlas.reader("X/indptr").read(atlas.n_cells, atlas.n_cells + 1)
        except Exception as exc:
            raise _damaged(path, f"X/indptr cannot be read ({type(exc).__name__}: {exc})") from exc
        if int(ends[0][0]) != 0 or int(ends[1][0]) != sizes["X/data"]:
            raise _damaged(path, f"X/indptr runs {int(ends[0][0])}:{int(ends[1][0])}, expected 0:{sizes['X/data']}")
        step = rows_per_block or atlas.rows_per_block * 16
        for a in range(0, atlas.n_cells, step):
            atlas.read_rows(a, min(atlas.n_cells, a + step))  # raises StoreError naming the rows
        n_cells = atlas.n_cells
    report = VerifyReport(
        path=str(path), spec_version=atlas.spec_version, checksums=atlas.checksummed, quick=quick,
        n_arrays=len(arrays), n_chunk_files=n_files, n_bytes=n_bytes, n_cells=n_cells,
        seconds=time.perf_counter() - started,
    )
    logger.debug("%s", report.summary())
    return report
