"""Annotate an atlas: embed every cell, assign the unannotated experiment to landmarks, name.

:func:`annotate` streams all cells of a store through a trained encoder once. In that pass it

- appends the embeddings to ``obsm['X_<key>']`` (a chunked float32 zarr array; memory is one
  shard of rows, whatever the number of cells),
- accumulates, for every annotated landmark, the squared distances of its own annotated cells
  (the root mean square is the landmark radius that the novelty score uses),
- keeps the embeddings of the unannotated experiment in a memory-mapped scratch file.

It then assigns each unannotated cell to its nearest unannotated landmark (faiss), names the
clusters with :func:`mars_scale.naming.name_clusters` and writes the results into the store.

Writing into the store
----------------------
Every new element is first written in full under a staging directory inside the store
(``.mars-scale-staging-<id>/``, which zarr and anndata do not see), then renamed into place:
obs columns, ``obsm['X_<key>']``, ``uns[<key>]``. The obs columns become visible to anndata
only when their names enter the ``column-order`` attribute of ``obs``, which is replaced last,
as one atomic JSON file replace: that is the commit point. When results are replaced
(``overwrite=True``), the old columns are first taken out of ``column-order``, and each old
element is moved into the staging directory, not deleted, until the commit. Any error before
the commit (an exception or an interrupt) moves everything back, so the store is as it was.
A process killed outright between the renames leaves a store that opens and holds the earlier
results (or none), never obs columns of two different runs. The whole operation holds the
store's writer lock.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import zarr

from mars_scale.device import resolve_device
from mars_scale.distributed import DistInfo
from mars_scale.errors import InputError, StoreError
from mars_scale.landmarks import nearest
from mars_scale.model import Mars
from mars_scale.naming import NamingResult, name_clusters, name_confusion
from mars_scale.subpopulations import name_with_parts
from mars_scale.store import (Atlas, atomic_file, chunk_codecs, column_array, commit_elements, encode_array,
                               obs_publication, open_store, seal, store_lock, write_attrs, write_categorical)
from mars_scale.train import embed, experiment_names

__all__ = ["AnnotationResult", "annotate", "read_results", "result_keys"]

logger = logging.getLogger(__name__)

_STAGING_PREFIX = ".mars-scale-staging-"
_KEY_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_RESERVED_KEYS = {"mars_scale"}  # uns/mars_scale is the store's own metadata
_OBS_SUFFIXES = ("cluster", "cell_type", "confidence", "novelty", "closest_type", "cluster_novelty")
_TARGET_CHUNK_BYTES = 1 << 20  # about 1 MiB per chunk of obsm/X_<key>
_SHARD_CHUNKS = 16  # chunks per shard file of obsm/X_<key> (zarr v3)
_COLUMN_CHUNK = 1 << 18  # cells per chunk of the obs result columns
_RUN_ATTR = "mars-scale-run"  # the run id stamped on every result element
# annotated cells (a fixed sample of rows) over which the sibling step counts how the embedding
# confuses names: a share estimate, so a sample bounds its cost on large references
CONFUSION_CELLS = 200_000


def result_keys(key_added: str = "mars") -> dict[str, Any]:
    """Names of the store elements that :func:`annotate` writes for ``key_added``.

    Parameters
    ----------
    key_added
        The prefix of the result elements.

    Returns
    -------
    dict
        ``obs`` (the six obs columns ``<key>_cluster``, ``<key>_cell_type``,
        ``<key>_confidence``, ``<key>_novelty``, ``<key>_closest_type``,
        ``<key>_cluster_novelty``), ``obsm`` (the embedding ``X_<key>``), ``probabilities``
        (the obsm element ``<key>_name_probabilities``) and ``uns`` (``<key>``).
    """
    return {
        "obs": [f"{key_added}_{suffix}" for suffix in _OBS_SUFFIXES],
        "obsm": f"X_{key_added}",
        "probabilities": f"{key_added}_name_probabilities",
        "uns": key_added,
    }


@dataclasses.dataclass(frozen=True, eq=False)
class AnnotationResult:
    """What :func:`annotate` wrote, with the naming of every discovered cluster.

    Attributes
    ----------
    store
        The store written to.
    key_added
        Prefix of the result elements (see :func:`result_keys`).
    unannotated
        The experiment whose cells were clustered and named (several: their names joined by
        ``", "``; they share the landmarks and the clusters).
    n_cells
        Cells embedded (all cells of the store).
    n_unannotated
        Cells of the unannotated experiment(s).
    naming
        Per-cluster and per-cell naming (:class:`~mars_scale.naming.NamingResult`); per-cell
        arrays follow the rows of the unannotated experiment(s), in store order.
    unused_landmarks
        Unannotated landmarks that no cell chose.
    merged_landmarks
        Unannotated landmarks with fewer than ``min_cluster_cells`` cells, whose cells went to
        the nearest of the others.
    landmark_radius
        Root-mean-square distance of each annotated landmark's annotated cells to it.
    written
        Store elements written, e.g. ``"obs/mars_cluster"``.
    export
        The h5ad file written with ``export=``, else ``None``.
    seconds
        Wall time.
    """

    store: Path
    key_added: str
    unannotated: str
    n_cells: int
    n_unannotated: int
    naming: NamingResult
    unused_landmarks: tuple[int, ...]
    merged_landmarks: tuple[int, ...]
    landmark_radius: np.ndarray
    written: tuple[str, ...]
    export: Path | None
    seconds: float

    def cluster_table(self) -> list[dict[str, Any]]:
        """One row per discovered cluster: cluster, cells, name, probability, novelty.

        Returns
        -------
        list of dict
            Keys ``cluster`` (landmark index), ``n_cells``, ``name`` (the cluster's cell type,
            or ``"novel"``), ``best_name`` (most probable annotated name), ``probability`` (of
            ``best_name``), ``novelty``, ``is_novel`` and ``description`` (e.g. ``"novel,
            closest to B cell (0.71), T cell (0.29)"``).
        """
        nr = self.naming
        return [
            {
                "cluster": int(nr.clusters[j]),
                "n_cells": int(nr.n_cells[j]),
                "name": str(nr.label[j]),
                "best_name": str(nr.best_name[j]),
                "probability": float(nr.best_probability[j]),
                "novelty": float(nr.novelty[j]),
                "is_novel": bool(nr.is_novel[j]),
                "description": nr.describe(j),
            }
            for j in range(nr.n_clusters)
        ]


# ---------------------------------------------------------------------------------------------
# the public function


def annotate(
    store_path: str | os.PathLike,
    model_or_run_dir: Mars | str | os.PathLike,
    *,
    key_added: str = "mars",
    space: str = "latent",
    overwrite: bool = False,
    batch_size: int = 4096,
    device: str = "auto",
    seed: int | None = 0,
    export: str | os.PathLike | None = None,
    novelty_threshold: float = 0.5,
    novelty_method: str = "matching",
    min_cluster_cells: int = 10,
    max_cells_per_cluster: int = 2000,
    split_test: bool = True,
    siblings: bool = True,
) -> AnnotationResult:
    """Embed all cells, cluster and name the unannotated experiment, write results to the store.

    Parameters
    ----------
    store_path
        The atlas store (written in place).
    model_or_run_dir
        A trained :class:`~mars_scale.model.Mars`, or the run directory (or ``model.pt``) of
        one. Its genes must match the store's.
    key_added
        Prefix of the elements written (see Returns). Letters, digits and underscores, starting
        with a letter; not ``mars_scale``.
    space
        Where clusters are named: ``"latent"`` (the embedding) or ``"umap"`` (10 UMAP
        components fitted on a subsample, as in the paper).
    overwrite
        Replace earlier results under the same ``key_added`` (and an existing ``export`` file).
    batch_size, device
        Cells per encoder batch; ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    seed
        Seeds the samples of the kernel width, the split test and UMAP (``None``: fresh entropy).
    export
        Also write the results alone (obs columns, ``obsm['X_<key>']`` and ``uns[<key>]``, no
        X) to this ``.h5ad`` file, atomically.
    novelty_threshold, novelty_method
        A cluster whose novelty reaches the threshold is called ``"novel"``; ``"matching"``
        (clusters matched one to one to the known types) or ``"margin"`` (the earlier score),
        see :mod:`mars_scale.naming`.
    min_cluster_cells, max_cells_per_cluster
        A landmark with fewer cells is dropped, its cells going to the nearest other landmark
        (1 keeps every landmark); cells sampled per cluster to estimate the kernel width.
    split_test, siblings
        Split a known cluster, on expression, into a population the reference lacks (called
        new) or two known siblings (each named); with ``siblings`` too, name known types that
        the embedding confuses per cell on expression (:mod:`mars_scale.subpopulations`).

    Returns
    -------
    AnnotationResult
        What was written. The store gains:

        - ``obsm['X_<key>']``: float32 embedding of every cell (chunked along rows);
        - ``obs['<key>_cluster']``: categorical landmark index of the cells of the unannotated
          experiment (missing elsewhere);
        - ``obs['<key>_cell_type']``: categorical name of the cell's cluster, or ``"novel"``;
        - ``obs['<key>_confidence']``: float, how sure the cell's label is: the probability of
          its name times one minus its novelty, or its novelty for a ``"novel"`` cell;
        - ``obs['<key>_novelty']``: float, the cell's novelty probability in [0, 1];
        - ``obs['<key>_closest_type']``: categorical, the cell's most probable annotated name
          (also for novel cells: what the new type is closest to);
        - ``obs['<key>_cluster_novelty']``: float, the novelty of the cell's cluster (all four
          missing outside the unannotated experiment);
        - ``obsm['<key>_name_probabilities']``: float32, per cell the probability of each
          annotated name (columns: ``uns['<key>']['names']``; NaN outside the experiment);
        - ``uns['<key>']``: run record with, per cluster, ``clusters``, ``n_cells``, ``label``,
          ``description``, ``top_names`` and ``top_probabilities`` (top 3), ``novelty``,
          ``is_novel``, ``compared_name``, ``matched``, ``evidence``, ``part_of``; and ``names``,
          ``unused_landmarks``, ``merged_landmarks``, ``landmark_radius``, ``model``,
          ``config`` (JSON), ``date``, ``space``, ``seed``, ``unannotated``,
          ``novelty_method`` and the mars-scale version.

    Raises
    ------
    InputError
        For an invalid option, an untrained model, or an export path that exists.
    StoreError
        If the store cannot be opened, another process is writing to it, results under
        ``key_added`` exist and ``overwrite`` is false, or the model's unannotated experiment
        is not in the store.
    CheckpointMismatchError
        If the model's genes differ from the store's.
    """
    started = time.perf_counter()
    _check_options(key_added=key_added, space=space, batch_size=batch_size, min_cluster_cells=min_cluster_cells,
                   novelty_method=novelty_method)
    export_path = _check_export(export, overwrite=overwrite)
    store = open_store(store_path)
    model = _load_model(model_or_run_dir, store)
    names = experiment_names(model.state["unannotated"])  # checked by _load_model
    unannotated = ", ".join(names)
    keys = result_keys(key_added)
    root_dir = Path(store.path)
    options = dict(device=resolve_device(device), batch_size=batch_size, space=space, seed=seed,
                   novelty_threshold=novelty_threshold, novelty_method=novelty_method,
                   min_cluster_cells=min_cluster_cells, max_cells_per_cluster=max_cells_per_cluster,
                   split_test=split_test, siblings=siblings)
    naming, unused, merged, radius, elements = _annotate_locked(
        store, model, model_or_run_dir, keys, names, overwrite=overwrite, options=options)
    written = tuple(f"{group}/{name}" for group, name in elements)
    logger.info("wrote %s into %s", ", ".join(written), root_dir)
    if export_path is not None:
        _export_h5ad(root_dir, keys, export_path)
        logger.info("exported the results to %s", export_path)
    n_unannotated = sum(b - a for a, b in _spans(store, names))
    seconds = time.perf_counter() - started
    logger.info("annotated %d cells (%d of experiment %s) in %.1f s", store.n_cells, n_unannotated, unannotated, seconds)
    return AnnotationResult(
        store=root_dir, key_added=key_added, unannotated=unannotated, n_cells=store.n_cells,
        n_unannotated=n_unannotated, naming=naming, unused_landmarks=tuple(int(u) for u in unused),
        merged_landmarks=tuple(int(m) for m in merged), landmark_radius=radius, written=written, export=export_path, seconds=seconds,
    )


def _annotate_locked(store: Atlas, model: Mars, source: Any, keys: dict[str, Any], names: tuple[str, ...], *,
                     overwrite: bool, options: dict[str, Any]) -> tuple:
    """Under the store's lock: compute everything into a staging folder, seal it and publish it
    in one commit (docs/store.md). Returns the naming, unused and merged landmarks, the landmark
    radii and the elements written."""
    root_dir = Path(store.path)
    fmt = int(store.root.metadata.zarr_format)
    with store_lock(root_dir):
        _remove_stale_staging(root_dir)
        _check_existing(store, keys, overwrite=overwrite)
        staging = root_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            naming, unused, merged, radius = _compute(store, model, staging, fmt, keys, **options)
            record = _run_record(model, source, naming, unused, merged, radius, keys=keys,
                                 space=options["space"], seed=options["seed"],
                                 unannotated=names[0] if len(names) == 1 else np.asarray(names, dtype=object))
            run_id = record["run_id"] = uuid.uuid4().hex[:16]
            _stage_obs_and_uns(store, staging, fmt, keys, naming, record, names)
            elements = ([("obs", name) for name in keys["obs"]]
                        + [("obsm", keys["obsm"]), ("obsm", keys["probabilities"]), ("uns", keys["uns"])])
            for group, name in elements:  # chunk and metadata checksums (docs/store.md), run id
                seal(staging / group / name)
                write_attrs(staging / group / name, {_RUN_ATTR: run_id})
            _commit(root_dir, staging, elements, keys["obs"], run=(keys["uns"], run_id))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return naming, unused, merged, radius, elements


# ---------------------------------------------------------------------------------------------
# checks


def _check_options(*, key_added: str, space: str, batch_size: int, min_cluster_cells: int = 1,
                   novelty_method: str = "matching") -> None:
    if not isinstance(key_added, str) or not _KEY_PATTERN.match(key_added):
        raise InputError(
            f"key_added must start with a letter and hold only letters, digits and underscores "
            f"(got {key_added!r})"
        )
    if key_added in _RESERVED_KEYS:
        raise InputError(f"key_added {key_added!r} is reserved for the store's own metadata (pick another)")
    if space not in ("latent", "umap"):
        raise InputError(f"space must be 'latent' or 'umap' (got {space!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer (got {batch_size!r})")
    if isinstance(min_cluster_cells, bool) or not isinstance(min_cluster_cells, (int, np.integer)) or min_cluster_cells < 1:
        raise InputError(f"min_cluster_cells must be a positive integer (got {min_cluster_cells!r})")
    if novelty_method not in ("matching", "margin"):
        raise InputError(f"novelty_method must be 'matching' or 'margin' (got {novelty_method!r})")


def _check_export(export: str | os.PathLike | None, *, overwrite: bool) -> Path | None:
    if export is None:
        return None
    path = Path(export)
    if path.suffix != ".h5ad":
        raise InputError(f"{path}: the export file must end in .h5ad")
    if path.exists() and not overwrite:
        raise InputError(f"{path}: already exists (pass --overwrite to replace it)")
    if not path.parent.is_dir():
        raise InputError(f"{path}: the directory {path.parent} does not exist")
    return path


def _load_model(model_or_run_dir: Mars | str | os.PathLike, store: Atlas) -> Mars:
    if isinstance(model_or_run_dir, Mars):
        model_or_run_dir._check_store(store)  # trained, and the same genes
        model = model_or_run_dir
    else:
        model = Mars.load(model_or_run_dir, store)
    names = experiment_names(model.state["unannotated"])
    if not names:
        raise InputError(f"{model_or_run_dir}: is a reference (trained with --reference-only), which clusters no "
                         "experiment; train a run --from it and annotate with that")
    for unannotated in names:  # one experiment, or several sharing the landmarks
        if unannotated not in store.experiment_ranges:
            raise StoreError(
                f"{store.path}: the model's unannotated experiment {unannotated!r} is not in this "
                f"store (experiments: {', '.join(store.experiments)})"
            )
    return model


def _existing_keys(store: Atlas, keys: dict[str, Any]) -> list[str]:
    root_dir = Path(store.path)
    found = []
    order = set(store.obs_columns)
    for name in keys["obs"]:
        if name in order or (root_dir / "obs" / name).exists():
            found.append(f"obs/{name}")
    for name in (keys["obsm"], keys["probabilities"]):
        if (root_dir / "obsm" / name).exists():
            found.append(f"obsm/{name}")
    if (root_dir / "uns" / keys["uns"]).exists():
        found.append(f"uns/{keys['uns']}")
    return found


def _check_existing(store: Atlas, keys: dict[str, Any], *, overwrite: bool) -> None:
    found = _existing_keys(store, keys)
    if found and not overwrite:
        raise StoreError(
            f"{store.path}: {found[0]} already exists from an earlier annotation "
            f"(pass --overwrite to replace it, or choose another key)"
        )
    if found:
        logger.info("replacing earlier results: %s", ", ".join(found))


def _remove_stale_staging(root_dir: Path) -> None:
    """Remove staging directories left by a killed writer (we hold the lock: none is live)."""
    for path in root_dir.glob(f"{_STAGING_PREFIX}*"):
        logger.warning("removing %s, left behind by an interrupted annotation", path.name)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the pass over the cells


class _RowWriter:
    """Append rows to a 2-D zarr array in whole shards (each written once)."""

    def __init__(self, array: zarr.Array, unit_rows: int) -> None:
        self.array = array
        self.unit = unit_rows
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.size = 0  # rows written
        self.next_row = 0  # rows received

    def append(self, index: np.ndarray, rows: np.ndarray) -> None:
        if index.size == 0:
            return
        if index[0] != self.next_row or index[-1] != self.next_row + index.size - 1:
            raise RuntimeError(
                f"embedding stream out of order: expected row {self.next_row}, got {index[0]}"
            )
        self.next_row += index.size
        self.pending.append(rows)
        self.n_pending += rows.shape[0]
        if self.n_pending >= self.unit:
            self._flush(final=False)

    def _flush(self, *, final: bool) -> None:
        if not self.n_pending:
            return
        buf = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n = buf.shape[0] if final else (buf.shape[0] // self.unit) * self.unit
        if n:
            self.array[self.size : self.size + n] = buf[:n]
            self.size += n
        rest = buf[n:]
        self.pending = [rest] if rest.shape[0] else []
        self.n_pending = rest.shape[0]

    def close(self) -> None:
        self._flush(final=True)


def _staging_group(staging: Path, group: str, fmt: int) -> zarr.Group:
    path = staging / group
    if path.exists():
        return zarr.open_group(path, mode="r+", zarr_format=fmt)
    return zarr.open_group(path, mode="w", zarr_format=fmt)


def _create_embedding_array(group: zarr.Group, name: str, n_cells: int, dim: int, fmt: int) -> tuple[zarr.Array, int]:
    chunk_rows = int(max(256, min(65536, _TARGET_CHUNK_BYTES // (4 * max(dim, 1)))))
    kwargs: dict[str, Any] = {"chunks": (chunk_rows, dim)}
    unit = chunk_rows
    if fmt == 3:
        unit = chunk_rows * _SHARD_CHUNKS
        kwargs["shards"] = (unit, dim)
    array = group.create_array(name, shape=(n_cells, dim), dtype=np.float32, fill_value=np.nan, **kwargs,
                               **chunk_codecs(fmt))
    encode_array(array)
    return array, unit


def _landmark_lookup(model: Mars, store: Atlas) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Annotated landmarks and a (store experiment, store cell type) -> landmark table."""
    values, exps, types = model.annotated_landmarks
    index = {(e, t): i for i, (e, t) in enumerate(zip(exps, types))}
    store_types = store.cell_types
    lookup = np.full((len(store.experiments), max(len(store_types), 1)), -1, dtype=np.int64)
    for ei, e in enumerate(store.experiments):
        for ti, t in enumerate(store_types):
            lookup[ei, ti] = index.get((e, t), -1)
    return np.asarray(values, dtype=np.float32), lookup, list(types)


