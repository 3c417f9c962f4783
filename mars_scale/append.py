"""Add experiments to an existing atlas store (``mars-scale ingest NEW.h5ad -o atlas.zarr --append``).

The new files are read with ingest's two passes (quality control, then write), in the store's
gene space: a store gene that a file lacks reads as zero (counted per experiment in
``uns/mars_scale/absent_genes``), a file gene that the store lacks is dropped (counted in the
log and the result). Rows are appended after the store's last row:

1. the store is cloned into a hidden sibling, ``.atlas.zarr.append-<hex>``: the full shard (or
   chunk) files of ``X`` and of the per-cell obs arrays are hard links to the store's own, which
   no step writes; the rest (metadata, the last partial shard of each array, small elements) is
   copied;
2. the new rows go after the last row of the clone; per-gene statistics are merged exactly
   (Chan's update of the stored moments with the new ones); ``varm`` count sums gain one column
   per new experiment; other obs columns (carried-over input columns, annotation results) and
   ``obsm`` arrays are extended with missing values for the new cells;
3. the clone is sealed (checksums) and exchanged with the store in one atomic step
   (``renameat2(RENAME_EXCHANGE)``), then the old version is deleted.

A failure or a kill before step 3 leaves the store untouched (and a hidden temporary, removed by
the next append); readers see the old store or the new one, never a part.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mars_scale.errors import InputError, StoreError
from mars_scale.ingest import (
    _CATEGORICAL,
    _NUMERIC,
    IngestConfig,
    _Codes,
    _CountSums,
    _FilePlan,
    _H5adSource,
    _Runner,
    _RowSink,
    _anndata_column,
    _check_pass,
    _concat_columns,
    _input_kind,
    _input_obs_column,
    _plan_experiments,
    _sources_record,
    _experiment_kinds,
    _write_pass,
    make_runner,
)
from mars_scale.stats import GeneMoments, merge_moments
from mars_scale.store import (
    Atlas,
    clone_for_append,
    encode_dataframe,
    exchange_directories,
    open_store,
    seal,
    store_lock,
)

__all__ = ["AppendResult", "append"]

logger = logging.getLogger(__name__)

#: The 1-D arrays that grow by appends; their full write units are shared with the old store.
_GROWING = ("X/data", "X/indices", "X/indptr", "obs/_index", "obs/experiment/codes",
            "obs/cell_type/codes", "obs/n_counts", "obs/n_genes")


@dataclass(frozen=True)
class AppendResult:
    """What :func:`append` added.

    Attributes
    ----------
    store
        The store.
    experiments
        ``{name: cells}`` of the experiments added, in store order.
    absent_genes
        ``{experiment: n}``: store genes missing from the experiment's file (read as zero).
    dropped_genes
        ``{file name: n}``: genes of a file that the store does not have (not stored).
    """

    store: Path
    experiments: dict[str, int]
    absent_genes: dict[str, int]
    dropped_genes: dict[str, int]


def _step(name: str) -> None:
    """A named point of the append (the kill tests stop the process at each)."""
    logger.debug("append: %s", name)


def append(
    inputs: Sequence[str | os.PathLike],
    store_path: str | os.PathLike,
    *,
    config: IngestConfig | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
) -> AppendResult:
    """Add the experiments of h5ad files to an existing store, atomically.

    Parameters
    ----------
    inputs
        h5ad files (or AnnData ``.zarr``), read as :func:`~mars_scale.ingest.ingest` reads them.
    store_path
        A store written by ``mars-scale ingest`` (spec 0.1.1).
    config
        Reading options and cell filters; ``genes``, ``min_cells`` and ``layout`` are the
        store's (its genes and chunking) and are not used.
    workers, scheduler
        Run the per-block work on dask, as :func:`~mars_scale.ingest.ingest` does.

    Returns
    -------
    AppendResult

    Raises
    ------
    InputError
        For a bad input (as ingest), an experiment the store already has, or values of another
        kind than the store's (log-normalised against counts).
    StoreError
        If the store cannot be opened, is being written by another process, or holds elements
        an append cannot extend (``layers``, ``obsp``).
    """
    config = config or IngestConfig()
    path = Path(store_path)
    if not inputs:
        raise InputError("no input files given")
    started = time.perf_counter()
    open_store(path)  # a clear error for a path that is not a store, before taking its lock
    with store_lock(path):
        store = open_store(path)
        _check_extendable(store)
        _remove_leftovers(path)
        sources: list[_H5adSource] = []
        runner = make_runner(workers, scheduler)
        try:
            for p in inputs:
                sources.append(_H5adSource(Path(p), config))
            result = _append(store, sources, config, runner)
        finally:
            runner.close()
            for s in sources:
                s.close()
    n = sum(result.experiments.values())
    logger.info("appended %d cells in %d experiments to %s in %.1f s", n, len(result.experiments), path,
                time.perf_counter() - started)
    return result


def _check_extendable(store: Atlas) -> None:
    if not store.checksummed:
        raise StoreError(f"{store.path}: spec {store.spec_version} predates checksums; re-run \"mars-scale ingest\" "
                         "to write it as 0.1.1 before appending")
    for group in ("layers", "obsp"):
        if group in store.root and len(list(store.root[group].keys())):
            raise StoreError(f"{store.path}: {group} holds elements an append cannot extend; remove them first")


def _remove_leftovers(path: Path) -> None:
    """Temporaries of an append that was killed (the caller holds the writer lock)."""
    for left in path.parent.glob(f".{path.name}.append-*"):
        if left.is_dir():
            logger.warning("%s: removing %s, left by an interrupted append", path, left.name)
            shutil.rmtree(left, ignore_errors=True)


def _append(store: Atlas, sources: list[_H5adSource], config: IngestConfig, runner: _Runner) -> AppendResult:
    genes = store.gene_ids
    plans = _plan_experiments(sources, config, genes)
    dropped = {p.source.name: int((p.gene_map < 0).sum()) for p in plans}
    for p in plans:
        p.increasing = bool(np.all(np.diff(p.gene_map[p.gene_map >= 0]) > 0))
    census = _check_pass(plans, len(genes), config, runner)
    kind = _input_kind(plans, config)
    if (kind == "lognorm") != (store.input_kind == "lognorm"):
        raise InputError(f"{plans[0].source.name}: holds {kind} values but {store.path} holds "
                         f"{store.input_kind}; append values of the same kind")
    new = list(census.experiments)
    taken = [e for e in new if e in store.experiment_ranges]
    if taken:
        raise InputError(f"{store.path}: already has experiment {taken[0]!r}; give the new experiment "
                         "another name (file name or --experiment-key)")
    old_types = store.cell_types
    types = old_types + sorted(set(census.cell_types) - set(old_types))
    experiments = store.experiments + new
    codes = _Codes({e: i for i, e in enumerate(experiments)}, {t: i for i, t in enumerate(types)},
                   len(genes), store.input_kind)
    absent = _absent_genes(plans, genes)
    tmp = store.path.with_name(f".{store.path.name}.append-{uuid.uuid4().hex[:12]}")
    try:
        clone_for_append(store.path, tmp, list(_GROWING))
        _step("cloned")
        _write_into(tmp, store, plans, census, codes, config, runner, types, experiments, absent)
        _step("written")
        seal(tmp)
        _step("sealed")
        exchange_directories(tmp, store.path)  # the commit point
        _step("exchanged")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the clone, or after the exchange the old store
    return AppendResult(store.path, {e: census.experiments[e] for e in new},
                        {e: absent.get(e, 0) for e in new}, dropped)


def _absent_genes(plans: list[_FilePlan], genes: pd.Index) -> dict[str, int]:
    """Store genes missing from each new experiment's file."""
    out: dict[str, int] = {}
    for p in plans:
        missing = len(genes) - int((p.gene_map >= 0).sum())
        for e in p.experiments:
            out[e] = max(out.get(e, 0), missing)
    return out


