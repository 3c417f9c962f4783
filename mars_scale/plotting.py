"""Figures of an annotated store: UMAP of the embedding and confusion heatmaps (PNG, matplotlib).

:func:`plot` reads what :func:`mars_scale.annotate.annotate` wrote. The UMAP (umap-learn,
``n_neighbors=30``) is fitted on a uniform random subsample of at most ``max_cells`` rows of
``obsm['X_<key>']`` (read with orthogonal indexing, chunk by chunk), so time and memory do not
grow with the atlas. Figures are bare :class:`matplotlib.figure.Figure` objects rendered by the
Agg canvas, so no pyplot state or display backend is touched. The confusion heatmaps cover every cell of the unannotated experiment
(they need only its label codes) and are drawn only when that experiment has ground truth.

As scanpy does, each category keeps one colour in every figure, stored in
``uns['<column>_colors']`` (hex strings in category order): a cell type has the same colour as a
MARS name and as ground truth, and colours already stored are reused. The UMAP coordinates go to
``obsm['X_umap']`` (NaN for cells left out of the subsample). Both are written through a staging
directory inside the store and renamed into place under the store's writer lock, replacing what an
earlier ``plot`` wrote there.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from mars_scale.errors import InputError, StoreError
from mars_scale.rng import RNGLike, SeedLike
from mars_scale.store import Atlas, as_store, atomic_file, commit_elements, seal, store_lock

__all__ = ["plot"]

logger = logging.getLogger(__name__)

_MISSING_COLOUR = (0.85, 0.85, 0.85, 1.0)
_MAX_LEGEND = 40  # categories listed in a legend; more are drawn without one


def _palette(n: int) -> list[tuple[float, ...]]:
    import matplotlib

    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    colours = [matplotlib.colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    if n <= len(colours):
        return colours[:n]
    cmap = matplotlib.colormaps["turbo"]
    return [cmap(x) for x in np.linspace(0, 1, n)]


def _codes(store: Atlas, name: str, rows: np.ndarray | None = None) -> tuple[np.ndarray, list[str]]:
    """Codes of a categorical obs column (all rows, or the given sorted rows) and its categories."""
    group = store.root[f"obs/{name}"]
    _, categories = store.categorical_codes(name, 0, 0)
    codes = group["codes"]
    values = np.asarray(codes[:]) if rows is None else np.asarray(codes.get_orthogonal_selection(rows))
    return values.astype(np.int64), categories


def _hex(colours) -> list[str]:
    import matplotlib.colors

    return [matplotlib.colors.to_hex(c) for c in colours]


def _stored_colours(store: Atlas, column: str, n: int) -> list[str] | None:
    """``uns['<column>_colors']`` when it holds one colour per category, as scanpy reuses it."""
    key = f"{column}_colors"
    if key not in store.root["uns"]:
        return None
    values = [str(v) for v in np.asarray(store.root["uns"][key][...]).ravel()]
    return values if len(values) == n else None


def _shared_colours(store: Atlas, columns: dict[str, list[str]]) -> dict[str, list[str]]:
    """One colour per category value across several obs columns (cell types and MARS names).

    Values are coloured in the order of the columns given (truth first); the stored colours of
    the first column are kept.
    """
    order: list[str] = []
    for cats in columns.values():
        order += [c for c in cats if c not in order]
    mapping = dict(zip(order, _hex(_palette(len(order)))))
    first, cats = next(iter(columns.items()))
    stored = _stored_colours(store, first, len(cats))
    if stored is not None:
        taken = set(stored)
        mapping.update(zip(cats, stored))
        spare = iter(c for c in _hex(_palette(len(order) + len(taken))) if c not in taken)
        for value in order[len(cats):]:
            if mapping[value] in taken:
                mapping[value] = next(spare)
    return {col: [mapping[c] for c in cats] for col, cats in columns.items()}


def _scatter(coords: np.ndarray, codes: np.ndarray, categories: list[str], *, title: str, path: Path,
             colours: list[str] | None = None, missing: str = "other", order: list[int] | None = None,
             dpi: int = 150) -> Path:
    from matplotlib.figure import Figure
    import matplotlib.colors

    n_cat = len(categories)
    colours = [matplotlib.colors.to_rgba(c) for c in (colours if colours is not None else _palette(n_cat))]
    fig = Figure(figsize=(8.5, 6.5))
    ax = fig.subplots()
    size = float(np.clip(40000 / max(len(coords), 1), 0.5, 20))
    miss = codes < 0
    if miss.any():
        ax.scatter(coords[miss, 0], coords[miss, 1], s=size, color=_MISSING_COLOUR, linewidths=0,
                   label=f"{missing} ({int(miss.sum())})", rasterized=True)
    # draw in a random order so no category hides another
    rng = np.random.default_rng(0)
    shown = np.flatnonzero(~miss)
    shown = shown[rng.permutation(shown.size)]
    colour_array = np.array(colours)[codes[shown]] if shown.size else np.empty((0, 4))
    ax.scatter(coords[shown, 0], coords[shown, 1], s=size, c=colour_array, linewidths=0, rasterized=True)
    if n_cat <= _MAX_LEGEND:
        counts = np.bincount(codes[~miss], minlength=n_cat)
        for i in order if order is not None else range(n_cat):
            if counts[i]:
                ax.scatter([], [], s=30, color=colours[i], label=f"{categories[i]} ({counts[i]})")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8,
                  markerscale=1.0, ncol=1 if n_cat <= 20 else 2)
    ax.set_title(title)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path, dpi)
    return path


def _save(fig, path: Path, dpi: int) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")  # a bare Figure renders with Agg


def _heatmap(truth: np.ndarray, truth_cats: list[str], pred: np.ndarray, pred_cats: list[str], *,
             title: str, xlabel: str, path: Path, dpi: int = 150) -> Path:
    """Row-normalised confusion matrix (true types by predicted columns), counts in the cells."""
    from matplotlib.figure import Figure

    keep = (truth >= 0) & (pred >= 0)
    table = np.zeros((len(truth_cats), len(pred_cats)), dtype=np.int64)
    np.add.at(table, (truth[keep], pred[keep]), 1)
    rows = np.flatnonzero(table.sum(1))
    cols = np.flatnonzero(table.sum(0))
    table = table[np.ix_(rows, cols)]
    row_names = [truth_cats[i] for i in rows]
    col_names = [pred_cats[j] for j in cols]
    # columns in the order of the rows they best match, so a good result is a diagonal
    col_order = sorted(range(len(cols)), key=lambda j: (int(np.argmax(table[:, j])), -table[:, j].max()))
    table = table[:, col_order]
    col_names = [col_names[j] for j in col_order]
    frac = table / np.maximum(table.sum(1, keepdims=True), 1)
    width = min(4.0 + 0.55 * len(col_names), 30)
    height = min(2.0 + 0.45 * len(row_names), 30)
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(col_names)), col_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(row_names)), row_names, fontsize=8)
    if table.size <= 900:
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                if table[i, j]:
                    ax.text(j, i, str(table[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true type")
    fig.tight_layout()
    _save(fig, path, dpi)
    return path


def plot(
    store: Atlas | str | os.PathLike,
    *,
    output_dir: str | os.PathLike,
    key_added: str = "mars",
    max_cells: int = 50_000,
    seed: SeedLike | RNGLike = 0,
    n_neighbors: int = 30,
    dpi: int = 150,
) -> list[Path]:
    """Draw the UMAP and confusion figures of an annotated store.

    Parameters
    ----------
    store
        An annotated store (opened or a path).
    output_dir
        Where the PNG files go (created if missing; files are replaced).
    key_added
        The prefix the results were written under.
    max_cells
        Most cells in the UMAP (a uniform random subsample beyond).
    seed
        Seed or generator of the subsample and UMAP (:mod:`mars_scale.rng`).
    n_neighbors
        UMAP neighbourhood size (capped below the number of cells drawn).
    dpi
        Resolution of the PNG files.

    Returns
    -------
    list of pathlib.Path
        ``umap_cluster.png``, ``umap_name.png``, ``umap_experiment.png``, and when the
        unannotated experiment has ground truth ``umap_truth.png`` (its cells by true type),
        ``confusion_cluster.png`` and ``confusion_name.png`` (true types against discovered
        clusters and against predicted names). Titles count the cells coloured.

        Written into the store: ``obsm['X_umap']`` (cells x 2, NaN for cells not drawn) and
        ``uns['<column>_colors']`` for ``<key>_cluster``, ``<key>_cell_type``, ``cell_type`` and
        ``experiment``.

    Raises
    ------
    StoreError
        If the store holds no results under ``key_added`` (run ``mars-scale annotate``).
    InputError
        For an invalid option.
    """
    for name, value, low in (("max_cells", max_cells, 3), ("n_neighbors", n_neighbors, 2), ("dpi", dpi, 10)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise InputError(f"{name} must be an integer of at least {low} (got {value!r})")
    store = as_store(store)
    obsm_key, cluster_key, name_key = f"X_{key_added}", f"{key_added}_cluster", f"{key_added}_cell_type"
    if obsm_key not in store.root["obsm"] or cluster_key not in store.obs_columns or key_added not in store.root["uns"]:
        raise StoreError(
            f"{store.path}: no results under key {key_added!r} (obsm/{obsm_key}, obs/{cluster_key}); "
            "run \"mars-scale annotate\" first"
        )
    from anndata.io import read_elem

    record: dict[str, Any] = read_elem(store.root["uns"][key_added])
    names = record["unannotated"]  # one experiment, or several sharing the landmarks
    names = (names,) if isinstance(names, str) else tuple(str(v) for v in names)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = store.n_cells
    rows = np.arange(n) if n <= max_cells else np.sort(rng.choice(n, size=max_cells, replace=False))
    t0 = time.perf_counter()
    x = np.asarray(store.root["obsm"][obsm_key].get_orthogonal_selection((rows, slice(None))), dtype=np.float32)
    coords = _umap(x, n_neighbors=n_neighbors, seed=int(rng.integers(2**31 - 1)))
    logger.info("UMAP of %d of %d cells in %.1f s", len(rows), n, time.perf_counter() - t0)

    paths, colours = _umap_figures(store, coords, rows, unannotated=names, keys=(cluster_key, name_key),
                                   out=out, dpi=dpi)
    umap_full = np.full((n, 2), np.nan, dtype=np.float32)
    umap_full[rows] = coords
    written = _write_back(store, {("obsm", "X_umap"): umap_full,
                                  **{("uns", f"{k}_colors"): np.asarray(v, dtype=object) for k, v in colours.items()}})
    logger.info("wrote %s into %s", ", ".join(written), store.path)
    paths += _confusion_figures(store, unannotated=names, keys=(cluster_key, name_key), out=out, dpi=dpi)
    logger.info("wrote %d figures to %s", len(paths), out)
    return paths


def _umap_figures(store: Atlas, coords: np.ndarray, rows: np.ndarray, *, unannotated: tuple[str, ...],
                  keys: tuple[str, str], out: Path, dpi: int) -> tuple[list[Path], dict[str, list[str]]]:
    """The UMAP scatter plots of the drawn ``rows``; returns the files and the colours per column."""
    cluster_key, name_key = keys
    n = store.n_cells
    paths: list[Path] = []
    exp_codes = store.experiment_codes()[rows].astype(np.int64)
    in_u = np.isin(exp_codes, [list(store.experiments).index(e) for e in unannotated])
    unannotated = ", ".join(unannotated)
    drawn = f"a random {len(rows):,} of {n:,} cells" if len(rows) < n else f"{n:,} cells"
    u_title = f"{int(in_u.sum()):,} cells; {int((~in_u).sum()):,} of other experiments in grey"
    cl_codes, cl_cats = _codes(store, cluster_key, rows)
    nm_codes, nm_cats = _codes(store, name_key, rows)
    truth, truth_cats = _codes(store, "cell_type", rows)
    shared = _shared_colours(store, {"cell_type": truth_cats, name_key: nm_cats})
    colours = {
        cluster_key: _stored_colours(store, cluster_key, len(cl_cats)) or _hex(_palette(len(cl_cats))),
        "experiment": _stored_colours(store, "experiment", len(store.experiments)) or _hex(_palette(len(store.experiments))),
        **shared,
    }
    order = sorted(range(len(cl_cats)), key=lambda i: int(cl_cats[i]) if cl_cats[i].lstrip("-").isdigit() else i)
    paths.append(_scatter(coords, cl_codes, cl_cats, title=f"MARS clusters of {unannotated}: {u_title}",
                          path=out / "umap_cluster.png", colours=colours[cluster_key], missing="other experiments",
                          order=order, dpi=dpi))
    paths.append(_scatter(coords, nm_codes, nm_cats, title=f"MARS names of {unannotated}: {u_title}",
                          path=out / "umap_name.png", colours=colours[name_key], missing="other experiments", dpi=dpi))
    paths.append(_scatter(coords, exp_codes, list(store.experiments), title=f"experiments: {drawn}",
                          path=out / "umap_experiment.png", colours=colours["experiment"], dpi=dpi))
    truth_new = np.where(in_u, truth, -1)  # the reference's labels are training input, not truth
    if (truth_new >= 0).any():
        labelled = int((truth_new >= 0).sum())
        paths.append(_scatter(coords, truth_new, truth_cats,
                              title=f"ground truth of {unannotated}: {labelled:,} cells; "
                                    f"{len(rows) - labelled:,} unlabelled or of other experiments in grey",
                              path=out / "umap_truth.png", colours=colours["cell_type"],
                              missing="unlabelled or other experiments", dpi=dpi))
    else:
        logger.info("%s has no ground truth: no umap_truth.png or confusion figures", unannotated)
    return paths, colours


def _confusion_figures(store: Atlas, *, unannotated: tuple[str, ...], keys: tuple[str, str], out: Path,
                       dpi: int) -> list[Path]:
    """Ground truth of the unannotated experiments against their clusters and names (none without truth)."""
    cluster_key, name_key = keys
    paths: list[Path] = []

    def codes(column: str) -> tuple[np.ndarray, list[str]]:  # over the unannotated experiments, in store order
        parts = [store.categorical_codes(column, *store.experiment_ranges[e]) for e in unannotated]
        return np.concatenate([np.asarray(c) for c, _ in parts]), parts[0][1]

    truth_u, truth_cats = codes("cell_type")
    label = ", ".join(unannotated)
    if (np.asarray(truth_u) >= 0).any():
        cl, cl_cats = codes(cluster_key)
        nm, nm_cats = codes(name_key)
        paths.append(_heatmap(np.asarray(truth_u, dtype=np.int64), truth_cats, np.asarray(cl, dtype=np.int64), cl_cats,
                              title=f"{label}: ground truth against MARS clusters", xlabel="MARS cluster",
                              path=out / "confusion_cluster.png", dpi=dpi))
        paths.append(_heatmap(np.asarray(truth_u, dtype=np.int64), truth_cats, np.asarray(nm, dtype=np.int64), nm_cats,
                              title=f"{label}: ground truth against MARS names", xlabel="MARS name",
                              path=out / "confusion_name.png", dpi=dpi))
    return paths


_STAGING_PREFIX = ".mars-scale-staging-"  # as annotate's: a killed writer's leftovers are removed


def _write_back(store: Atlas, elements: dict[tuple[str, str], np.ndarray]) -> list[str]:
    """Write elements into the store: staged and sealed in full, then renamed into place.

    An element already there is moved aside first and put back if anything fails.
    """
    from anndata.io import write_elem
    import zarr

    root_dir = Path(store.path)
    fmt = int(store.root.metadata.zarr_format)
    with store_lock(root_dir):
        staging = root_dir / f"{_STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        try:
            for (group, name), value in elements.items():
                g = zarr.open_group(staging / group, mode="a", zarr_format=fmt)
                write_elem(g, name, value)
            for group in {group for group, _ in elements}:  # chunk and metadata checksums
                seal(staging / group)
            commit_elements(root_dir, staging, list(elements))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return [f"{group}/{name}" for group, name in elements]


def _umap(x: np.ndarray, *, n_neighbors: int, seed: int) -> np.ndarray:
    import umap  # slow import (numba): only when plotting

    k = int(min(n_neighbors, max(2, x.shape[0] - 1)))
    reducer = umap.UMAP(n_components=2, n_neighbors=k, random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(x), dtype=np.float32)