@torch.no_grad()
def _compute(store: Atlas, model: Mars, staging: Path, fmt: int, keys: dict[str, Any], *,
             device: torch.device, batch_size: int, space: str, seed: int | None,
             novelty_threshold: float, novelty_method: str, min_cluster_cells: int,
             max_cells_per_cluster: int, split_test: bool, siblings: bool) -> tuple[NamingResult, np.ndarray, np.ndarray, np.ndarray]:
    """Embed every cell into the staging obsm array; assign and name the unannotated cells."""
    new_experiments = experiment_names(model.state["unannotated"])
    spans = _spans(store, new_experiments)
    starts = np.asarray([a for a, _ in spans])
    offsets = np.cumsum([0] + [b - a for a, b in spans])  # held-out row of each span's first cell
    u_codes = torch.as_tensor([store.experiments.index(e) for e in new_experiments])
    landmarks_u = np.asarray(model.unannotated_landmarks, dtype=np.float32)
    landmarks_a, lookup, landmark_names = _landmark_lookup(model, store)
    dim = landmarks_u.shape[1]
    encoder = model.encoder.to(device)

    obsm = _staging_group(staging, "obsm", fmt)
    array, unit = _create_embedding_array(obsm, keys["obsm"], store.n_cells, dim, fmt)
    writer = _RowWriter(array, unit)
    held_out = np.lib.format.open_memmap(staging / "unannotated.npy", mode="w+", dtype=np.float32, shape=(int(offsets[-1]), dim))
    sum_sq = np.zeros(len(landmarks_a))
    count = np.zeros(len(landmarks_a))
    names, name_of_landmark = np.unique(np.asarray(landmark_names, dtype=str), return_inverse=True)
    confusion = np.zeros((names.size, names.size), dtype=np.int64)  # own name x nearest landmark's name
    n_annotated = sum(b - a for e, (a, b) in store.experiment_ranges.items() if e not in new_experiments)
    keep_share = min(1.0, CONFUSION_CELLS / max(n_annotated, 1)) if split_test and siblings else 0.0
    lookup_t = torch.as_tensor(lookup, device=device)
    landmarks_a_t = torch.as_tensor(landmarks_a, device=device)

    t0 = time.perf_counter()
    for index, exp, lab, z in embed(encoder, store, experiments=None, batch_size=batch_size, device=device,
                                    info=DistInfo(), progress="annotate: embed"):
        z = z.float()
        # squared distance of annotated cells to their own landmark (radius of each landmark)
        lm = lookup_t[exp, lab.clamp(min=0)]
        ok = (lab >= 0) & (lm >= 0) & ~torch.isin(exp, u_codes.to(exp.device))
        if bool(ok.any()):
            d2 = ((z[ok] - landmarks_a_t[lm[ok]]) ** 2).sum(1).double().cpu().numpy()
            ids = lm[ok].cpu().numpy()
            sum_sq += np.bincount(ids, weights=d2, minlength=len(landmarks_a))
            count += np.bincount(ids, minlength=len(landmarks_a))
        idx = index.cpu().numpy()
        z_np = z.cpu().numpy()
        if keep_share > 0 and bool(ok.any()):
            ok_np = ok.cpu().numpy()
            counted = _hashed_share(idx[ok_np], keep_share)  # a fixed sample of the annotated cells
            confusion += name_confusion(z_np[ok_np][counted], name_of_landmark[ids][counted], landmarks_a,
                                        name_of_landmark, names.size)
        writer.append(idx, z_np)
        span = np.searchsorted(starts, idx, side="right") - 1  # the held-out span a row may be in
        mine = (span >= 0) & (idx < starts[span.clip(0)] + np.diff(offsets)[span.clip(0)])
        if mine.any():
            held_out[offsets[span[mine]] + idx[mine] - starts[span[mine]]] = z_np[mine]
    writer.close()
    if writer.size != store.n_cells:
        raise RuntimeError(f"embedded {writer.size} of {store.n_cells} cells")
    held_out.flush()
    logger.info("embedded %d cells in %.1f s (%s)", store.n_cells, time.perf_counter() - t0, device)

    radius = np.zeros(len(landmarks_a))
    seen = count > 0
    radius[seen] = np.sqrt(sum_sq[seen] / count[seen])
    if not seen.all():
        fill = float(np.median(radius[seen])) if seen.any() else 0.0
        logger.warning("%d annotated landmarks have no annotated cells in this store; their radius is "
                       "taken as the median of the others (%.4g)", int((~seen).sum()), fill)
        radius[~seen] = fill

    assignment, _ = nearest(held_out, landmarks_u)
    usage = np.bincount(assignment, minlength=len(landmarks_u))
    unused = np.flatnonzero(usage == 0)
    if unused.size:
        logger.warning("%d of %d unannotated landmarks have no cells: %s", unused.size, len(landmarks_u),
                       unused.tolist())
    assignment, merged = merge_small_clusters(held_out, assignment, landmarks_u, min_cells=min_cluster_cells)

    def name(clusters: np.ndarray, decided: dict | None) -> NamingResult:
        return name_clusters(
            held_out, clusters, landmarks_a, landmark_names, landmark_weights=count,
            landmark_radius=radius if (space == "latent" and novelty_method == "margin") else None,
            novelty_method=novelty_method, max_cells_per_cluster=max_cells_per_cluster, top=3,
            novelty_threshold=novelty_threshold, space=space, decided=decided,
            rng=np.random.default_rng(seed),
        )

    if split_test:
        annotated = sorted(set(model.annotated_landmarks[1]))
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        naming, assignment, _ = name_with_parts(name, store, rows, assignment, held_out, annotated=annotated,
                                                confusion=confusion if siblings else None, seed=seed)
    else:
        naming = name(assignment, None)
    np.save(staging / "assignment.npy", assignment)
    del held_out
    return naming, unused, merged, radius