def _write_into(tmp: Path, store: Atlas, plans: list[_FilePlan], census, codes: _Codes, config: IngestConfig,
                runner: _Runner, types: list[str], experiments: list[str], absent: dict[str, int]) -> None:
    import zarr

    root = zarr.open_group(tmp, mode="r+")
    n_old = store.n_cells
    order = [str(c) for c in root["obs"].attrs.get("column-order", [])]
    sink = _RowSink.resume(root)
    count_sums = _CountSums(codes.n_genes, len(census.experiments), first=len(store.experiments))
    moments, row_codes = _write_pass(plans, sink, count_sums, census, codes, config, runner,
                                     tmp.parent / f"{tmp.name}.spool", nnz_per_chunk=_data_chunk(root))
    sink.finish_obs({"experiment": experiments, "cell_type": types}, order)
    n_new = sink.x.n_rows - n_old
    _extend_obs(root, store, plans, config, order, n_old, n_new,
                None if census.grouped else np.argsort(row_codes, kind="stable"))
    _extend_obsm(root, n_old + n_new)
    _write_counts(root, store, count_sums)
    _write_var(root, store, moments)
    _write_meta(root, store, plans, census, codes, experiments, absent)


def _data_chunk(root) -> int:
    return int(root["X/data"].chunks[0])


