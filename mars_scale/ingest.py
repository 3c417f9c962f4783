"""Stream h5ad files into an atlas store with bounded memory.

Two passes over each input, in row blocks read with h5py (nothing is unpickled and X is never
loaded whole):

1. quality control: validate values, per-cell totals and gene counts (cell filter), cells per
   gene in the aligned gene space (gene filter), experiments and labels present, input kind;
2. write: filtered, gene-aligned CSR rows of raw values, ``obs`` columns, and the per-gene
   moments of log1p-normalised values, merged across blocks in float64.

Cells are stored grouped by experiment. When the inputs already list each experiment's cells
contiguously (the usual case: one experiment per file) rows go straight to the store; otherwise
they are spooled per experiment and then concatenated.

:func:`ingest_blocks` writes the same store in one pass from blocks already in memory (such as
the simulator's), without a gene filter.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from mars_scale.errors import ConfigError, InputError
from mars_scale.stats import MomentAccumulator, block_moments
from mars_scale.store import (
    AppendArray,
    CSRWriter,
    StoreLayout,
    StringAppendArray,
    atomic_directory,
    check_replaceable,
    encode_array,
    encode_categorical,
    encode_dataframe,
    init_anndata_root,
    spec_record,
    stamp_spec,
)

__all__ = ["CellBlock", "IngestConfig", "ingest", "ingest_blocks", "make_runner", "UNLABELED_VALUES"]

logger = logging.getLogger(__name__)

# Log-normalised values stay far below this; non-integer inputs with larger values are
# (expected) counts, such as RSEM output.
_LOGNORM_MAX = 30.0
# float32 (the store's dtype of X) holds every integer up to 2^24 exactly, and no more.
_FLOAT32_EXACT = 1 << 24
_READ_NNZ = 1 << 22  # non-zeros per read block (about 50 MB of working memory)
# Label values that mean "no cell type" by default (``--unlabeled-values``).
UNLABELED_VALUES = ("", "NA", "nan", "Unknown", "unknown", "unassigned")


@dataclass(frozen=True)
class IngestConfig:
    """Options of :func:`ingest`.

    Parameters
    ----------
    experiment_key
        obs column naming each cell's experiment. ``None``: each file is one experiment named
        after its file stem.
    label_key
        obs column with cell types. Missing values mark unannotated cells; a file without the
        column is unannotated. ``None``: no labels.
    genes
        ``"intersection"`` or ``"union"`` of the inputs' genes.
    gene_key
        var column holding gene ids (default: var_names).
    layer
        Read counts from ``layers[layer]`` instead of X.
    min_counts, min_genes
        Cells with fewer total counts or fewer expressed genes are dropped.
    min_cells
        Genes expressed in fewer cells (after the cell filter) are dropped (paper: 5).
    layout
        On-disk chunking of X.
    unlabeled_values
        Label values that mean "no cell type" (the cell is unannotated), compared exactly;
        missing values always are.
    """

    experiment_key: str | None = None
    label_key: str | None = None
    genes: str = "intersection"
    gene_key: str | None = None
    layer: str | None = None
    min_counts: float = 1.0
    min_genes: int = 1
    min_cells: int = 5
    layout: StoreLayout = field(default_factory=StoreLayout)
    unlabeled_values: tuple[str, ...] = UNLABELED_VALUES

    def __post_init__(self) -> None:
        object.__setattr__(self, "unlabeled_values", tuple(str(v) for v in self.unlabeled_values))
        if self.genes not in ("intersection", "union"):
            raise ConfigError(f"genes must be 'intersection' or 'union', got {self.genes!r}")
        for name in ("min_counts", "min_genes", "min_cells"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Reading one h5ad file (or AnnData .zarr) through anndata's element readers


def _decode(values: np.ndarray, where: str) -> np.ndarray:
    """Strings stored as bytes, decoded as UTF-8; ``where`` names the element in errors."""
    if values.dtype.kind == "T":  # numpy's StringDType (zarr v3 strings)
        return values.astype(object)
    if values.dtype.kind not in ("S", "O"):
        return values
    out = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError:
                raise _not_utf8(where, v) from None
        out[i] = v
    return out


def _not_utf8(where: str, value: bytes | None = None) -> InputError:
    shown = f" ({value[:40]!r})" if value is not None else ""
    return InputError(f"{where} holds a value that is not valid UTF-8{shown}; re-encode the names as UTF-8")


def _is_array(elem) -> bool:
    import zarr

    return isinstance(elem, (h5py.Dataset, zarr.Array))


def _objects(values, where: str) -> np.ndarray:
    """A column as anndata reads it, as an object array with ``None`` for missing values."""
    if isinstance(values, pd.api.extensions.ExtensionArray):  # nullable integer, boolean, string
        return values.to_numpy(dtype=object, na_value=None)
    values = np.asarray(values)
    out = _decode(values, where).astype(object)
    if values.dtype.kind == "f":
        out[np.isnan(values)] = None
    return out


class _Column:
    """Rows a:b of one obs or var column as objects (``None`` = missing).

    The column is read once, whole, by ``anndata.io.read_elem`` (a categorical keeps only its
    codes: one or two bytes per cell) and sliced per block.
    """

    def __init__(self, values, where: str) -> None:
        self._where = where
        if isinstance(values, pd.Categorical):  # slice the codes, not an object array
            self._codes = values.codes
            categories = _objects(values.categories.to_numpy(), f"{where}/categories")
            self._lookup = np.array([*categories, None], dtype=object)
            self._values = None
        else:
            self._values = _objects(values, where)

    def __call__(self, a: int, b: int) -> np.ndarray:
        if self._values is not None:
            return self._values[a:b]
        codes = self._codes[a:b]
        return self._lookup[np.where(codes < 0, len(self._lookup) - 1, codes)]


class _ZarrFile:
    """An AnnData ``.zarr`` group with the two things ingest uses of an ``h5py.File``."""

    def __init__(self, group) -> None:
        self.group = group

    def __getitem__(self, key: str):
        return self.group[key]

    def __contains__(self, key: str) -> bool:
        return key in self.group

    def close(self) -> None:
        pass


def _open_anndata_zarr(path: Path) -> _ZarrFile:
    """Open a directory written by ``AnnData.write_zarr`` (or a mars-scale store) for reading."""
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except Exception as exc:  # not a zarr group at all
        raise InputError(
            f"{path}: is a directory but not a zarr store; expected an .h5ad file or an AnnData .zarr"
        ) from exc
    if not ("obs" in group and "var" in group):
        raise InputError(f"{path}: is a zarr store but not an AnnData one (no obs and var); "
                         "expected an .h5ad file or an AnnData .zarr")
    return _ZarrFile(group)


class _H5adSource:
    """Row-block access to one h5ad file or AnnData ``.zarr`` store, validated up front.

    Elements are read with anndata's readers: ``read_elem`` for obs and var columns,
    ``sparse_dataset`` row slices for a sparse X (a dense X is a plain array, sliced as is).
    """

    def __init__(self, path: Path, config: IngestConfig) -> None:
        self.path = path
        self.name = path.name
        if not path.exists():
            raise InputError(f"{path}: no such file")
        if path.is_dir():
            self.file = _open_anndata_zarr(path)
        else:
            try:
                self.file = h5py.File(path, "r")
            except OSError as exc:
                raise InputError(f"{path}: not a readable HDF5/h5ad file ({exc})") from None
        try:
            self._init(config)
        except KeyError as exc:
            self.file.close()
            raise InputError(f"{path}: malformed h5ad ({exc})") from None
        except Exception:
            self.file.close()
            raise

    def _init(self, config: IngestConfig) -> None:
        f = self.file
        xkey = f"layers/{config.layer}" if config.layer else "X"
        if xkey not in f:
            what = f"layer {config.layer!r}" if config.layer else "X"
            raise InputError(f"{self.path}: has no {what}")
        self._open_x(f[xkey], xkey)
        if "obs" not in f or "var" not in f:
            raise InputError(f"{self.path}: obs or var is missing")
        self.obs_names_key = self._index_key("obs")
        self.var_names_key = self._index_key("var")
        self.obs_columns = [str(c) for c in f["obs"].attrs.get("column-order", [])]
        n_obs = int(f["obs"][self.obs_names_key].shape[0])
        n_var = int(f["var"][self.var_names_key].shape[0])
        if self.shape[0] == 0 or self.shape[1] == 0:
            raise InputError(f"{self.path}: is empty ({self.shape[0]} cells x {self.shape[1]} genes)")
        if (n_obs, n_var) != self.shape:
            raise InputError(
                f"{self.path}: {xkey} has shape {self.shape} but obs x var is {n_obs} x {n_var}"
            )
        if self.kind != "dense":
            x = f[xkey]
            if x["indptr"].shape[0] != self.shape[0 if self.kind == "csr" else 1] + 1:
                raise InputError(f"{self.path}: {xkey}/indptr length disagrees with the shape")
            if x["data"].shape[0] != x["indices"].shape[0]:
                raise InputError(f"{self.path}: {xkey}/data and indices differ in length")
        if config.gene_key:
            cols = [str(c) for c in f["var"].attrs.get("column-order", [])]
            if config.gene_key not in cols:
                raise InputError(
                    f"{self.path}: var column {config.gene_key!r} does not exist "
                    f"(available: {', '.join(cols) or 'none'})"
                )
            genes = self._column("var", config.gene_key)(0, n_var)
        else:
            genes = self._column("var", self.var_names_key)(0, n_var)
        self.genes = pd.Index([str(g) for g in genes])
        dup = self.genes[self.genes.duplicated()]
        if len(dup):
            raise InputError(
                f"{self.path}: duplicate gene names ({', '.join(map(str, dup[:3]))}"
                f"{'...' if len(dup) > 3 else ''}); make them unique or pass --gene-key"
            )
        self._csc = None

    def _open_x(self, x, xkey: str) -> None:
        """Check X (or the layer) and keep a reader of its rows: the array or a sparse dataset."""
        from anndata.io import sparse_dataset

        if _is_array(x):
            if x.ndim != 2:
                raise InputError(f"{self.path}: {xkey} is not a matrix (shape {x.shape})")
            self.kind, self.shape, self.x, dtype = "dense", tuple(int(s) for s in x.shape), x, x.dtype
        else:
            for part in ("data", "indices", "indptr"):
                if part not in x:
                    raise InputError(f"{self.path}: {xkey}/{part} is missing")
            try:
                self.x = sparse_dataset(x)
            except Exception as exc:
                raise InputError(f"{self.path}: {xkey} has an unsupported encoding ({exc})") from None
            self.kind, self.shape, dtype = self.x.format, tuple(int(s) for s in self.x.shape), x["data"].dtype
        if dtype.kind not in "biuf":
            raise InputError(f"{self.path}: {xkey} has non-numeric dtype {dtype} (numbers expected)")

    def _index_key(self, group: str) -> str:
        key = self.file[group].attrs.get("_index", "_index")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.file[group]:
            raise InputError(f"{self.path}: {group} has no index ({key!r})")
        return key

    def has_column(self, name: str) -> bool:
        return name in self.obs_columns

    def _column(self, group: str, name: str) -> _Column:
        """A reader of rows a:b of a column, read whole by ``anndata.io.read_elem``."""
        from anndata.io import read_elem

        elem = self.file[group][name]
        where = f"{self.path}: {group}/{name}"
        if _is_array(elem) and elem.dtype.kind not in "biufSOUT":  # never hand opaque bytes to a reader
            raise InputError(f"{where} has unsupported dtype {elem.dtype}")
        try:
            values = read_elem(elem)
        except Exception as exc:
            cause = exc
            while cause is not None and not isinstance(cause, UnicodeDecodeError):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                part = "/categories" if not _is_array(elem) and "categories" in elem else ""
                raise _not_utf8(where + part) from None
            raise InputError(f"{where} cannot be read ({type(exc).__name__}: {exc})") from None
        if isinstance(values, (pd.DataFrame, dict)) or getattr(values, "ndim", 1) != 1:
            raise InputError(f"{where} is not a column (a {type(values).__name__})")
        return _Column(values, where)

    def obs_reader(self, name: str) -> Callable[[int, int], np.ndarray]:
        return self._column("obs", name)

    def obs_names(self, a: int, b: int) -> np.ndarray:
        # A plain string array, sliced per block: memory does not grow with the number of cells.
        return _decode(self.file["obs"][self.obs_names_key][a:b], f"{self.path}: obs/{self.obs_names_key}")

    def row_blocks(self) -> list[tuple[int, int]]:
        n, g = self.shape
        if self.kind == "dense":
            step = max(1, _READ_NNZ // max(g, 1))
            return [(a, min(a + step, n)) for a in range(0, n, step)]
        if self.kind == "csc":
            step = 8192
            return [(a, min(a + step, n)) for a in range(0, n, step)]
        indptr = self.x.group["indptr"]
        blocks: list[tuple[int, int]] = []
        # Cut blocks of about _READ_NNZ non-zeros, reading indptr in windows so memory does
        # not grow with the number of cells.
        for w in range(0, n, 65536):
            ptr = np.asarray(indptr[w : min(w + 65536, n) + 1], dtype=np.int64)
            cut = 0
            while cut < len(ptr) - 1:
                stop = int(np.searchsorted(ptr, ptr[cut] + _READ_NNZ, side="right")) - 1
                stop = min(max(stop, cut + 1), len(ptr) - 1)
                blocks.append((w + cut, w + stop))
                cut = stop
        return blocks

    def read(self, a: int, b: int) -> sp.csr_matrix:
        """Rows a:b as CSR with the stored dtype."""
        try:
            if self.kind == "dense":
                return sp.csr_matrix(np.asarray(self.x[a:b]))
            if self.kind == "csr":
                return self.x[a:b]
            if self._csc is None:
                nnz = int(self.x.group["data"].shape[0])
                if nnz * 12 > 2 * 1024**3:
                    raise InputError(
                        f"{self.path}: CSC X with {nnz} non-zeros is too large to convert in "
                        "memory; write it as CSR (adata.X = adata.X.tocsr())"
                    )
                self._csc = self.x.to_memory().tocsr()
            return self._csc[a:b]
        except InputError:
            raise
        except Exception as exc:
            raise InputError(
                f"{self.path}: cannot read X rows {a}:{b} ({type(exc).__name__}: {exc}); "
                "the file is truncated or corrupt"
            ) from None

    def close(self) -> None:
        self._csc = None
        self.file.close()


def _files(path: Path) -> list[Path]:
    """The file itself, or every file of a directory (an AnnData .zarr) in a fixed order."""
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def _sha256(path: Path) -> str:
    """SHA-256 of a file, or of a directory's relative paths and contents in sorted order."""
    h = hashlib.sha256()
    for file in _files(path):
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 23), b""):
                h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in _files(path))


