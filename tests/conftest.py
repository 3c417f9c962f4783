"""Shared fixtures: small h5ad files and stores built in tmp dirs from fixed seeds."""

from __future__ import annotations

import os

# One OpenMP thread per process: torch and faiss each bring an OpenMP pool, and on a 2-core CI
# machine the two spin against each other (faiss k-means measured 10-20x slower). Set before
# numpy, torch or faiss are imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

# The real-data tests read the shared benchmark files (README, "Real data"): the folder named by
# $MARS_SCALE_DATA, else ../shared/data beside this checkout. They skip, naming the file and the
# folder, when a file is not there.
DATA_ENV = "MARS_SCALE_DATA"
SHARED_DATA = Path(os.environ.get(DATA_ENV) or Path(__file__).resolve().parents[2] / "shared" / "data")


def shared_file(name: str) -> Path:
    """The path of a shared data file, or a skip that says what is missing and how to point to it."""
    path = SHARED_DATA / name
    if not path.exists():
        where = f"${DATA_ENV}={os.environ[DATA_ENV]}" if os.environ.get(DATA_ENV) else f"{SHARED_DATA} (the default)"
        pytest.skip(f"real data: {name} is not in {where}; set {DATA_ENV} to the folder of the shared "
                    ".h5ad files (README, 'Real data')")
    return path


def make_adata(
    n_cells: int = 300,
    n_genes: int = 120,
    *,
    n_experiments: int = 3,
    n_types: int = 4,
    seed: int = 0,
    density_boost: float = 1.0,
) -> ad.AnnData:
    """A small counts matrix with cell-type structure (negative binomial-ish)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    exps = np.sort(rng.integers(0, n_experiments, n_cells))
    base = rng.lognormal(-1.0, 1.0, n_genes) * density_boost
    programme = rng.lognormal(0.0, 1.2, (n_types, n_genes))
    lib = rng.lognormal(0.0, 0.3, n_cells)
    mu = base[None, :] * programme[types] * lib[:, None]
    counts = rng.poisson(rng.gamma(2.0, mu / 2.0)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "experiment": pd.Categorical([f"exp{e}" for e in exps]),
            "cell_type": pd.Categorical([f"type{t}" for t in types]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return ad.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture
def small_adata() -> ad.AnnData:
    return make_adata()


@pytest.fixture
def small_h5ad(tmp_path, small_adata) -> Path:
    path = tmp_path / "small.h5ad"
    small_adata.write_h5ad(path)
    return path


@pytest.fixture
def small_store(tmp_path, small_h5ad) -> Path:
    from mars_scale.ingest import IngestConfig, ingest

    out = tmp_path / "small.zarr"
    ingest([small_h5ad], out, config=IngestConfig(experiment_key="experiment", label_key="cell_type"))
    return out


# ------------------------------------------------------------------------------- loader stores

LOADER_ROWS_PER_CHUNK = 64


def build_loader_store(
    directory: Path,
    *,
    zarr_format: int = 3,
    n_cells: int = 1500,
    seed: int = 7,
    compression_level: int = 3,
) -> Path:
    """A store of three experiments of unequal size (exp0 unannotated), about 64 cells per chunk.

    Chunks are small (about 4,500 non-zeros) so that the store has a couple of dozen of them
    and the loader has many blocks to permute. ``compression_level=0`` stores raw bytes.
    """
    from mars_scale.ingest import IngestConfig, ingest
    from mars_scale.store import StoreLayout

    adata = make_adata(n_cells, 200, n_experiments=3, seed=seed)
    cell_type = adata.obs["cell_type"].astype(object)
    cell_type[adata.obs["experiment"].astype(str) == "exp0"] = np.nan
    adata.obs["cell_type"] = pd.Categorical(cell_type)
    directory.mkdir(parents=True, exist_ok=True)
    h5ad = directory / "cells.h5ad"
    adata.write_h5ad(h5ad)
    layout = StoreLayout(
        rows_per_chunk=LOADER_ROWS_PER_CHUNK, zarr_format=zarr_format, chunks_per_shard=4,
        compression_level=compression_level,
    )
    return ingest(
        [h5ad],
        directory / f"atlas-v{zarr_format}{'' if compression_level else '-raw'}.zarr",
        config=IngestConfig(experiment_key="experiment", label_key="cell_type", layout=layout),
    )


@pytest.fixture(scope="session")
def loader_store(tmp_path_factory) -> Path:
    """A read-only store for loader tests (do not modify it: it is shared by the session)."""
    return build_loader_store(tmp_path_factory.mktemp("loader"))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say once, at the end, how many real-data tests skipped and how to run them."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "real data:" in str(getattr(r, "longrepr", ""))]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} real-data tests skipped: the shared .h5ad files are not in {SHARED_DATA}; "
            f"set {DATA_ENV} to their folder (README, 'Real data')", yellow=True)