def _extend_obs(root, store: Atlas, plans, config, order: list[str], n_old: int, n_new: int,
                new_order: np.ndarray | None) -> None:
    """Other obs columns, extended to the new cells (missing where a file lacks the column)."""
    from anndata.io import read_elem, write_elem

    core = {*_CATEGORICAL, *_NUMERIC}
    for name in order:
        if name in core:
            continue
        node = root["obs"][name]
        attrs = {k: v for k, v in node.attrs.items() if not k.startswith("encoding-")}
        old = pd.Series(read_elem(node))
        new = _input_obs_column(plans, name.removesuffix("_input") if name.endswith("_input") else name)
        if new is not None and new_order is not None:
            new = new.iloc[new_order].reset_index(drop=True)
        column = _concat_columns([old, new], [n_old, n_new])
        del root["obs"][name]
        write_elem(root["obs"], name, _anndata_column(column))
        if attrs:  # annotation run ids (docs/store.md, "Result elements")
            root["obs"][name].attrs.update(attrs)
    encode_dataframe(root["obs"], order)


def _extend_obsm(root, n_cells: int) -> None:
    """``obsm`` arrays (embeddings, UMAP) gain NaN rows for the new cells."""
    for name, array in list(root["obsm"].arrays()):
        old = int(array.shape[0])
        array.resize((n_cells, *array.shape[1:]))
        step = max(1, (1 << 24) // max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize))
        for a in range(old, n_cells, step):
            b = min(n_cells, a + step)
            array[a:b] = np.full((b - a, *array.shape[1:]), np.nan, dtype=array.dtype)


def _write_counts(root, store: Atlas, count_sums: _CountSums) -> None:
    from anndata.io import read_elem, write_elem

    for key, new in (("mars_counts_sum", count_sums.s1), ("mars_counts_sumsq", count_sums.s2)):
        if key in root["varm"]:
            old = np.asarray(read_elem(root["varm"][key]))
            del root["varm"][key]
            write_elem(root["varm"], key, np.ascontiguousarray(np.concatenate([old, new.T], axis=1)))


def _write_var(root, store: Atlas, new: GeneMoments) -> None:
    """var with the statistics of old and new cells merged (Chan's update, float64)."""
    from anndata.io import read_elem, write_elem

    var = read_elem(root["var"])
    n_old = store.n_cells
    std = var["std"].to_numpy(np.float64)
    old = GeneMoments(n_old, var["mean"].to_numpy(np.float64), std * std * max(n_old - 1, 0),
                      var["n_cells"].to_numpy(np.int64))
    merged = merge_moments(old, new)
    var["n_cells"] = merged.n_cells.astype(np.int64)
    var["mean"] = merged.mean
    var["std"] = merged.std
    del root["var"]
    write_elem(root, "var", var)


def _write_meta(root, store: Atlas, plans, census, codes: _Codes, experiments: list[str],
                absent: dict[str, int]) -> None:
    from anndata.io import write_elem

    meta = dict(store.meta)
    old_ranges = np.asarray(meta["experiment_ranges"], dtype=np.int64).reshape(-1, 2)
    counts = np.array([census.experiments[e] for e in experiments[len(store.experiments):]], dtype=np.int64)
    stops = store.n_cells + np.cumsum(counts)
    ranges = np.concatenate([old_ranges, np.stack([stops - counts, stops], axis=1)])
    new_names = experiments[len(store.experiments):]
    old_sources = {k: np.asarray(v) for k, v in meta["sources"].items()}
    sources = {k: np.concatenate([old_sources[k], v]) for k, v in _sources_record(plans).items()}
    kinds = np.concatenate([np.asarray(meta["experiment_kinds"], dtype=object),
                            np.asarray(_experiment_kinds(new_names, census, store.input_kind), dtype=object)])
    n_before = len(store.experiments)
    added = np.asarray(meta.get("experiment_appended", np.zeros(n_before, dtype=np.int64)), dtype=np.int64)
    run = int(added.max(initial=0)) + 1
    absent_old = np.asarray(meta.get("experiment_absent_genes", np.zeros(n_before, dtype=np.int64)), dtype=np.int64)
    meta.update({  # the store keeps its own spec version: its layout is not changed
        "experiment_names": np.asarray(experiments, dtype=object),
        "experiment_ranges": ranges,
        "experiment_kinds": kinds,
        "sources": sources,
        "experiment_appended": np.concatenate([added, np.full(len(new_names), run, dtype=np.int64)]),
        "experiment_absent_genes": np.concatenate(
            [absent_old, np.asarray([absent.get(e, 0) for e in new_names], dtype=np.int64)]),
    })
    del root["uns"]["mars_scale"]
    write_elem(root["uns"], "mars_scale", meta)