# ---------------------------------------------------------------------------------------------
# Quality-control pass


@dataclass
class _FilePlan:
    source: _H5adSource
    gene_map: np.ndarray  # file gene -> output gene, -1 = dropped
    experiment: Callable[[int, int], np.ndarray]
    label: Callable[[int, int], np.ndarray] | None
    kind: str = "counts"
    non_integer: int = 0
    n_kept: int = 0
    increasing: bool = False  # gene_map keeps the order of the genes it keeps
    keep: list = field(default_factory=list)  # per read block of pass 2: the cells kept
    experiments: dict = field(default_factory=dict)  # experiments seen in pass 1 (in order)
    experiment_name: str | None = None  # the file's one experiment (no experiment key)


def _check_values(src: _H5adSource, block: sp.csr_matrix, a: int, b: int) -> None:
    data = block.data
    if data.dtype.kind not in "fiub":
        raise InputError(f"{src.path}: X has non-numeric dtype {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        row = a + int(np.searchsorted(block.indptr, np.flatnonzero(~np.isfinite(data))[0], "right") - 1)
        raise InputError(f"{src.path}: X contains NaN or infinite values (first in row {row})")
    if data.size and data.min() < 0:
        row = a + int(np.searchsorted(block.indptr, int(np.argmin(data)), "right") - 1)
        raise InputError(f"{src.path}: X contains negative values (first in row {row}); raw counts expected")
    if data.size and data.max() > _FLOAT32_EXACT:
        first = int(np.flatnonzero(data > _FLOAT32_EXACT)[0])
        row = a + int(np.searchsorted(block.indptr, first, "right") - 1)
        raise InputError(
            f"{src.path}: X holds {data[first]:.0f} in row {row}, above 2^24 = {_FLOAT32_EXACT}, "
            "which the store's float32 cannot hold exactly; check the input"
        )


def _cell_mask(block: sp.csr_matrix, config: IngestConfig) -> np.ndarray:
    totals = np.asarray(block.sum(axis=1), dtype=np.float64).ravel()
    positive = block.data > 0
    if positive.all():
        n_genes = np.diff(block.indptr)
    else:  # positive entries per row, from a running count (no per-entry row ids)
        seen = np.zeros(positive.size + 1, dtype=np.int64)
        np.cumsum(positive, out=seen[1:])
        n_genes = seen[block.indptr[1:]] - seen[block.indptr[:-1]]
    return (totals >= config.min_counts) & (n_genes >= config.min_genes) & (totals > 0)


def _align_block(x: sp.csr_matrix, plan: _FilePlan, n_out: int) -> sp.csr_matrix:
    """Rows of ``x`` in the output gene space: canonical float32 CSR without zeros."""
    cols = plan.gene_map[x.indices]
    ok = (cols >= 0) & (x.data != 0)
    if plan.increasing and x.has_canonical_format:
        # An increasing gene map keeps each row's indices sorted and unique: drop the entries
        # of removed genes and zeros, and recount the rows from a running count.
        kept = np.zeros(ok.size + 1, dtype=np.int64)
        np.cumsum(ok, out=kept[1:])
        indptr = kept[x.indptr]
        index_dtype = np.int32 if indptr[-1] < 2**31 else np.int64
        return sp.csr_matrix(
            (x.data[ok].astype(np.float32), cols[ok].astype(np.int32), indptr.astype(index_dtype)),
            shape=(x.shape[0], n_out),
        )
    coo = x.tocoo()
    block = sp.csr_matrix(
        (coo.data[ok].astype(np.float32), (coo.row[ok], cols[ok])), shape=(x.shape[0], n_out)
    )
    block.sum_duplicates()
    block.sort_indices()
    return block


def _align_genes(sources: Sequence[_H5adSource], how: str) -> pd.Index:
    genes = sources[0].genes
    for src in sources[1:]:
        if how == "intersection":
            genes = genes[genes.isin(src.genes)]
        else:
            genes = genes.append(src.genes[~src.genes.isin(genes)])
    if len(genes) == 0:
        names = ", ".join(s.name for s in sources)
        raise InputError(f"no genes are shared between the inputs ({names}); check --gene-key")
    return genes


# ---------------------------------------------------------------------------------------------
# Writing


_CATEGORICAL = ("experiment", "cell_type")
_NUMERIC = {"n_counts": np.float64, "n_genes": np.int32}


class _RowSink:
    """CSR rows plus the per-cell obs columns, appended in blocks.

    Categorical columns are streamed as codes into ``obs/<name>/codes``; their categories and
    anndata's attributes are added by :meth:`finish_obs`.
    """

    def __init__(self, group, *, n_genes: int, nnz_per_chunk: int, layout: StoreLayout) -> None:
        chunk = layout.rows_per_chunk * 16
        self.x = CSRWriter(
            group, "X", n_cols=n_genes, nnz_per_chunk=nnz_per_chunk,
            rows_per_chunk=layout.rows_per_chunk, layout=layout,
        )
        self.obs = group.create_group("obs")
        self.names = StringAppendArray(self.obs, "_index", chunk=chunk)
        self.columns: dict[str, AppendArray] = {}
        for name in _CATEGORICAL:
            cat = self.obs.create_group(name)
            self.columns[name] = AppendArray(cat, "codes", np.int32, chunk=chunk, layout=layout)
        for name, dtype in _NUMERIC.items():
            self.columns[name] = AppendArray(self.obs, name, dtype, chunk=chunk, layout=layout)

    @classmethod
    def resume(cls, group) -> "_RowSink":
        """Append to the rows and obs columns of an existing store (``--append``)."""
        self = cls.__new__(cls)
        self.x = CSRWriter.resume(group["X"])
        self.obs = group["obs"]
        self.names = StringAppendArray.resume(self.obs["_index"])
        self.columns = {name: AppendArray.resume(self.obs[name]["codes"]) for name in _CATEGORICAL}
        self.columns.update({name: AppendArray.resume(self.obs[name]) for name in _NUMERIC})
        return self

    def append(self, block: sp.csr_matrix, names, obs: dict[str, np.ndarray]) -> None:
        self.x.append(block)
        self.names.append(names)
        for key, arr in self.columns.items():
            arr.append(obs[key])

    def column(self, key: str, a: int, b: int) -> np.ndarray:
        return np.asarray(self.columns[key].array[a:b])

    def close(self) -> None:
        self.x.close()
        self.names.close()
        for arr in self.columns.values():
            arr.close()

    def finish_obs(self, categories: dict[str, list[str]], column_order: list[str] | None = None) -> None:
        for name in _CATEGORICAL:
            encode_categorical(self.obs[name], categories[name])
        for name in _NUMERIC:
            encode_array(self.columns[name].array)
        encode_dataframe(self.obs, column_order or [*_CATEGORICAL, *_NUMERIC])


class _CountSums:
    """Per gene and experiment: sum and sum of squares of the raw values (float64).

    Written to ``varm['mars_counts_sum']`` and ``varm['mars_counts_sumsq']`` (genes x
    experiments, in store order), they give :func:`mars_scale.stats.highly_variable_genes` each
    experiment's gene means and variances without a pass over X.
    """

    def __init__(self, n_genes: int, n_experiments: int, *, first: int = 0) -> None:
        self.s1 = np.zeros((n_experiments, n_genes))
        self.s2 = np.zeros((n_experiments, n_genes))
        self.first = first  # code of the first experiment counted here (an append counts the new ones)

    def add(self, block: sp.csr_matrix, codes: np.ndarray) -> None:
        rows = np.repeat(codes.astype(np.int64) - self.first, np.diff(block.indptr))
        values = block.data.astype(np.float64)
        n_e, g = self.s1.shape
        flat = rows * g + block.indices
        self.s1 += np.bincount(flat, weights=values, minlength=n_e * g).reshape(n_e, g)
        self.s2 += np.bincount(flat, weights=values * values, minlength=n_e * g).reshape(n_e, g)

    def write(self, root) -> None:
        from anndata.io import write_elem

        write_elem(root["varm"], "mars_counts_sum", np.ascontiguousarray(self.s1.T))
        write_elem(root["varm"], "mars_counts_sumsq", np.ascontiguousarray(self.s2.T))


# The input's other obs and var columns, carried over with their types (as anndata reads them).
_OBS_RESERVED = frozenset({*_CATEGORICAL, *_NUMERIC})
_VAR_RESERVED = frozenset({"n_cells", "mean", "std"})


def _layer_hint(src: "_H5adSource", config: IngestConfig) -> str:
    """``pass --layer counts`` when X looks normalised and the file has a counts layer."""
    if config.layer is not None or "layers" not in src.file:
        return ""
    layers = [str(k) for k in src.file["layers"].keys()]
    for name in ("counts", "raw_counts", "count", "umi_counts"):
        if name in layers:
            return f"the file has a {name!r} layer: pass --layer {name}"
    return f"the file has layers {', '.join(layers)}: pass --layer NAME for the counts" if layers else ""


def _extra_names(src: "_H5adSource", group: str, skip: set[str], reserved: frozenset) -> dict[str, str]:
    """The input's other columns of ``group``: input name -> name in the store."""
    cols = [str(c) for c in src.file[group].attrs.get("column-order", [])]
    out = {}
    for c in cols:
        if c in skip:
            continue
        out[c] = f"{c}_input" if c in reserved else c
    return out


def _anndata_column(values: pd.Series) -> Any:
    """A column anndata writes with its type: strings with gaps become categorical, ints with
    gaps nullable ``Int64``, booleans with gaps nullable ``boolean``."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return pd.Categorical(values)
    if isinstance(values.dtype, pd.api.extensions.ExtensionDtype):
        return values.array
    if values.dtype.kind in "biuf":
        return values.to_numpy()
    present = values.dropna()
    if len(present) and all(isinstance(v, (bool, np.bool_)) for v in present):
        return pd.array(values, dtype="boolean")
    if len(present) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
        return pd.array(values, dtype="Int64")
    if len(present) and all(isinstance(v, (float, int, np.floating, np.integer)) for v in present):
        return values.astype(np.float64).to_numpy()
    if present.size == values.size:
        return values.astype(str).to_numpy(dtype=object)
    return pd.Categorical(values.where(values.isna(), values.astype(str)))


def _concat_columns(parts: list[pd.Series | None], lengths: list[int]) -> pd.Series:
    """One column over several files; a file without it gives missing values."""
    present = [p for p in parts if p is not None]
    filled = [p if p is not None else pd.Series([None] * n, dtype=object) for p, n in zip(parts, lengths)]
    if all(isinstance(p.dtype, pd.CategoricalDtype) for p in present):
        cats = pd.api.types.union_categoricals([pd.Categorical(p) for p in present]).categories
        filled = [pd.Series(pd.Categorical(p.astype(object), categories=cats)) for p in filled]
        return pd.concat(filled, ignore_index=True)
    dtypes = {str(p.dtype) for p in present}
    if len(present) == len(parts) and len(dtypes) == 1:
        return pd.concat(filled, ignore_index=True)
    kinds = {p.dtype.kind if not isinstance(p.dtype, pd.api.extensions.ExtensionDtype) else "x" for p in present}
    if kinds <= {"i", "u"}:
        return pd.concat([p.astype("Int64") if p.dtype != object else pd.Series(pd.array(p, dtype="Int64"))
                          for p in filled], ignore_index=True)
    if kinds == {"b"}:
        return pd.concat([pd.Series(pd.array(p, dtype="boolean")) for p in filled], ignore_index=True)
    return pd.concat([p.astype(object) for p in filled], ignore_index=True)


def _write_extra_obs(root, plans: list["_FilePlan"], config: IngestConfig, order: np.ndarray | None) -> None:
    """Write the inputs' other obs columns for the cells kept, in store order.

    The columns are read whole (``anndata.io.read_elem``) one at a time: memory grows with the
    number of cells times one column, as anndata's own obs does, never with X.
    """
    from anndata.io import read_elem, write_elem

    skip = {k for k in (config.experiment_key, config.label_key) if k}
    names: dict[str, str] = {}
    for p in plans:
        for c, out in _extra_names(p.source, "obs", skip, _OBS_RESERVED).items():
            names.setdefault(c, out)
    if not names:
        return
    written = []
    for col, out in names.items():
        column = _input_obs_column(plans, col)
        if column is None:
            continue
        if order is not None:
            column = column.iloc[order].reset_index(drop=True)
        write_elem(root["obs"], out, _anndata_column(column))
        written.append(out)
    renamed = [f"{c} as {o}" for c, o in names.items() if c != o]
    if renamed:
        logger.info("obs columns renamed (their names are the store's own): %s", ", ".join(renamed))
    order_attr = [str(c) for c in root["obs"].attrs["column-order"]]
    root["obs"].attrs["column-order"] = [*order_attr, *written]


def _input_obs_column(plans: list["_FilePlan"], col: str) -> pd.Series | None:
    """The inputs' obs column ``col`` for the cells kept, in input order (missing where a file
    lacks it), or ``None`` if no file has it or one cannot be read."""
    from anndata.io import read_elem

    masks = [np.concatenate(p.keep) if p.keep else np.zeros(0, bool) for p in plans]
    parts = []
    for p, mask in zip(plans, masks):
        if col not in [str(c) for c in p.source.file["obs"].attrs.get("column-order", [])]:
            parts.append(None)
            continue
        try:
            values = read_elem(p.source.file["obs"][col])
        except Exception as exc:
            logger.warning("%s: obs column %r cannot be read (%s: %s); not carried over",
                           p.source.name, col, type(exc).__name__, exc)
            return None
        parts.append(pd.Series(values)[mask].reset_index(drop=True))
    if all(part is None for part in parts):
        return None
    return _concat_columns(parts, [int(m.sum()) for m in masks])


def _extra_var(plans: list["_FilePlan"], out_genes: pd.Index) -> pd.DataFrame:
    """The inputs' other var columns for the store's genes (a gene takes the first file's value)."""
    from anndata.io import read_elem

    columns: dict[str, list[pd.Series]] = {}
    renamed: dict[str, str] = {}
    for p in plans:
        src = p.source
        skip = {src.var_names_key}
        for col, out in _extra_names(src, "var", skip, _VAR_RESERVED).items():
            try:
                values = read_elem(src.file["var"][col])
            except Exception as exc:
                logger.warning("%s: var column %r cannot be read (%s: %s); not carried over",
                               src.name, col, type(exc).__name__, exc)
                continue
            columns.setdefault(out, []).append(pd.Series(values, index=src.genes))
            if out != col:
                renamed[col] = out
    frame = {}
    for out, series in columns.items():
        parts = [s.reindex(out_genes) for s in series]
        col = parts[0]
        for other in parts[1:]:
            col = col.combine_first(other)
        if col.isna().any() and series[0].dtype.kind in "iub":
            col = pd.Series(pd.array(col.astype(object).where(col.notna(), None),
                                     dtype="Int64" if series[0].dtype.kind in "iu" else "boolean"), index=col.index)
        frame[out] = _anndata_column(col)
    if renamed:
        logger.info("var columns renamed (their names are the store's own): %s",
                    ", ".join(f"{c} as {o}" for c, o in renamed.items()))
    return pd.DataFrame(frame, index=out_genes)


def _replay(spool: _RowSink, sink: _RowSink, block_rows: int) -> None:
    """Append everything in a spooled sink to ``sink``, block by block."""
    x = spool.x.group
    n, g = spool.x.n_rows, spool.x.n_cols
    for a in range(0, n, block_rows):
        b = min(a + block_rows, n)
        ptr = np.asarray(x["indptr"][a : b + 1])
        lo, hi = int(ptr[0]), int(ptr[-1])
        block = sp.csr_matrix(
            (np.asarray(x["data"][lo:hi]), np.asarray(x["indices"][lo:hi]), ptr - lo), shape=(b - a, g)
        )
        cols = {k: spool.column(k, a, b) for k in sink.columns}
        sink.append(block, np.asarray(spool.names.array[a:b]), cols)


def ingest(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    config: IngestConfig | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    scheduler: str | None = None,
) -> Path:
    """Stream h5ad files into a new atlas store.

    Parameters
    ----------
    inputs
        h5ad files. Each is one experiment named after its stem unless
        ``config.experiment_key`` is set.
    output
        The store directory to create (``.zarr``).
    config
        :class:`IngestConfig`.
    overwrite
        Replace an existing store.
    workers, scheduler
        Run the reading, checks and statistics of each block on a ``dask.distributed``
        LocalCluster of ``workers`` processes, or on the cluster of the scheduler at
        ``scheduler`` (see :func:`make_runner`); the store is byte-identical to a serial ingest.

    Returns
    -------
    Path
        The store. It holds ``X`` (raw values, CSR), ``obs['experiment']``,
        ``obs['cell_type']``, ``obs['n_counts']``, ``obs['n_genes']``, ``var['n_cells']``,
        ``var['mean']``, ``var['std']`` and ``uns['mars_scale']``.

    Raises
    ------
    InputError
        For a missing or malformed input, bad values, a missing column or no shared genes.
    StoreError
        If ``output`` exists and ``overwrite`` is false.
    """
    config = config or IngestConfig()
    output = Path(output)
    if not inputs:
        raise InputError("no input files given")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: already exists (pass --overwrite to replace it)")
    if overwrite:
        check_replaceable(output)  # before the work: --overwrite only ever replaces a store
    paths = [Path(p) for p in inputs]
    if len(set(p.resolve() for p in paths)) != len(paths):
        raise InputError("the same input file is given twice")
    sources: list[_H5adSource] = []
    runner = make_runner(workers, scheduler)
    try:
        for p in paths:
            sources.append(_H5adSource(p, config))
        return _ingest(sources, output, config, overwrite, runner)
    finally:
        runner.close()
        for s in sources:
            s.close()


def _plan(sources: list[_H5adSource], config: IngestConfig) -> tuple[list[_FilePlan], pd.Index]:
    genes = _align_genes(sources, config.genes)
    return _plan_experiments(sources, config, genes), genes


def _plan_experiments(sources: list[_H5adSource], config: IngestConfig, genes: pd.Index) -> list[_FilePlan]:
    """One plan per input: its experiments, labels and the map of its genes onto ``genes``."""
    gene_pos = pd.Index(genes)
    plans = []
    if config.label_key and not any(s.has_column(config.label_key) for s in sources):
        raise InputError(
            f"{sources[0].path}: obs column {config.label_key!r} does not exist "
            f"(available: {', '.join(sources[0].obs_columns) or 'none'})"
        )
    stems = [s.path.stem for s in sources]
    for src, stem in zip(sources, stems):
        name = None
        if config.experiment_key:
            if not src.has_column(config.experiment_key):
                raise InputError(
                    f"{src.path}: obs column {config.experiment_key!r} does not exist "
                    f"(available: {', '.join(src.obs_columns) or 'none'})"
                )
            experiment = src.obs_reader(config.experiment_key)
        else:
            name = stem if stems.count(stem) == 1 else f"{stem}_{stems[: len(plans)].count(stem)}"
            experiment = (lambda name: lambda a, b: np.full(b - a, name, dtype=object))(name)
        label = None
        if config.label_key and src.has_column(config.label_key):
            label = src.obs_reader(config.label_key)
        elif config.label_key:
            logger.info("%s: no obs column %r; its cells are unannotated", src.name, config.label_key)
        plans.append(_FilePlan(src, gene_pos.get_indexer(src.genes).astype(np.int64), experiment, label,
                               experiment_name=name))
    return plans


@dataclass
class _BlockCheck:
    """What the quality-control pass learns from one read block (merged in order by :class:`_Census`)."""

    n_kept: int
    non_integer: int  # non-integer values in the block
    max_value: float  # largest value (float inputs; -inf otherwise)
    runs: list[str]  # experiments of the kept cells, one entry per contiguous run
    experiment_cells: dict[str, int]
    experiment_nonint: dict[str, int]  # non-integer values per experiment
    labels: list[str]  # cell types seen
    unlabeled: dict[str, int]  # cells per label value that means "no cell type"
    n_cells_per_gene: np.ndarray  # in the aligned gene space


class _Runner:
    """Runs the per-block work of both passes: in this process, in input order."""

    def map(self, fn: Callable, tasks: list[tuple], **kwargs) -> Iterator:
        """``fn(plan, a, b, **kwargs)`` for each task ``(plan, a, b)``, yielded in task order."""
        return (fn(*task, **kwargs) for task in tasks)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _PlanSpec:
    """What a dask worker needs to rebuild a :class:`_FilePlan` (an open file cannot travel)."""

    path: str
    config: IngestConfig
    gene_map: np.ndarray
    increasing: bool
    experiment: str | None  # the file's one experiment, or None: read config.experiment_key
    label: bool  # read config.label_key


_WORKER_SOURCES: dict[str, dict[str, _H5adSource]] = {}  # ingest call -> path -> opened input


def _worker_source(path: str, config: IngestConfig, call: str) -> _H5adSource:
    """One opened input per worker process and ingest call (its columns are read once)."""
    opened = _WORKER_SOURCES.setdefault(call, {})
    if path not in opened:
        opened[path] = _H5adSource(Path(path), config)
    return opened[path]


def _release_sources(call: str) -> None:
    """Close the inputs a worker opened for one ingest call (run on every worker at the end)."""
    for src in _WORKER_SOURCES.pop(call, {}).values():
        src.close()


def _run_remote(fn: Callable, spec: _PlanSpec, a: int, b: int, call: str, kwargs: dict):
    src = _worker_source(spec.path, spec.config, call)
    experiment = (src.obs_reader(spec.config.experiment_key) if spec.experiment is None
                  else (lambda name: lambda lo, hi: np.full(hi - lo, name, dtype=object))(spec.experiment))
    plan = _FilePlan(src, spec.gene_map, experiment, src.obs_reader(spec.config.label_key) if spec.label else None,
                     increasing=spec.increasing)
    return fn(plan, a, b, **kwargs)


class _DaskRunner(_Runner):
    """Runs the per-block work on a ``dask.distributed`` cluster; results come back in task order.

    Each worker opens the input files itself (they must be readable at the same paths). At most
    ``window`` blocks are in flight, so memory stays bounded whatever the number of blocks; the
    caller merges the results in order, which is why the store is byte-identical to a serial
    ingest.
    """

    def __init__(self, client, *, cluster=None) -> None:
        self.client, self.cluster = client, cluster
        self.call = uuid.uuid4().hex
        self.window = 2 * max(1, len(client.scheduler_info().get("workers", {})))

    def map(self, fn: Callable, tasks: list[tuple], **kwargs) -> Iterator:
        from collections import deque

        specs = {}
        for plan, _, _ in tasks:
            if id(plan) not in specs:
                specs[id(plan)] = self.client.scatter(_spec(plan, kwargs["config"]), broadcast=True)
        pending: deque = deque()
        todo = iter(tasks)
        for plan, a, b in itertools.islice(todo, self.window):
            pending.append(self.client.submit(_run_remote, fn, specs[id(plan)], a, b, self.call, kwargs, pure=False))
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                plan, a, b = nxt
                pending.append(self.client.submit(_run_remote, fn, specs[id(plan)], a, b, self.call, kwargs, pure=False))
            yield result

    def close(self) -> None:
        if self.cluster is None:  # a cluster of its own goes away with its files
            with contextlib.suppress(Exception):
                self.client.run(_release_sources, self.call)
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _spec(plan: _FilePlan, config: IngestConfig) -> _PlanSpec:
    return _PlanSpec(str(plan.source.path), config, plan.gene_map, plan.increasing, plan.experiment_name,
                     plan.label is not None)


def make_runner(workers: int | None = None, scheduler: str | None = None) -> _Runner:
    """Where ingest runs its per-block work: this process, a LocalCluster, or a cluster.

    Parameters
    ----------
    workers
        Worker processes of a ``dask.distributed.LocalCluster`` (one thread each).
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``); its workers must read the
        inputs at the same paths.

    Raises
    ------
    ConfigError
        If both or a worker count below 1 are given, or the scheduler cannot be reached.
    """
    if workers is not None and scheduler is not None:
        raise ConfigError("give --workers or --scheduler, not both")
    if workers is None and scheduler is None:
        return _Runner()
    from dask.distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return _DaskRunner(Client(scheduler, timeout=30))
        except OSError as exc:
            raise ConfigError(f"cannot reach the dask scheduler at {scheduler} ({exc})") from None
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return _DaskRunner(Client(cluster), cluster=cluster)


def _check_block(plan: _FilePlan, a: int, b: int, config: IngestConfig, n_out: int) -> _BlockCheck:
    """Read rows a:b of one input and check them (pass 1)."""
    src = plan.source
    block = src.read(a, b)
    _check_values(src, block, a, b)
    frac = block.data != np.floor(block.data) if block.data.dtype.kind == "f" else None
    keep = _cell_mask(block, config)
    exps = plan.experiment(a, b)[keep]
    if any(e is None for e in exps):
        raise InputError(f"{src.path}: obs column {config.experiment_key!r} has missing values")
    check = _BlockCheck(
        n_kept=int(keep.sum()), non_integer=int(frac.sum()) if frac is not None else 0,
        max_value=float(block.data.max()) if frac is not None and block.data.size else -np.inf,
        runs=[], experiment_cells={}, experiment_nonint={}, labels=[], unlabeled={},
        n_cells_per_gene=np.zeros(0, dtype=np.int64),
    )
    if len(exps):
        names = exps.astype(str)
        check.runs = [str(e) for e in names[np.r_[True, names[1:] != names[:-1]]]]
        uniq, counts = np.unique(names, return_counts=True)
        check.experiment_cells = {str(e): int(c) for e, c in zip(uniq, counts)}
        if frac is not None and frac.any():
            # non-integer values per experiment, so a mixed file is recorded per experiment
            # (e.g. one study of expected counts among UMI counts)
            rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
            per_row = np.bincount(rows[frac], minlength=block.shape[0])[keep]
            for e in np.unique(names[per_row > 0]):
                check.experiment_nonint[str(e)] = int(per_row[names == e].sum())
    if plan.label is not None:
        labs = plan.label(a, b)[keep]
        unlabeled = set(config.unlabeled_values)
        for lab in pd.unique(labs):
            if lab is None:
                continue
            if str(lab) in unlabeled:
                check.unlabeled[str(lab)] = check.unlabeled.get(str(lab), 0) + int((labs == lab).sum())
            else:
                check.labels.append(str(lab))
    kept = block if keep.all() else block[keep]
    cols = plan.gene_map[kept.indices[kept.data > 0]]
    check.n_cells_per_gene = np.bincount(cols[cols >= 0], minlength=n_out)
    return check


@dataclass
class _Census:
    """The quality-control pass over every input: block checks merged in input order."""

    n_cells_per_gene: np.ndarray
    experiments: dict[str, int] = field(default_factory=dict)  # kept cells, in order of appearance
    cell_types: dict[str, None] = field(default_factory=dict)
    experiment_nonint: dict[str, int] = field(default_factory=dict)
    unlabeled: dict[str, int] = field(default_factory=dict)
    grouped: bool = True  # each experiment's cells form one contiguous run over the inputs
    _current: str | None = None
    _finished: set = field(default_factory=set)

    def add(self, plan: _FilePlan, check: _BlockCheck) -> None:
        plan.non_integer += check.non_integer
        if plan.non_integer and check.max_value > _LOGNORM_MAX:
            plan.kind = "noninteger_counts"
        plan.n_kept += check.n_kept
        for e in check.runs:
            if e != self._current:
                if e in self._finished:
                    self.grouped = False
                if self._current is not None:
                    self._finished.add(self._current)
                self._current = e
            self.experiments.setdefault(e, 0)
        for e, c in check.experiment_cells.items():
            self.experiments[e] += c
            plan.experiments[e] = None
        for e, c in check.experiment_nonint.items():
            self.experiment_nonint[e] = self.experiment_nonint.get(e, 0) + c
        for lab, c in check.unlabeled.items():
            self.unlabeled[lab] = self.unlabeled.get(lab, 0) + c
        self.cell_types.update(dict.fromkeys(check.labels))
        self.n_cells_per_gene += check.n_cells_per_gene

    def finish_file(self, plan: _FilePlan, config: IngestConfig) -> None:
        if plan.non_integer and plan.kind == "counts":
            plan.kind = "lognorm"
        if plan.n_kept == 0:
            raise InputError(
                f"{plan.source.path}: no cell passes the filters (min_counts={config.min_counts}, "
                f"min_genes={config.min_genes})"
            )


def _check_pass(plans: list[_FilePlan], n_out: int, config: IngestConfig, runner: "_Runner") -> _Census:
    """Pass 1 over every input (quality control), its blocks run by ``runner``."""
    census = _Census(np.zeros(n_out, dtype=np.int64))
    tasks = [(plan, a, b) for plan in plans for a, b in plan.source.row_blocks()]
    with tqdm(total=len(tasks), desc="ingest 1/2 (check)", unit="block", disable=None) as bar:
        results = runner.map(_check_block, tasks, config=config, n_out=n_out)
        for i, ((plan, _, _), check) in enumerate(zip(tasks, results)):
            census.add(plan, check)
            if i + 1 == len(tasks) or tasks[i + 1][0] is not plan:
                census.finish_file(plan, config)
            bar.update(1)
    return census


def _input_kind(plans: list[_FilePlan], config: IngestConfig) -> str:
    """``"counts"`` or ``"lognorm"`` for the inputs together; refuses a mix, warns on odd values."""
    kinds = {p.kind for p in plans}
    if "lognorm" in kinds and len(kinds) > 1:
        bad = [p for p in plans if p.kind == "lognorm"]
        raise InputError(
            f"{bad[0].source.name}: holds log-normalised values while other inputs hold counts; "
            f"ingest raw counts ({_layer_hint(bad[0].source, config) or 'or pass --layer with the counts layer'})"
        )
    for p in plans:
        if p.kind == "lognorm":
            hint = _layer_hint(p.source, config)
            logger.warning("%s: values are not integers and look log-normalised; recorded as lognorm%s",
                           p.source.name, f" ({hint})" if hint else "")
        elif p.kind == "noninteger_counts":
            logger.warning("%s: %d non-integer counts (expected counts?); treated as counts", p.source.name, p.non_integer)
    return "lognorm" if kinds == {"lognorm"} else "counts"


def _filter_genes(plans: list[_FilePlan], genes: pd.Index, census: _Census,
                  config: IngestConfig) -> tuple[pd.Index, int]:
    """The genes kept by ``min_cells`` and their non-zeros; every plan's gene map is redirected onto them."""
    gene_keep = census.n_cells_per_gene >= max(config.min_cells, 1)
    if not gene_keep.any():
        raise InputError(f"no gene is expressed in at least {config.min_cells} cells (--min-cells)")
    new_index = np.cumsum(gene_keep) - 1
    for p in plans:
        mapped = p.gene_map.copy()
        ok = mapped >= 0
        mapped[ok] = np.where(gene_keep[mapped[ok]], new_index[mapped[ok]], -1)
        p.gene_map = mapped
        p.increasing = bool(np.all(np.diff(mapped[mapped >= 0]) > 0))
    return genes[gene_keep], int(census.n_cells_per_gene[gene_keep].sum())


@dataclass(frozen=True)
class _Codes:
    """Output codes of experiments and cell types, for pass 2."""

    experiments: dict[str, int]
    cell_types: dict[str, int]
    n_genes: int
    input_kind: str


@dataclass
class _WriteBlock:
    """One read block ready to append (pass 2): filtered, aligned rows and their obs columns."""

    keep: np.ndarray
    x: sp.csr_matrix | None  # None: no cell kept
    names: np.ndarray | None = None
    obs: dict[str, np.ndarray] | None = None
    moments: Any = None


def _prepare_block(plan: _FilePlan, a: int, b: int, config: IngestConfig, codes: _Codes) -> _WriteBlock:
    """Read rows a:b of one input and make them ready to append: filter, align, obs, moments."""
    src = plan.source
    raw = src.read(a, b)
    keep = _cell_mask(raw, config)
    block = _align_block(raw if keep.all() else raw[keep], plan, codes.n_genes)
    if block.shape[0] == 0:
        return _WriteBlock(keep, None)
    exps = plan.experiment(a, b)[keep]
    exp_codes = np.fromiter((codes.experiments[str(e)] for e in exps), np.int32, len(exps))
    if plan.label is not None:
        labs = plan.label(a, b)[keep]
        types = np.fromiter((codes.cell_types.get(str(v), -1) if v is not None else -1 for v in labs),
                            np.int32, len(labs))
    else:
        types = np.full(block.shape[0], -1, np.int32)
    obs = {
        "experiment": exp_codes,
        "cell_type": types,
        "n_counts": np.asarray(block.sum(axis=1), dtype=np.float64).ravel(),
        "n_genes": np.diff(block.indptr).astype(np.int32),
    }
    return _WriteBlock(keep, block, src.obs_names(a, b)[keep], obs,
                       block_moments(block, kind=codes.input_kind))


class _Spools:
    """Rows spooled per experiment (when the inputs interleave experiments), then replayed in order."""

    def __init__(self, directory: Path, *, n_genes: int, nnz_per_chunk: int, layout: StoreLayout) -> None:
        self.directory = directory
        self.sinks: dict[int, _RowSink] = {}
        self._args = {"n_genes": n_genes, "nnz_per_chunk": nnz_per_chunk,
                      "layout": StoreLayout(rows_per_chunk=layout.rows_per_chunk, compression_level=1)}

    def append(self, block: _WriteBlock) -> None:
        import zarr

        codes = block.obs["experiment"]
        for c in np.unique(codes):
            sel = codes == c
            if c not in self.sinks:
                group = zarr.open_group(self.directory / str(c), mode="w", zarr_format=3)
                self.sinks[c] = _RowSink(group, **self._args)
            self.sinks[c].append(block.x[sel], block.names[sel], {k: v[sel] for k, v in block.obs.items()})

    def replay(self, sink: "_RowSink", experiments: Iterable[int]) -> None:
        for c in experiments:
            self.sinks[c].close()
            _replay(self.sinks[c], sink, 8192)


def _write_pass(plans: list[_FilePlan], sink: _RowSink, count_sums: _CountSums, census: _Census,
                codes: _Codes, config: IngestConfig, runner: "_Runner", spool_dir: Path,
                nnz_per_chunk: int) -> tuple[Any, np.ndarray]:
    """Pass 2: rows, obs codes and count sums into ``sink``; returns the moments and row codes.

    The caller writes the categories (:meth:`_RowSink.finish_obs`) and the count sums.
    """
    spools = None
    if not census.grouped:
        logger.info("experiments are interleaved in the inputs; spooling per experiment")
        spools = _Spools(spool_dir, n_genes=codes.n_genes, nnz_per_chunk=nnz_per_chunk, layout=config.layout)
    moments = MomentAccumulator()
    written: list[np.ndarray] = []
    tasks = [(plan, a, b) for plan in plans for a, b in plan.source.row_blocks()]
    try:
        with tqdm(total=len(tasks), desc="ingest 2/2 (write)", unit="block", disable=None) as bar:
            for (plan, _, _), block in zip(tasks, runner.map(_prepare_block, tasks, config=config, codes=codes)):
                plan.keep.append(block.keep)
                if block.x is not None:
                    written.append(block.obs["experiment"])
                    moments.add(block.moments)
                    count_sums.add(block.x, block.obs["experiment"])
                    if spools is None:
                        sink.append(block.x, block.names, block.obs)
                    else:
                        spools.append(block)
                bar.update(1)
        if spools is not None:
            spools.replay(sink, range(count_sums.first, len(codes.experiments)))
    finally:
        if spools is not None:
            shutil.rmtree(spools.directory, ignore_errors=True)
    sink.close()
    return moments.result(), np.concatenate(written) if written else np.zeros(0, np.int32)


def _sources_record(plans: list[_FilePlan]) -> dict[str, np.ndarray]:
    return {
        "name": np.asarray([p.source.name for p in plans], dtype=object),
        "size": np.asarray([_size(p.source.path) for p in plans], dtype=np.int64),
        "sha256": np.asarray([_sha256(p.source.path) for p in plans], dtype=object),
        "kind": np.asarray([p.kind for p in plans], dtype=object),
    }


def _experiment_kinds(exp_names: list[str], census: _Census, input_kind: str) -> list[str]:
    kind = "lognorm" if input_kind == "lognorm" else "noninteger_counts"
    kinds = [kind if census.experiment_nonint.get(e) else "counts" for e in exp_names]
    if len(set(kinds)) > 1:
        logger.warning(
            "experiments hold different kinds of values: %s",
            ", ".join(f"{e} {k}" for e, k in zip(exp_names, kinds) if k != "counts"),
        )
    return kinds


def _ingest(sources: list[_H5adSource], output: Path, config: IngestConfig, overwrite: bool,
            runner: "_Runner") -> Path:
    plans, genes = _plan(sources, config)
    census = _check_pass(plans, len(genes), config, runner)
    input_kind = _input_kind(plans, config)
    out_genes, nnz_total = _filter_genes(plans, genes, census, config)
    if census.unlabeled:
        logger.info("%d cells with label values %s are unannotated (--unlabeled-values)",
                    sum(census.unlabeled.values()), ", ".join(f"{v!r} ({n})" for v, n in census.unlabeled.items()))
    exp_names = list(census.experiments)
    type_names = sorted(census.cell_types)
    codes = _Codes({e: i for i, e in enumerate(exp_names)}, {t: i for i, t in enumerate(type_names)},
                   len(out_genes), input_kind)
    n_total = sum(census.experiments.values())
    nnz_per_chunk = int(max(4096, round(config.layout.rows_per_chunk * nnz_total / max(n_total, 1))))
    logger.info(
        "%d cells (of %d), %d genes (of %d), %d experiments, %d cell types, %.0f non-zeros per cell",
        n_total, sum(p.source.shape[0] for p in plans), len(out_genes), len(genes),
        len(exp_names), len(type_names), nnz_total / max(n_total, 1),
    )
    with atomic_directory(output, overwrite=overwrite) as tmp:
        root = init_anndata_root(tmp, zarr_format=config.layout.zarr_format)
        sink = _RowSink(root, n_genes=codes.n_genes, nnz_per_chunk=nnz_per_chunk, layout=config.layout)
        count_sums = _CountSums(codes.n_genes, len(codes.experiments))
        stats, row_codes = _write_pass(plans, sink, count_sums, census, codes, config, runner,
                                       tmp.parent / f"{tmp.name}.spool", nnz_per_chunk)
        sink.finish_obs({"experiment": exp_names, "cell_type": type_names})
        count_sums.write(root)
        _write_extra_obs(root, plans, config, None if census.grouped else np.argsort(row_codes, kind="stable"))
        _write_var_and_uns(
            root, out_genes, stats, _sources_record(plans), exp_names, census.experiments, input_kind, config,
            experiment_kinds=_experiment_kinds(exp_names, census, input_kind),
            extra_var=_extra_var(plans, out_genes),
        )
        stamp_spec(root)
    logger.info("wrote %s", output)
    return output


def _write_var_and_uns(root, genes, stats, sources, exp_names, experiments, input_kind, config,
                       extra_uns=None, experiment_kinds=None, extra_var=None) -> None:
    from anndata.io import write_elem

    var = pd.DataFrame(
        {"n_cells": stats.n_cells.astype(np.int64), "mean": stats.mean, "std": stats.std},
        index=pd.Index(genes, name=None).astype(str),
    )
    if extra_var is not None and len(extra_var.columns):
        var = pd.concat([var, extra_var.set_axis(var.index)], axis=1)
    write_elem(root, "var", var)
    counts = np.array([experiments[e] for e in exp_names], dtype=np.int64)
    stops = np.cumsum(counts)
    ranges = np.stack([stops - counts, stops], axis=1)
    meta = {
        **spec_record(),
        "experiment_names": np.asarray(exp_names, dtype=object),
        "experiment_ranges": ranges,
        "input_kind": input_kind,
        "experiment_kinds": np.asarray(
            experiment_kinds if experiment_kinds is not None else [input_kind] * len(exp_names),
            dtype=object,
        ),
        "rows_per_chunk": int(config.layout.rows_per_chunk),
        "sources": sources,
        "preprocessing": {
            "target_sum": 1e4,
            "log1p": True,
            "max_value": 10.0,
            "min_counts": float(config.min_counts),
            "min_genes": int(config.min_genes),
            "min_cells": int(config.min_cells),
            "genes": config.genes,
            "experiment_key": config.experiment_key or "",
            "label_key": config.label_key or "",
            "gene_key": config.gene_key or "",
            "layer": config.layer or "",
        },
    }
    write_elem(root, "uns", {"mars_scale": meta, **(extra_uns or {})})


# ---------------------------------------------------------------------------------------------
# Streaming blocks that are already in memory (a generator, another reader)


@dataclass(frozen=True)
class CellBlock:
    """Consecutive cells of one experiment, as :func:`ingest_blocks` takes them.

    Attributes
    ----------
    counts
        Raw values, ``(n_rows, n_genes)``, CSR (other scipy sparse formats are converted).
    experiment
        Index of the cells' experiment in the ``experiments`` given to :func:`ingest_blocks`.
    cell_type
        Cell-type code of each row: an index into ``cell_types``, ``-1`` for unannotated.
    obs_names
        Cell ids.
    """

    counts: sp.spmatrix
    experiment: int
    cell_type: np.ndarray
    obs_names: np.ndarray


def ingest_blocks(
    blocks: Iterable[CellBlock],
    output: str | os.PathLike,
    *,
    genes: Sequence[str],
    experiments: Sequence[str],
    cell_types: Sequence[str],
    config: IngestConfig | None = None,
    input_kind: str = "counts",
    nnz_per_cell: float | None = None,
    n_cells: int | None = None,
    uns: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a new atlas store from a stream of cell blocks, in one pass.

    The store is the one :func:`ingest` writes from the same cells, except that no gene
    filter is applied (it would need a pass over every cell before the first write) and the
    ``sources`` record is empty. Memory is bounded by one block plus one write unit of the
    store, whatever the number of cells.

    Parameters
    ----------
    blocks
        The cells, grouped by experiment in the order of ``experiments``: the experiment index
        of successive blocks never decreases.
    output
        The store directory to create (``.zarr``).
    genes
        Gene ids, one per column of the blocks (unique).
    experiments
        Experiment names (unique); every experiment must receive at least one cell.
    cell_types
        Cell-type names (unique), the categories of ``obs['cell_type']``.
    config
        Cell filters (``min_counts``, ``min_genes``) and ``layout``. ``min_cells`` must be 0;
        the options about reading h5ad files are not used. Default:
        ``IngestConfig(min_cells=0)``.
    input_kind
        ``"counts"`` (values must be non-negative integers) or ``"lognorm"``.
    nnz_per_cell
        Expected non-zeros per cell, which sets the chunk length of ``X``. Default: the mean
        of the first block.
    n_cells
        Expected number of cells, for the progress bar only.
    uns
        Extra entries of ``uns`` (for example the parameters of a simulation).
    overwrite
        Replace an existing store.

    Returns
    -------
    Path
        The store. It holds ``X`` (raw values, CSR), ``obs['experiment']``,
        ``obs['cell_type']``, ``obs['n_counts']``, ``obs['n_genes']``, ``var['n_cells']``,
        ``var['mean']``, ``var['std']``, ``uns['mars_scale']`` and the entries of ``uns``.

    Raises
    ------
    ConfigError
        If ``config.min_cells`` is not 0 or ``input_kind`` is unknown.
    InputError
        If ``output`` exists and ``overwrite`` is false, a name list is empty or has
        duplicates, a block has the wrong number of columns, invalid values or codes, comes
        out of experiment order, or an experiment ends up without cells.
    """
    config = config or IngestConfig(min_cells=0)
    output = Path(output)
    _check_block_args(output, config, input_kind, genes, experiments, cell_types, uns, overwrite)
    gene_index = pd.Index([str(g) for g in genes])
    exp_names = [str(e) for e in experiments]
    type_names = [str(t) for t in cell_types]

    stream = iter(blocks)
    first = next(stream, None)
    if first is None:
        raise InputError(f"{output}: no cells given")
    if nnz_per_cell is None:
        nnz_per_cell = first.counts.nnz / max(first.counts.shape[0], 1)
    layout = config.layout
    nnz_per_chunk = int(max(4096, round(layout.rows_per_chunk * max(nnz_per_cell, 1.0))))
    started = time.perf_counter()
    with atomic_directory(output, overwrite=overwrite) as tmp:
        root = init_anndata_root(tmp, zarr_format=layout.zarr_format)
        sink = _RowSink(root, n_genes=len(gene_index), nnz_per_chunk=nnz_per_chunk, layout=layout)
        moments = MomentAccumulator()
        counts = _write_cell_blocks(itertools.chain([first], stream), sink, moments, output=output,
                                    exp_names=exp_names, n_types=len(type_names), config=config,
                                    input_kind=input_kind, n_cells=n_cells)
        sink.close()
        sink.finish_obs({"experiment": exp_names, "cell_type": type_names})
        sources = {
            "name": np.asarray([], dtype=object),
            "size": np.asarray([], dtype=np.int64),
            "sha256": np.asarray([], dtype=object),
            "kind": np.asarray([], dtype=object),
        }
        _write_var_and_uns(root, gene_index, moments.result(), sources, exp_names, counts,
                           input_kind, config, extra_uns=dict(uns or {}))
        stamp_spec(root)
    total = sum(counts.values())
    seconds = time.perf_counter() - started
    logger.info(
        "wrote %s: %d cells x %d genes, %d experiments, in %.1f s (%.0f cells/s)",
        output, total, len(gene_index), len(exp_names), seconds, total / max(seconds, 1e-9),
    )
    return output


def _check_block_args(output: Path, config: IngestConfig, input_kind: str, genes, experiments, cell_types,
                      uns, overwrite: bool) -> None:
    """The checks of :func:`ingest_blocks` that come before any block is read."""
    if config.min_cells != 0:
        raise ConfigError(
            f"ingest_blocks writes in one pass and cannot filter genes (min_cells="
            f"{config.min_cells}); pass an IngestConfig with min_cells=0"
        )
    if input_kind not in ("counts", "lognorm"):
        raise ConfigError(f"input_kind must be 'counts' or 'lognorm', got {input_kind!r}")
    names = {"genes": genes, "experiments": experiments, "cell_types": cell_types}
    for what, values in names.items():
        index = pd.Index([str(v) for v in values])
        if what != "cell_types" and len(index) == 0:
            raise InputError(f"{output}: no {what} given")
        if index.has_duplicates:
            raise InputError(f"{output}: duplicate {what} ({', '.join(index[index.duplicated()][:3])})")
    if uns and "mars_scale" in uns:
        raise InputError(f"{output}: uns['mars_scale'] is the store's own record; choose another key")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: already exists (pass --overwrite to replace it)")


def _write_cell_blocks(blocks: Iterable[CellBlock], sink: "_RowSink", moments: MomentAccumulator, *,
                       output: Path, exp_names: list[str], n_types: int, config: IngestConfig,
                       input_kind: str, n_cells: int | None) -> dict[str, int]:
    """Check, filter and append every block (:func:`ingest_blocks`); returns cells per experiment."""
    counts = dict.fromkeys(exp_names, 0)
    current = 0
    with tqdm(total=n_cells, desc="write store", unit="cells", disable=None) as bar:
        for block in blocks:
            e = int(block.experiment)
            if not 0 <= e < len(exp_names):
                raise InputError(f"{output}: block experiment index {e} is out of range")
            if e < current:
                raise InputError(
                    f"{output}: a block of experiment {exp_names[e]!r} comes after "
                    f"experiment {exp_names[current]!r}; blocks must be grouped by experiment, in order"
                )
            current = e
            x, codes, obs_names = _checked_block(block, output, sink.x.n_cols, n_types, input_kind)
            keep = _cell_mask(x, config)
            if not keep.all():
                x, codes, obs_names = x[keep], codes[keep], obs_names[keep]
            if x.shape[0]:
                obs = {
                    "experiment": np.full(x.shape[0], e, dtype=np.int32),
                    "cell_type": codes,
                    "n_counts": np.asarray(x.sum(axis=1), dtype=np.float64).ravel(),
                    "n_genes": np.diff(x.indptr).astype(np.int32),
                }
                moments.add(block_moments(x, kind=input_kind))
                sink.append(x, obs_names, obs)
                counts[exp_names[e]] += x.shape[0]
            bar.update(block.counts.shape[0])
    empty = [name for name, n in counts.items() if n == 0]
    if empty:
        raise InputError(
            f"{output}: experiment {empty[0]!r} has no cells passing the filters "
            f"(min_counts={config.min_counts}, min_genes={config.min_genes})"
        )
    return counts


def _checked_block(
    block: CellBlock, output: Path, n_genes: int, n_types: int, input_kind: str
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The block as canonical float32 CSR, with its codes and names, after checking values."""
    x = block.counts
    n = x.shape[0]
    if x.shape[1] != n_genes:
        raise InputError(f"{output}: a block has {x.shape[1]} columns, expected {n_genes} (one per gene)")
    codes = np.asarray(block.cell_type)
    obs_names = np.asarray(block.obs_names, dtype=object)
    if codes.shape != (n,) or obs_names.shape != (n,):
        raise InputError(
            f"{output}: a block of {n} cells has {codes.shape} cell-type codes and "
            f"{obs_names.shape} names"
        )
    if codes.dtype.kind not in "iu" or (n and (codes.min() < -1 or codes.max() >= n_types)):
        raise InputError(f"{output}: cell-type codes must be integers in -1..{n_types - 1}")
    data = x.data
    if data.dtype.kind not in "fiub":
        raise InputError(f"{output}: values have non-numeric dtype {data.dtype}")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        raise InputError(f"{output}: a block contains NaN or infinite values")
    if data.size and data.min() < 0:
        raise InputError(f"{output}: a block contains negative values; raw counts expected")
    if data.size and data.max() > _FLOAT32_EXACT:
        raise InputError(
            f"{output}: a block holds values above 2^24, which the store's float32 cannot hold exactly"
        )
    if input_kind == "counts" and data.dtype.kind == "f" and (data != np.floor(data)).any():
        raise InputError(
            f"{output}: a block holds non-integer values; pass input_kind='lognorm' if they are "
            "log-normalised"
        )
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)  # never modify the caller's arrays
    x.eliminate_zeros()
    x.sum_duplicates()  # also sorts the indices
    return x, codes.astype(np.int32), obs_names
