"""Shared fixtures: small h5ad files and stores built in tmp dirs from fixed seeds."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
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
