"""A corpus of malformed inputs and damaged stores, generated on demand (nothing is downloaded).

Each builder takes a directory and returns the path it wrote. :data:`BAD_H5AD` maps a case name
to ``(builder, extra ingest arguments, fragments the one-line error must contain)``;
:data:`DAMAGED_STORES` maps a case name to ``(damage function, command, fragments)``, where the
damage function takes a fresh copy of a good store. ``tests/test_reliability.py`` runs them all
through the CLI, and ``docs/reliability.md`` counts them.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import zarr

from conftest import make_adata

# ---------------------------------------------------------------------------------------------
# h5ad inputs


def write(path: Path, adata) -> Path:
    adata.write_h5ad(path)
    return path


def _good(directory: Path, name: str = "good.h5ad", **kwargs) -> Path:
    return write(directory / name, make_adata(60, 30, **kwargs))


def truncated(directory: Path) -> Path:
    """The first half of a valid h5ad file (an interrupted copy)."""
    src = _good(directory, "full.h5ad")
    data = src.read_bytes()
    path = directory / "truncated.h5ad"
    path.write_bytes(data[: len(data) // 2])
    src.unlink()
    return path


def _replace_dataset(path: Path, key: str, values, dtype=None) -> None:
    """Swap one dataset for another of a different type, keeping its attributes."""
    with h5py.File(path, "r+") as f:
        attrs = dict(f[key].attrs)
        del f[key]
        ds = f.create_dataset(key, data=values, dtype=dtype)
        ds.attrs.update(attrs)


def shape_vs_obs(directory: Path) -> Path:
    """CSR X whose recorded shape has one row fewer than obs."""
    path = _good(directory, "shape_obs.h5ad")
    with h5py.File(path, "r+") as f:
        f["X"].attrs["shape"] = np.array([59, 30])
    return path


def shape_vs_var(directory: Path) -> Path:
    """Dense X with one column more than var."""
    path = _good(directory, "shape_var.h5ad")
    a = make_adata(60, 30)
    _replace_dataset(path, "X", np.hstack([a.X.toarray(), np.ones((60, 1), np.float32)]))
    return path


def indptr_short(directory: Path) -> Path:
    """CSR X whose indptr lost its last entry."""
    path = _good(directory, "indptr.h5ad")
    with h5py.File(path, "r+") as f:
        ptr = f["X/indptr"][:-1]
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=ptr)
    return path


def string_x(directory: Path) -> Path:
    """Dense X of byte strings ("1", "0", ...), as a CSV converted without care."""
    path = _good(directory, "string_x.h5ad")
    a = make_adata(60, 30)
    _replace_dataset(path, "X", a.X.toarray().astype(int).astype("S8"))
    return path


def string_x_sparse(directory: Path) -> Path:
    """CSR X whose data array holds byte strings."""
    path = _good(directory, "string_data.h5ad")
    with h5py.File(path, "r+") as f:
        values = f["X/data"][:].astype(int).astype("S8")
    _replace_dataset(path, "X/data", values)
    return path


def complex_x(directory: Path) -> Path:
    path = _good(directory, "complex_x.h5ad")
    with h5py.File(path, "r+") as f:
        values = f["X/data"][:].astype(np.complex64)
    _replace_dataset(path, "X/data", values)
    return path


def _non_utf8(path: Path, key: str, position: int = 2) -> Path:
    with h5py.File(path, "r") as f:
        values = [v.encode() for v in f[key].asstr()[:]]
    values[position] = b"gen\xff\xfe"  # not UTF-8 (Latin-1 / UTF-16 residue)
    _replace_dataset(path, key, np.array(values, dtype=object), dtype=h5py.string_dtype("utf-8"))
    return path


def non_utf8_genes(directory: Path) -> Path:
    return _non_utf8(_good(directory, "genes_latin1.h5ad"), "var/_index")


def non_utf8_cells(directory: Path) -> Path:
    return _non_utf8(_good(directory, "cells_latin1.h5ad"), "obs/_index")


def non_utf8_labels(directory: Path) -> Path:
    return _non_utf8(_good(directory, "labels_latin1.h5ad"), "obs/cell_type/categories", 1)


def _big_value(directory: Path, dtype, name: str) -> Path:
    a = make_adata(60, 30)
    x = a.X.toarray().astype(np.float64)
    x[7, 3] = 2**24 + 1  # float32 would store 16777216
    a.X = sp.csr_matrix(x.astype(dtype))
    return write(directory / name, a)


def above_2_24_float(directory: Path) -> Path:
    return _big_value(directory, np.float64, "big_float.h5ad")


def above_2_24_int(directory: Path) -> Path:
    return _big_value(directory, np.int64, "big_int.h5ad")


def all_zero_file(directory: Path) -> Path:
    """Every cell is empty: nothing passes the cell filter."""
    a = make_adata(60, 30)
    a.X = sp.csr_matrix((60, 30), dtype=np.float32)
    return write(directory / "zeros.h5ad", a)


def no_gene_passes(directory: Path) -> Path:
    """Each gene is expressed in one cell only, below --min-cells 5."""
    a = make_adata(30, 30)
    a.X = sp.csr_matrix(np.eye(30, dtype=np.float32) * 3)
    return write(directory / "sparse_genes.h5ad", a)


def missing_experiment(directory: Path) -> Path:
    """The experiment column has missing values."""
    a = make_adata(60, 30)
    exp = a.obs["experiment"].astype(object)
    exp.iloc[4] = np.nan
    a.obs["experiment"] = pd.Categorical(exp)
    return write(directory / "exp_missing.h5ad", a)


class Payload:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def pickled_column(directory: Path, marker: Path, *, protocol: int, opaque: bool = False) -> Path:
    """An obs column ``payload`` whose entries are pickles that would create ``marker``.

    ``opaque``: an HDF5 opaque (``np.void``) dataset instead of variable-length strings.
    """
    path = _good(directory, f"pickle_p{protocol}{'_opaque' if opaque else ''}.h5ad")
    blob = pickle.dumps(Payload(marker), protocol=protocol)
    with h5py.File(path, "r+") as f:
        if opaque:
            values = np.array([np.void(blob)] * 60)
        elif b"\0" in blob:  # fixed-length bytes (variable-length strings cannot hold NUL)
            values = np.array([blob] * 60, dtype=f"S{len(blob)}")
        else:
            values = np.array([blob] * 60, dtype=object)
        ds = f["obs"].create_dataset("payload", data=values, dtype=None if opaque or values.dtype.kind == "S"
                                     else h5py.string_dtype("utf-8"))
        ds.attrs["encoding-type"] = "string-array"
        ds.attrs["encoding-version"] = "0.2.0"
        order = [c.decode() if isinstance(c, bytes) else str(c) for c in f["obs"].attrs["column-order"]]
        f["obs"].attrs["column-order"] = np.array(order + ["payload"], dtype=object)
    return path


def opaque_column(directory: Path) -> Path:
    return pickled_column(directory, directory / "never", protocol=2, opaque=True)


#: name -> (builder, extra ingest arguments, fragments of the expected one-line error)
BAD_H5AD: dict[str, tuple[Callable[[Path], Path], list[str], list[str]]] = {
    "truncated file": (truncated, [], ["truncated.h5ad", "not a readable HDF5"]),
    "X rows != obs": (shape_vs_obs, [], ["shape_obs.h5ad", "(59, 30)", "60 x 30"]),
    "X columns != var": (shape_vs_var, [], ["shape_var.h5ad", "(60, 31)", "60 x 30"]),
    "indptr too short": (indptr_short, [], ["indptr.h5ad", "indptr length"]),
    "string X (dense)": (string_x, [], ["string_x.h5ad", "non-numeric dtype |S8"]),
    "string X (sparse)": (string_x_sparse, [], ["string_data.h5ad", "non-numeric dtype |S8"]),
    "complex X": (complex_x, [], ["complex_x.h5ad", "non-numeric dtype complex64"]),
    "non-UTF-8 gene names": (non_utf8_genes, [], ["genes_latin1.h5ad", "var/_index", "not valid UTF-8"]),
    "non-UTF-8 cell names": (non_utf8_cells, [], ["cells_latin1.h5ad", "obs/_index", "not valid UTF-8"]),
    "non-UTF-8 cell types": (
        non_utf8_labels, ["--label-key", "cell_type"],
        ["labels_latin1.h5ad", "obs/cell_type/categories", "not valid UTF-8"],
    ),
    "count above 2^24 (float64)": (above_2_24_float, [], ["big_float.h5ad", "16777217", "row 7", "2^24"]),
    "count above 2^24 (int64)": (above_2_24_int, [], ["big_int.h5ad", "16777217", "row 7", "float32"]),
    "all cells empty": (all_zero_file, [], ["zeros.h5ad", "no cell passes the filters"]),
    "no gene in 5 cells": (no_gene_passes, [], ["no gene is expressed in at least 5 cells"]),
    "experiment missing": (
        missing_experiment, ["--experiment-key", "experiment"],
        ["exp_missing.h5ad", "'experiment' has missing values"],
    ),
    "opaque obs column": (opaque_column, ["--label-key", "payload"], ["obs/payload", "unsupported dtype"]),
}


# ---------------------------------------------------------------------------------------------
# damaged stores

_META = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}


def chunk_files(store: Path, element: str) -> list[Path]:
    """The chunk (or shard) files of one array, in key order."""
    base = store / element
    return sorted(p for p in base.rglob("*") if p.is_file() and p.name not in _META)


def _middle_chunk(store: Path, element: str) -> Path:
    files = chunk_files(store, element)
    assert len(files) >= 3, f"{element} has only {len(files)} chunk files"
    return files[len(files) // 2]


def delete_chunk(element: str) -> Callable[[Path], None]:
    return lambda store: _middle_chunk(store, element).unlink()


def garble_chunk(element: str) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        victim = _middle_chunk(store, element)
        victim.write_bytes(np.random.default_rng(0).bytes(victim.stat().st_size))

    return damage


def truncate_chunk(element: str) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        victim = _middle_chunk(store, element)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

    return damage


def garble_metadata(element: str) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        meta = store / element / "zarr.json"
        if not meta.exists():
            meta = store / element / ".zarray"
        meta.write_bytes(b'{"zarr_format": 3, "node_type": "arr')  # cut short

    return damage


def set_spec_version(version: str) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        root = zarr.open_group(store, mode="r+")
        root.attrs["mars-scale"] = {**dict(root.attrs["mars-scale"]), "encoding-version": version}

    return damage


def drop_spec(store: Path) -> None:
    root = zarr.open_group(store, mode="r+")
    del root.attrs["mars-scale"]


#: name -> (damage, command ("info" or "train"), fragments of the expected one-line error)
DAMAGED_STORES: dict[str, tuple[Callable[[Path], None], str, list[str]]] = {
    "newer spec (info)": (set_spec_version("1.0.0"), "info", ["spec 1.0.0 is newer", "upgrade mars_scale"]),
    "newer spec (train)": (set_spec_version("1.0.0"), "train", ["spec 1.0.0 is newer", "upgrade mars_scale"]),
    "older spec (info)": (set_spec_version("0.0.1"), "info", ["spec 0.0.1 is not supported"]),
    "no spec attribute": (drop_spec, "info", ["not a mars-scale atlas"]),
    "X/data chunk deleted": (delete_chunk("X/data"), "train", ["X rows", "X/data", "damaged"]),
    "X/data chunk garbled": (garble_chunk("X/data"), "train", ["X rows", "cannot be read", "damaged"]),
    "X/data chunk truncated": (truncate_chunk("X/data"), "train", ["X rows", "cannot be read", "damaged"]),
    "X/data metadata garbled": (garble_metadata("X/data"), "train", ["X/data cannot be", "damaged"]),
    "X/indices chunk deleted": (delete_chunk("X/indices"), "train", ["X rows", "X/indices", "damaged"]),
    "X/indptr chunk deleted": (delete_chunk("X/indptr"), "train", ["X/indptr", "damaged"]),
    "X/indptr chunk garbled": (garble_chunk("X/indptr"), "train", ["X/indptr", "cannot be read", "damaged"]),
    "obs/cell_type codes garbled": (
        garble_chunk("obs/cell_type/codes"), "info", ["obs/cell_type/codes cannot be read", "damaged"],
    ),
    "uns/mars_scale garbled": (
        garble_metadata("uns/mars_scale/experiment_ranges"), "info", ["uns/mars_scale cannot be read"],
    ),
}