def _hashed_share(rows: np.ndarray, share: float) -> np.ndarray:
    """Whether each row is in a fixed pseudo-random ``share`` of all rows (a function of the row
    alone, so the same whatever the batches)."""
    if share >= 1.0:
        return np.ones(rows.shape[0], dtype=bool)
    mixed = (rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
    return mixed.astype(np.float64) / 2.0**24 < share


def merge_small_clusters(embedding: np.ndarray, assignment: np.ndarray, landmarks: np.ndarray, *,
                         min_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Move the cells of landmarks with fewer than ``min_cells`` cells to the nearest other landmark.

    Parameters
    ----------
    embedding
        ``(n, D)`` embeddings of the clustered cells (array or memmap; only the moved rows are
        read).
    assignment
        ``(n,)`` landmark index of each cell.
    landmarks
        ``(K, D)`` the landmarks.
    min_cells
        Landmarks with at least one and fewer than this many cells are dropped (if every used
        landmark is that small, none is).

    Returns
    -------
    assignment, merged
        The new assignment (a copy) and the sorted indices of the dropped landmarks.
    """
    usage = np.bincount(assignment, minlength=len(landmarks))
    small = (usage > 0) & (usage < min_cells)
    keep = np.flatnonzero(usage >= min_cells)
    if not small.any() or keep.size == 0:
        return assignment, np.zeros(0, dtype=np.int64)
    merged = np.flatnonzero(small)
    moved = np.flatnonzero(small[assignment])
    assignment = assignment.copy()
    target, _ = nearest(np.asarray(embedding[moved], dtype=np.float32), np.asarray(landmarks[keep], dtype=np.float32))
    assignment[moved] = keep[np.asarray(target)]
    logger.warning("%d landmarks had fewer than %d cells (%s); their %d cells went to the nearest other "
                   "landmark (fewer landmarks, --n-clusters, would avoid them)", merged.size, min_cells,
                   ", ".join(f"{int(m)}: {int(usage[m])}" for m in merged[:10]), moved.size)
    return assignment, merged


# ---------------------------------------------------------------------------------------------
# staging the obs columns and the run record


def _spans(store: Atlas, names: tuple[str, ...]) -> list[tuple[int, int]]:
    """The row ranges of the unannotated experiments, in store order; their cells in that order
    are the rows of the naming's per-cell arrays."""
    return sorted(store.experiment_ranges[e] for e in names)


def _put(arr, spans: list[tuple[int, int]], values: np.ndarray) -> None:
    """Write ``values`` (the spans' cells one after another) into ``arr`` at the spans' rows."""
    at = 0
    for a, b in spans:
        if b > a:
            arr[a:b] = values[at : at + b - a]
        at += b - a


def _write_categorical(group: zarr.Group, name: str, n_cells: int, rows: list[tuple[int, int]],
                       codes: np.ndarray, categories: list[str]) -> None:
    write_categorical(group, name, n_cells, (0, 0), codes, categories, chunk=_COLUMN_CHUNK)
    array = group[name]["codes"]
    _put(array, rows, codes.astype(array.dtype))


def _write_float(group: zarr.Group, name: str, n_cells: int, rows: list[tuple[int, int]], values: np.ndarray) -> None:
    arr = column_array(group, name, n_cells, np.float32, np.nan, chunk=_COLUMN_CHUNK)
    _put(arr, rows, values.astype(np.float32))


def _stage_obs_and_uns(store: Atlas, staging: Path, fmt: int, keys: dict[str, Any], naming: NamingResult,
                       record: dict[str, Any], experiments: tuple[str, ...]) -> None:
    from anndata.io import write_elem

    rows = _spans(store, experiments)
    n = store.n_cells
    assignment = np.load(staging / "assignment.npy")
    obs = _staging_group(staging, "obs", fmt)
    cluster_col, type_col, conf_col, nov_col, closest_col, cluster_nov_col = keys["obs"]
    # clusters: categories are the used landmark indices, in numeric order
    cluster_codes = np.searchsorted(naming.clusters, assignment)
    _write_categorical(obs, cluster_col, n, rows, cluster_codes, [str(int(c)) for c in naming.clusters])
    type_names = sorted({str(v) for v in naming.label})
    type_codes = np.searchsorted(np.asarray(type_names, dtype=object), naming.cell_type.astype(object))
    _write_categorical(obs, type_col, n, rows, type_codes, type_names)
    _write_float(obs, conf_col, n, rows, naming.confidence)
    _write_float(obs, nov_col, n, rows, naming.cell_novelty)
    names = [str(v) for v in naming.names]
    closest_codes = np.searchsorted(np.asarray(names, dtype=object), naming.cell_closest.astype(object))
    _write_categorical(obs, closest_col, n, rows, closest_codes, names)
    _write_float(obs, cluster_nov_col, n, rows, naming.novelty[cluster_codes])
    obsm = _staging_group(staging, "obsm", fmt)
    probs, _ = _create_embedding_array(obsm, keys["probabilities"], n, len(names), fmt)
    _put(probs, rows, naming.cell_name_probabilities)
    uns = _staging_group(staging, "uns", fmt)
    write_elem(uns, keys["uns"], record)


def _run_record(model: Mars, source: Any, naming: NamingResult, unused: np.ndarray, merged: np.ndarray,
                radius: np.ndarray, *,
                keys: dict[str, Any], space: str, seed: int | None, unannotated: str | np.ndarray) -> dict[str, Any]:
    from mars_scale import __version__

    model_path = "(in-memory model)" if isinstance(source, Mars) else str(Path(source).resolve())
    _, exps, types = model.annotated_landmarks
    return {
        "unannotated": unannotated,
        "space": space,
        "clusters": naming.clusters.astype(np.int64),
        "n_cells": naming.n_cells.astype(np.int64),
        "label": np.asarray(naming.label, dtype=object),
        "description": np.asarray([naming.describe(j) for j in range(naming.n_clusters)], dtype=object),
        "compared_name": np.asarray(naming.compared_name, dtype=object),
        "matched": np.asarray(naming.matched, dtype=bool),
        "evidence": np.asarray(naming.evidence, dtype=np.float64),
        "part_of": np.where(naming.part_of >= 0, naming.clusters[np.maximum(naming.part_of, 0)], -1).astype(np.int64),
        "names": np.asarray(naming.names, dtype=object),
        "novelty_method": naming.novelty_method,
        "merged_landmarks": np.asarray(merged, dtype=np.int64),
        "top_names": np.asarray(naming.top_names, dtype=object),
        "top_probabilities": np.asarray(naming.top_probabilities, dtype=np.float64),
        "novelty": np.asarray(naming.novelty, dtype=np.float64),
        "is_novel": np.asarray(naming.is_novel, dtype=bool),
        "sigma": np.asarray(naming.sigma, dtype=np.float64),
        "radius": np.asarray(naming.radius, dtype=np.float64),
        "novelty_threshold": float(naming.novelty_threshold),
        "unused_landmarks": np.asarray(unused, dtype=np.int64),
        "n_landmarks": int(len(model.unannotated_landmarks)),
        "landmark_radius": np.asarray(radius, dtype=np.float64),
        "landmark_experiments": np.asarray(exps, dtype=object),
        "landmark_names": np.asarray(types, dtype=object),
        "obs_keys": np.asarray(keys["obs"], dtype=object),
        "obsm_key": keys["obsm"],
        "probabilities_key": keys["probabilities"],
        "model": model_path,
        "config": json.dumps(model.state["config"], sort_keys=True),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": -1 if seed is None else int(seed),
        "mars_scale_version": __version__,
    }


# ---------------------------------------------------------------------------------------------
# committing: renames, then the column-order attribute


def _commit(root_dir: Path, staging: Path, elements: list[tuple[str, str]], obs_columns: list[str],
            *, run: tuple[str, str]) -> None:
    commit_elements(root_dir, staging, elements, obs_columns=obs_columns, run=run)


# ---------------------------------------------------------------------------------------------
# reading the results of one run, also while another annotate --overwrite commits


def read_results(store_path: str | os.PathLike, *, key_added: str = "mars", attempts: int = 50) -> dict[str, Any] | None:
    """Read the results of one :func:`annotate` run, never a mix of two runs.

    ``anndata.read_zarr`` reads ``obs``'s column order first and each column after it, so a
    read that overlaps an ``annotate --overwrite`` commit can return columns of two runs
    (docs/reliability.md). Every result element carries its run id (attribute
    ``mars-scale-run``) and ``obs`` names the published run (``mars-scale-runs``); this reads
    the published run id, then every element, then the run id again, and retries (after a
    short pause) until all agree.

    Parameters
    ----------
    store_path
        The store.
    key_added
        The results' prefix (as given to :func:`annotate`).
    attempts
        Reads to try before giving up.

    Returns
    -------
    dict or None
        ``run_id``, ``obs`` (a DataFrame of the result columns), ``obsm`` (``{name: array}``
        for the embedding and the name probabilities) and ``uns`` (the run record); ``None``
        if the store holds no published results for ``key_added``. Results written before run
        ids (mars-scale before issue 17) are read once, unchecked, with ``run_id`` ``None``.

    Raises
    ------
    StoreError
        If the store cannot be read, or the results kept changing for ``attempts`` reads.
    """
    from anndata.io import read_elem

    path = Path(store_path)
    keys = result_keys(key_added)
    for attempt in range(attempts):
        store = open_store(path)
        order, runs = obs_publication(path)
        before = runs.get(keys["uns"])
        if before is None and not set(keys["obs"]) <= set(order):
            return None
        root = zarr.open_group(path, mode="r")
        seen: set[Any] = set()
        out: dict[str, Any] = {"run_id": before, "obs": pd.DataFrame(index=pd.RangeIndex(store.n_cells)), "obsm": {}}
        try:
            for column in keys["obs"]:
                node = root[f"obs/{column}"]
                seen.add(node.attrs.get(_RUN_ATTR))
                out["obs"][column] = read_elem(node)
            for name in (keys["obsm"], keys["probabilities"]):
                node = root[f"obsm/{name}"]
                seen.add(node.attrs.get(_RUN_ATTR))
                out["obsm"][name] = np.asarray(node[...])
            node = root[f"uns/{keys['uns']}"]
            seen.add(node.attrs.get(_RUN_ATTR))
            out["uns"] = read_elem(node)
        except (KeyError, FileNotFoundError, ValueError, OSError):  # an element moved while we read
            seen.add(object())
        if before is None:  # written before run ids: nothing to check against
            if len(seen) == 1 and None in seen:
                return out
        elif seen == {before} and obs_publication(path)[1].get(keys["uns"]) == before:
            return out
        time.sleep(min(0.2, 0.005 * (attempt + 1)))
    raise StoreError(
        f"{path}: the {key_added} results changed during each of {attempts} reads "
        "(another annotate --overwrite is writing them; read again when it has finished)"
    )


# ---------------------------------------------------------------------------------------------
# export


def _object_strings(value: Any) -> Any:
    """numpy StringDType arrays (as zarr v3 returns strings) as object arrays, recursively."""
    if isinstance(value, dict):
        return {k: _object_strings(v) for k, v in value.items()}
    if isinstance(value, np.ndarray) and value.dtype.kind in "TUS":
        return np.array([str(v) for v in value.ravel()], dtype=object).reshape(value.shape)
    return value


def _export_h5ad(root_dir: Path, keys: dict[str, Any], target: Path) -> None:
    """Write obs (ids, experiment, cell type, results), obsm and the run record to an h5ad."""
    import anndata as ad
    import h5py
    from anndata.io import read_elem

    store = open_store(root_dir)
    obs = pd.DataFrame(index=pd.Index(_object_strings(store.obs_column("_index")), name=None))
    for column in ("experiment", "cell_type", *keys["obs"]):
        if column in store.obs_columns:
            obs[column] = store.obs_column(column)
    record = _object_strings(read_elem(store.root["uns"][keys["uns"]]))
    adata = ad.AnnData(obs=obs, uns={keys["uns"]: record})
    with atomic_file(target) as tmp:
        adata.write_h5ad(tmp)
        with h5py.File(tmp, "a") as fh:
            for name in (keys["obsm"], keys["probabilities"]):
                source = store.root["obsm"][name]
                n, d = source.shape
                rows = max(1, min(n, 65536))
                ds = fh["obsm"].create_dataset(name, shape=(n, d), dtype="f4",
                                               chunks=(max(1, min(n, 4096)), d) if n else None,
                                               compression="gzip" if n else None)
                encode_array(ds)
                for lo in range(0, n, rows):
                    hi = min(n, lo + rows)
                    ds[lo:hi] = np.asarray(source[lo:hi], dtype=np.float32)
