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

import hashlib
import itertools
import logging
import os
import shutil
import time
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

__all__ = ["CellBlock", "IngestConfig", "ingest", "ingest_blocks", "UNLABELED_VALUES"]

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
            raise ValueError(f"genes must be 'intersection' or 'union', got {self.genes!r}")
        for name in ("min_counts", "min_genes", "min_cells"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# ---------------------------------------------------------------------------------------------
# Reading one h5ad file with h5py


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
                raise InputError(
                    f"{where} holds a value that is not valid UTF-8 ({v[:40]!r}); "
                    "re-encode the names as UTF-8"
                ) from None
        out[i] = v
    return out


def _is_array(elem) -> bool:
    import zarr

    return isinstance(elem, (h5py.Dataset, zarr.Array))


def _is_group(elem) -> bool:
    import zarr

    return isinstance(elem, (h5py.Group, zarr.Group))


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
    enc = group.attrs.get("encoding-type")
    if enc != "anndata" and not ("obs" in group and "var" in group):
        raise InputError(f"{path}: is a zarr store but not an AnnData one (no obs and var); "
                         "expected an .h5ad file or an AnnData .zarr")
    return _ZarrFile(group)


class _H5adSource:
    """Row-block access to one h5ad file or AnnData ``.zarr`` store, validated up front."""

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
        x = f[xkey]
        if _is_array(x):
            if x.ndim != 2:
                raise InputError(f"{self.path}: {xkey} is not a matrix (shape {x.shape})")
            self.kind, self.shape = "dense", tuple(int(s) for s in x.shape)
        else:
            enc = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if enc.startswith("csr"):
                self.kind = "csr"
            elif enc.startswith("csc"):
                self.kind = "csc"
            else:
                raise InputError(f"{self.path}: {xkey} has unsupported encoding {enc!r}")
            self.shape = tuple(int(s) for s in x.attrs["shape"])
            for part in ("data", "indices", "indptr"):
                if part not in x:
                    raise InputError(f"{self.path}: {xkey}/{part} is missing")
        self.x = x
        dtype = x.dtype if _is_array(x) else x["data"].dtype
        if dtype.kind not in "biuf":
            raise InputError(f"{self.path}: {xkey} has non-numeric dtype {dtype} (numbers expected)")
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
            major = 0 if self.kind == "csr" else 1
            if x["indptr"].shape[0] != self.shape[major] + 1:
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
            genes = _decode(f["var"][self.var_names_key][:], f"{self.path}: var/{self.var_names_key}")
        self.genes = pd.Index([str(g) for g in genes])
        dup = self.genes[self.genes.duplicated()]
        if len(dup):
            raise InputError(
                f"{self.path}: duplicate gene names ({', '.join(map(str, dup[:3]))}"
                f"{'...' if len(dup) > 3 else ''}); make them unique or pass --gene-key"
            )
        self._csc = None

    def _index_key(self, group: str) -> str:
        key = self.file[group].attrs.get("_index", "_index")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.file[group]:
            raise InputError(f"{self.path}: {group} has no index ({key!r})")
        return key

    def has_column(self, name: str) -> bool:
        return name in self.obs_columns

    def _column(self, group: str, name: str) -> Callable[[int, int], np.ndarray]:
        """A reader of rows a:b of a column as an object array (None = missing)."""
        elem = self.file[group][name]
        enc = elem.attrs.get("encoding-type", "")
        enc = enc.decode() if isinstance(enc, bytes) else str(enc)
        if _is_group(elem) and enc == "categorical":
            categories = _decode(elem["categories"][:], f"{self.path}: {group}/{name}/categories")
            cats = np.array(list(categories) + [None], dtype=object)
            codes = elem["codes"]
            return lambda a, b: cats[np.where(codes[a:b] < 0, len(categories), codes[a:b])]
        if _is_group(elem) and enc.startswith("nullable"):
            values, mask = elem["values"], elem["mask"]

            def read_nullable(a: int, b: int) -> np.ndarray:
                out = _decode(values[a:b], f"{self.path}: {group}/{name}").astype(object)
                out[mask[a:b]] = None
                return out

            return read_nullable
        if _is_array(elem):
            if elem.dtype.kind not in "biufSOUT":
                raise InputError(f"{self.path}: {group}/{name} has unsupported dtype {elem.dtype}")

            def read_plain(a: int, b: int) -> np.ndarray:
                out = _decode(elem[a:b], f"{self.path}: {group}/{name}").astype(object)
                if elem.dtype.kind == "f":
                    out[np.isnan(elem[a:b])] = None
                return out

            return read_plain
        raise InputError(f"{self.path}: {group}/{name} has unsupported encoding {enc!r}")

    def obs_reader(self, name: str) -> Callable[[int, int], np.ndarray]:
        return self._column("obs", name)

    def obs_names(self, a: int, b: int) -> np.ndarray:
        return _decode(self.file["obs"][self.obs_names_key][a:b], f"{self.path}: obs/{self.obs_names_key}")

    def row_blocks(self) -> list[tuple[int, int]]:
        n, g = self.shape
        if self.kind == "dense":
            step = max(1, _READ_NNZ // max(g, 1))
            return [(a, min(a + step, n)) for a in range(0, n, step)]
        if self.kind == "csc":
            step = 8192
            return [(a, min(a + step, n)) for a in range(0, n, step)]
        indptr = self.x["indptr"]
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
        g = self.shape[1]
        try:
            if self.kind == "dense":
                return sp.csr_matrix(np.asarray(self.x[a:b]))
            if self.kind == "csr":
                ptr = self.x["indptr"][a : b + 1].astype(np.int64)
                lo, hi = int(ptr[0]), int(ptr[-1])
                data = self.x["data"][lo:hi]
                indices = self.x["indices"][lo:hi]
                return sp.csr_matrix((data, indices, ptr - lo), shape=(b - a, g))
            if self._csc is None:
                nnz = int(self.x["data"].shape[0])
                if nnz * 12 > 2 * 1024**3:
                    raise InputError(
                        f"{self.path}: CSC X with {nnz} non-zeros is too large to convert in "
                        "memory; write it as CSR (adata.X = adata.X.tocsr())"
                    )
                self._csc = sp.csc_matrix(
                    (self.x["data"][:], self.x["indices"][:], self.x["indptr"][:]), shape=self.shape
                ).tocsr()
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

    def finish_obs(self, categories: dict[str, list[str]]) -> None:
        for name in _CATEGORICAL:
            encode_categorical(self.obs[name], categories[name])
        for name in _NUMERIC:
            encode_array(self.columns[name].array)
        encode_dataframe(self.obs, [*_CATEGORICAL, *_NUMERIC])


class _CountSums:
    """Per gene and experiment: sum and sum of squares of the raw values (float64).

    Written to ``varm['mars_counts_sum']`` and ``varm['mars_counts_sumsq']`` (genes x
    experiments, in store order), they give :func:`mars_scale.stats.highly_variable_genes` each
    experiment's gene means and variances without a pass over X.
    """

    def __init__(self, n_genes: int, n_experiments: int) -> None:
        self.s1 = np.zeros((n_experiments, n_genes))
        self.s2 = np.zeros((n_experiments, n_genes))

    def add(self, block: sp.csr_matrix, codes: np.ndarray) -> None:
        rows = np.repeat(codes.astype(np.int64), np.diff(block.indptr))
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
    masks = [np.concatenate(p.keep) if p.keep else np.zeros(0, bool) for p in plans]
    written = []
    for col, out in names.items():
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
                parts = []
                break
            parts.append(pd.Series(values)[mask].reset_index(drop=True))
        if not parts:
            continue
        column = _concat_columns(parts, [int(m.sum()) for m in masks])
        if order is not None:
            column = column.iloc[order].reset_index(drop=True)
        write_elem(root["obs"], out, _anndata_column(column))
        written.append(out)
    renamed = [f"{c} as {o}" for c, o in names.items() if c != o]
    if renamed:
        logger.info("obs columns renamed (their names are the store's own): %s", ", ".join(renamed))
    order_attr = [str(c) for c in root["obs"].attrs["column-order"]]
    root["obs"].attrs["column-order"] = [*order_attr, *written]


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
    try:
        for p in paths:
            sources.append(_H5adSource(p, config))
        return _ingest(sources, output, config, overwrite)
    finally:
        for s in sources:
            s.close()


def _plan(sources: list[_H5adSource], config: IngestConfig) -> tuple[list[_FilePlan], pd.Index]:
    genes = _align_genes(sources, config.genes)
    gene_pos = pd.Index(genes)
    plans = []
    if config.label_key and not any(s.has_column(config.label_key) for s in sources):
        raise InputError(
            f"{sources[0].path}: obs column {config.label_key!r} does not exist "
            f"(available: {', '.join(sources[0].obs_columns) or 'none'})"
        )
    stems = [s.path.stem for s in sources]
    for src, stem in zip(sources, stems):
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
        plans.append(_FilePlan(src, gene_pos.get_indexer(src.genes).astype(np.int64), experiment, label))
    return plans, genes


def _ingest(sources: list[_H5adSource], output: Path, config: IngestConfig, overwrite: bool) -> Path:
    plans, genes = _plan(sources, config)
    n_out = len(genes)

    # ---- pass 1: quality control --------------------------------------------------------
    n_cells_per_gene = np.zeros(n_out, dtype=np.int64)
    experiments: dict[str, int] = {}
    cell_types: dict[str, None] = {}
    finished: set[str] = set()
    experiment_nonint: dict[str, int] = {}
    unlabeled = set(config.unlabeled_values)
    unlabeled_seen: dict[str, int] = {}
    current: str | None = None
    grouped = True
    total_blocks = sum(len(p.source.row_blocks()) for p in plans)
    with tqdm(total=total_blocks, desc="ingest 1/2 (check)", unit="block", disable=None) as bar:
        for plan in plans:
            src = plan.source
            for a, b in src.row_blocks():
                block = src.read(a, b)
                _check_values(src, block, a, b)
                frac = None
                if block.data.dtype.kind == "f":
                    frac = block.data != np.floor(block.data)
                    plan.non_integer += int(frac.sum())
                    if plan.non_integer and block.data.size and block.data.max() > _LOGNORM_MAX:
                        plan.kind = "noninteger_counts"
                keep = _cell_mask(block, config)
                plan.n_kept += int(keep.sum())
                exps = plan.experiment(a, b)[keep]
                for e in exps:
                    if e is None:
                        raise InputError(
                            f"{src.path}: obs column {config.experiment_key!r} has missing values"
                        )
                # Track whether each experiment's rows form one contiguous run.
                if len(exps):
                    runs = exps[np.r_[True, exps[1:] != exps[:-1]]]
                    for e in runs:
                        e = str(e)
                        if e != current:
                            if e in finished:
                                grouped = False
                            if current is not None:
                                finished.add(current)
                            current = e
                        experiments[e] = experiments.get(e, 0)
                    uniq, counts = np.unique(exps.astype(str), return_counts=True)
                    for e, c in zip(uniq, counts):
                        experiments[str(e)] += int(c)
                    if frac is not None and frac.any():
                        # non-integer values per experiment, so a mixed file is recorded per
                        # experiment (e.g. one study of expected counts among UMI counts)
                        rows = np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
                        per_row = np.bincount(rows[frac], minlength=block.shape[0])[keep]
                        for e in np.unique(exps[per_row > 0].astype(str)):
                            experiment_nonint[str(e)] = experiment_nonint.get(str(e), 0) + int(
                                per_row[exps.astype(str) == e].sum())
                if plan.label is not None:
                    labs = plan.label(a, b)[keep]
                    for lab in pd.unique(labs):
                        if lab is None:
                            continue
                        if str(lab) in unlabeled:
                            unlabeled_seen[str(lab)] = unlabeled_seen.get(str(lab), 0) + int((labs == lab).sum())
                        else:
                            cell_types[str(lab)] = None
                kept = block if keep.all() else block[keep]
                cols = plan.gene_map[kept.indices[kept.data > 0]]
                n_cells_per_gene += np.bincount(cols[cols >= 0], minlength=n_out)
                bar.update(1)
            if plan.non_integer and plan.kind == "counts":
                plan.kind = "lognorm"
            if plan.n_kept == 0:
                raise InputError(
                    f"{src.path}: no cell passes the filters (min_counts={config.min_counts}, "
                    f"min_genes={config.min_genes})"
                )
    kinds = {p.kind for p in plans}
    if "lognorm" in kinds and len(kinds) > 1:
        bad = [p for p in plans if p.kind == "lognorm"]
        raise InputError(
            f"{bad[0].source.name}: holds log-normalised values while other inputs hold counts; "
            f"ingest raw counts ({_layer_hint(bad[0].source, config) or 'or pass --layer with the counts layer'})"
        )
    input_kind = "lognorm" if kinds == {"lognorm"} else "counts"
    for p in plans:
        if p.kind == "lognorm":
            hint = _layer_hint(p.source, config)
            logger.warning("%s: values are not integers and look log-normalised; recorded as lognorm%s",
                           p.source.name, f" ({hint})" if hint else "")
        elif p.kind == "noninteger_counts":
            logger.warning("%s: %d non-integer counts (expected counts?); treated as counts", p.source.name, p.non_integer)

    gene_keep = n_cells_per_gene >= max(config.min_cells, 1)
    if not gene_keep.any():
        raise InputError(f"no gene is expressed in at least {config.min_cells} cells (--min-cells)")
    new_index = np.cumsum(gene_keep) - 1
    out_genes = genes[gene_keep]
    for p in plans:
        mapped = p.gene_map.copy()
        ok = mapped >= 0
        mapped[ok] = np.where(gene_keep[mapped[ok]], new_index[mapped[ok]], -1)
        p.gene_map = mapped
        p.increasing = bool(np.all(np.diff(mapped[mapped >= 0]) > 0))
    if unlabeled_seen:
        logger.info("%d cells with label values %s are unannotated (--unlabeled-values)",
                    sum(unlabeled_seen.values()), ", ".join(f"{v!r} ({n})" for v, n in unlabeled_seen.items()))
    exp_names = list(experiments)
    exp_code = {e: i for i, e in enumerate(exp_names)}
    type_names = sorted(cell_types)
    type_code = {t: i for i, t in enumerate(type_names)}
    n_total = sum(experiments.values())
    nnz_total = int(n_cells_per_gene[gene_keep].sum())
    layout = config.layout
    nnz_per_chunk = int(max(4096, round(layout.rows_per_chunk * nnz_total / max(n_total, 1))))
    logger.info(
        "%d cells (of %d), %d genes (of %d), %d experiments, %d cell types, %.0f non-zeros per cell",
        n_total, sum(p.source.shape[0] for p in plans), len(out_genes), n_out,
        len(exp_names), len(type_names), nnz_total / max(n_total, 1),
    )

    # ---- pass 2: write --------------------------------------------------------------------
    import zarr

    with atomic_directory(output, overwrite=overwrite) as tmp:
        root = init_anndata_root(tmp, zarr_format=layout.zarr_format)
        sink = _RowSink(root, n_genes=len(out_genes), nnz_per_chunk=nnz_per_chunk, layout=layout)
        spool_dir = tmp.parent / f"{tmp.name}.spool"
        spools: dict[int, tuple] = {}
        if not grouped:
            logger.info("experiments are interleaved in the inputs; spooling per experiment")
        moments = MomentAccumulator()
        count_sums = _CountSums(len(out_genes), len(exp_names))
        written_codes: list[np.ndarray] = []
        try:
            with tqdm(total=total_blocks, desc="ingest 2/2 (write)", unit="block", disable=None) as bar:
                for plan in plans:
                    src = plan.source
                    for a, b in src.row_blocks():
                        raw = src.read(a, b)
                        keep = _cell_mask(raw, config)
                        plan.keep.append(keep)
                        block = _align_block(raw if keep.all() else raw[keep], plan, len(out_genes))
                        if block.shape[0] == 0:
                            bar.update(1)
                            continue
                        exps = plan.experiment(a, b)[keep]
                        codes = np.fromiter((exp_code[str(e)] for e in exps), np.int32, len(exps))
                        written_codes.append(codes)
                        if plan.label is not None:
                            labs = plan.label(a, b)[keep]
                            lcodes = np.fromiter(
                                (type_code.get(str(l), -1) if l is not None else -1 for l in labs),
                                np.int32, len(labs),
                            )
                        else:
                            lcodes = np.full(block.shape[0], -1, np.int32)
                        obs = {
                            "experiment": codes,
                            "cell_type": lcodes,
                            "n_counts": np.asarray(block.sum(axis=1), dtype=np.float64).ravel(),
                            "n_genes": np.diff(block.indptr).astype(np.int32),
                        }
                        moments.add(block_moments(block, kind=input_kind))
                        count_sums.add(block, codes)
                        names = src.obs_names(a, b)[keep]
                        if grouped:
                            sink.append(block, names, obs)
                        else:
                            for c in np.unique(codes):
                                sel = codes == c
                                if c not in spools:
                                    g = zarr.open_group(spool_dir / str(c), mode="w", zarr_format=3)
                                    spools[c] = (g, _RowSink(g, n_genes=len(out_genes), nnz_per_chunk=nnz_per_chunk, layout=StoreLayout(rows_per_chunk=layout.rows_per_chunk, compression_level=1)))
                                spools[c][1].append(block[sel], names[sel], {k: v[sel] for k, v in obs.items()})
                        bar.update(1)
            if not grouped:
                for c in range(len(exp_names)):
                    spool = spools[c][1]
                    spool.close()
                    _replay(spool, sink, 8192)
        finally:
            shutil.rmtree(spool_dir, ignore_errors=True)
        sink.close()
        sink.finish_obs({"experiment": exp_names, "cell_type": type_names})
        codes = np.concatenate(written_codes) if written_codes else np.zeros(0, np.int32)
        _write_extra_obs(root, plans, config, None if grouped else np.argsort(codes, kind="stable"))
        count_sums.write(root)
        stats = moments.result()
        sources = {
            "name": np.asarray([p.source.name for p in plans], dtype=object),
            "size": np.asarray([_size(p.source.path) for p in plans], dtype=np.int64),
            "sha256": np.asarray([_sha256(p.source.path) for p in plans], dtype=object),
            "kind": np.asarray([p.kind for p in plans], dtype=object),
        }
        kind = "lognorm" if input_kind == "lognorm" else "noninteger_counts"
        experiment_kinds = [kind if experiment_nonint.get(e) else "counts" for e in exp_names]
        mixed = sorted({k for k in experiment_kinds})
        if len(mixed) > 1:
            logger.warning(
                "experiments hold different kinds of values: %s",
                ", ".join(f"{e} {k}" for e, k in zip(exp_names, experiment_kinds) if k != "counts"),
            )
        _write_var_and_uns(
            root, out_genes, stats, sources, exp_names, experiments, input_kind, config,
            experiment_kinds=experiment_kinds, extra_var=_extra_var(plans, out_genes),
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
    gene_index = pd.Index([str(g) for g in genes])
    exp_names = [str(e) for e in experiments]
    type_names = [str(t) for t in cell_types]
    n_genes = len(gene_index)

    stream = iter(blocks)
    first = next(stream, None)
    if first is None:
        raise InputError(f"{output}: no cells given")
    if nnz_per_cell is None:
        nnz_per_cell = first.counts.nnz / max(first.counts.shape[0], 1)
    layout = config.layout
    nnz_per_chunk = int(max(4096, round(layout.rows_per_chunk * max(nnz_per_cell, 1.0))))
    counts = dict.fromkeys(exp_names, 0)
    started = time.perf_counter()
    current = 0
    with atomic_directory(output, overwrite=overwrite) as tmp:
        root = init_anndata_root(tmp, zarr_format=layout.zarr_format)
        sink = _RowSink(root, n_genes=n_genes, nnz_per_chunk=nnz_per_chunk, layout=layout)
        moments = MomentAccumulator()
        with tqdm(total=n_cells, desc="write store", unit="cells", disable=None) as bar:
            for block in itertools.chain([first], stream):
                e = int(block.experiment)
                if not 0 <= e < len(exp_names):
                    raise InputError(f"{output}: block experiment index {e} is out of range")
                if e < current:
                    raise InputError(
                        f"{output}: a block of experiment {exp_names[e]!r} comes after "
                        f"experiment {exp_names[current]!r}; blocks must be grouped by experiment, in order"
                    )
                current = e
                x, codes, obs_names = _checked_block(block, output, n_genes, len(type_names), input_kind)
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
        output, total, n_genes, len(exp_names), seconds, total / max(seconds, 1e-9),
    )
    return output


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
