"""Tests of the synthetic atlas generator (mars_scale.simulate)."""

from __future__ import annotations

import anndata
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from mars_scale import simulate
from mars_scale.errors import ConfigError, InputError
from mars_scale.simulate import (
    SimulationConfig,
    Simulator,
    _sample_counts,
    simulate_anndata,
    write_h5ad,
    write_h5ad_per_experiment,
)

SMALL = SimulationConfig(n_cells=1200, n_genes=400, n_experiments=3, n_cell_types=6, seed=7)


def _all_counts(sim: Simulator, **kwargs) -> sp.csr_matrix:
    return sp.vstack([b.counts for b in sim.iter_blocks(**kwargs)], format="csr")


def _lognorm(x: sp.csr_matrix) -> sp.csr_matrix:
    x = sp.csr_matrix(x, dtype=np.float64)
    totals = np.asarray(x.sum(axis=1)).ravel()
    x = sp.csr_matrix(sp.diags(1e4 / np.maximum(totals, 1)) @ x)
    x.data = np.log1p(x.data)
    return x


@pytest.fixture(scope="module")
def small_h5ad(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "small.h5ad"
    write_h5ad(path, SMALL, rows_per_block=250)
    return path


def test_read_h5ad_opens_with_matching_shapes(small_h5ad):
    adata = anndata.read_h5ad(small_h5ad)
    assert adata.shape == (SMALL.n_cells, SMALL.n_genes)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    assert list(adata.obs.columns) == ["experiment", "cell_type"]
    assert adata.obs["experiment"].dtype == "category"
    assert adata.obs["cell_type"].dtype == "category"
    assert list(adata.obs["experiment"].cat.categories) == ["exp00", "exp01", "exp02"]
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert adata.var_names[0] == "gene00000"
    # cells are grouped by experiment
    codes = adata.obs["experiment"].cat.codes.to_numpy()
    assert np.all(np.diff(codes) >= 0)
    sim_uns = adata.uns["simulation"]
    assert sim_uns["config"]["seed"] == SMALL.seed
    assert sim_uns["config"]["n_cells"] == SMALL.n_cells
    assert sim_uns["presence"].shape == (SMALL.n_experiments, SMALL.n_cell_types)


def test_h5_layout_matches_anndata_encoding(small_h5ad):
    with h5py.File(small_h5ad, "r") as f:
        assert f.attrs["encoding-type"] == "anndata"
        x = f["X"]
        assert x.attrs["encoding-type"] == "csr_matrix"
        assert x.attrs["encoding-version"] == "0.1.0"
        assert tuple(x.attrs["shape"]) == (SMALL.n_cells, SMALL.n_genes)
        assert x["data"].dtype == np.float32
        assert x["indices"].dtype == np.int32
        assert x["indptr"].dtype == np.int64
        assert x["data"].maxshape == (None,) and x["data"].chunks is not None
        assert x["data"].compression is None
        assert f["obs"].attrs["encoding-type"] == "dataframe"
        assert f["obs/cell_type"].attrs["encoding-type"] == "categorical"
        backed = anndata.io.sparse_dataset(x)
        assert backed.shape == (SMALL.n_cells, SMALL.n_genes)
        rows = backed[100:140]
    full = anndata.read_h5ad(small_h5ad).X
    assert (rows != full[100:140]).nnz == 0


def test_counts_are_non_negative_integers(small_h5ad):
    x = anndata.read_h5ad(small_h5ad).X
    assert x.nnz > 0
    assert np.all(x.data > 0)  # no explicit zeros
    np.testing.assert_array_equal(x.data, np.round(x.data))
    assert x.has_sorted_indices


def test_deterministic_for_a_seed_and_independent_of_block_size():
    a = _all_counts(Simulator(SMALL), rows_per_block=97)
    b = _all_counts(Simulator(SMALL), rows_per_block=5000)
    assert (a != b).nnz == 0
    other = _all_counts(Simulator(SimulationConfig(**{**SMALL.__dict__, "seed": 8})),
                        rows_per_block=5000)
    assert (a != other).nnz > 0


def test_worker_processes_give_the_same_cells(monkeypatch):
    monkeypatch.setattr(simulate, "_TILE_NNZ", 5120)  # 256-cell tiles
    config = SimulationConfig(n_cells=1200, n_genes=200, n_experiments=2, n_cell_types=4,
                              seed=3, mean_nnz_per_cell=20)
    sim = Simulator(config)
    assert sim.tile_cells == 256  # several tiles per experiment
    serial = _all_counts(sim, rows_per_block=100)
    parallel = _all_counts(sim, rows_per_block=100, n_jobs=2)
    assert (serial != parallel).nnz == 0


def test_files_are_deterministic(tmp_path, small_h5ad):
    again = write_h5ad(tmp_path / "again.h5ad", SMALL, rows_per_block=1000)
    a, b = anndata.read_h5ad(small_h5ad), anndata.read_h5ad(again)
    assert (a.X != b.X).nnz == 0
    assert a.obs.equals(b.obs)


@pytest.mark.parametrize(
    ("n_genes", "nnz"),
    [(2000, None), (400, 50.0)],
)
def test_mean_nnz_per_cell_near_target(n_genes, nnz):
    config = SimulationConfig(n_cells=2000, n_genes=n_genes, seed=1, mean_nnz_per_cell=nnz)
    counts = _all_counts(Simulator(config), rows_per_block=2000)
    target = config.target_nnz_per_cell
    if nnz is None:
        assert 0.10 <= target / n_genes <= 0.20  # droplet-like density at 2,000 genes
    assert abs(counts.nnz / config.n_cells - target) < 0.25 * target


def test_default_density_at_20000_genes():
    config = SimulationConfig(n_cells=256, n_genes=20_000, n_experiments=1, seed=2)
    assert config.target_nnz_per_cell == pytest.approx(1000)
    counts = _all_counts(Simulator(config), rows_per_block=256)
    assert abs(counts.nnz / 256 - 1000) < 250


def test_restricted_types_are_absent_as_recorded(small_h5ad):
    adata = anndata.read_h5ad(small_h5ad)
    sim = Simulator(SMALL)
    presence = adata.uns["simulation"]["presence"]
    np.testing.assert_array_equal(presence, sim.presence)
    assert not presence.all()  # some type is missing from some experiment
    assert presence.any(axis=1).all()  # every experiment has some type
    restricted = sim.restricted_cell_types()
    assert sorted(restricted) == sorted(adata.uns["simulation"]["restricted_cell_types"])
    observed = (
        adata.obs.groupby(["experiment", "cell_type"], observed=False).size().unstack()
    )
    for e, exp in enumerate(sim.experiments):
        for t, cell_type in enumerate(sim.cell_types):
            if not presence[e, t]:
                assert observed.loc[exp, cell_type] == 0
    for cell_type, experiments in restricted.items():
        seen = set(adata.obs.loc[adata.obs["cell_type"] == cell_type, "experiment"])
        assert seen <= set(experiments)


def test_cell_types_are_separable_across_experiments():
    config = SimulationConfig(n_cells=2000, n_genes=1000, n_experiments=2, n_cell_types=5,
                              seed=4, restricted_type_fraction=0.0)
    adata = simulate_anndata(config)
    x = _lognorm(adata.X)
    exp = adata.obs["experiment"].cat.codes.to_numpy()
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    train, test = exp == 0, exp == 1
    labels = np.unique(types[train])
    centroids = np.vstack([np.asarray(x[train & (types == t)].mean(axis=0)) for t in labels])
    xt = x[test].toarray()
    dist = ((xt[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
    accuracy = np.mean(labels[dist.argmin(axis=1)] == types[test])
    assert accuracy > 0.8


def test_blocks_are_bounded_and_cover_every_row():
    sim = Simulator(SMALL)
    for rows in (1, 50, 333):
        next_start = 0
        for block in sim.iter_blocks(rows_per_block=rows):
            n = block.counts.shape[0]
            assert 1 <= n <= rows
            assert block.start == next_start
            lo, hi = sim.experiment_offsets[block.experiment: block.experiment + 2]
            assert lo <= block.start and block.stop <= hi  # one experiment per block
            assert len(block.cell_type) == n
            next_start = block.stop
        assert next_start == SMALL.n_cells


@pytest.mark.parametrize("layout", ["csc", "dense"])
def test_other_layouts_read_back_equal(tmp_path, small_h5ad, layout):
    path = write_h5ad(tmp_path / f"{layout}.h5ad", SMALL, layout=layout, dtype="int32")
    adata = anndata.read_h5ad(path)
    reference = anndata.read_h5ad(small_h5ad)
    if layout == "csc":
        assert sp.issparse(adata.X) and adata.X.format == "csc"
        with h5py.File(path, "r") as f:
            assert anndata.io.sparse_dataset(f["X"]).format == "csc"
        x = adata.X.toarray()
    else:
        assert isinstance(adata.X, np.ndarray)
        x = adata.X
    assert x.dtype == np.int32
    np.testing.assert_array_equal(x, reference.X.toarray())
    assert adata.obs.equals(reference.obs)


def test_per_experiment_files_match_single_file(tmp_path, small_h5ad):
    paths = write_h5ad_per_experiment(tmp_path / "per", SMALL, rows_per_block=128)
    assert [p.name for p in paths] == ["exp00.h5ad", "exp01.h5ad", "exp02.h5ad"]
    parts = [anndata.read_h5ad(p) for p in paths]
    for part, name in zip(parts, ["exp00", "exp01", "exp02"]):
        assert list(part.obs["experiment"].cat.categories) == [name]
        assert (part.obs["experiment"] == name).all()
    whole = anndata.read_h5ad(small_h5ad)
    stacked = sp.vstack([p.X for p in parts], format="csr")
    assert (stacked != whole.X).nnz == 0
    assert list(np.concatenate([p.obs_names for p in parts])) == list(whole.obs_names)


def test_simulate_anndata_matches_file(small_h5ad):
    adata = simulate_anndata(SMALL)
    reference = anndata.read_h5ad(small_h5ad)
    assert (adata.X != reference.X).nnz == 0
    assert adata.obs.equals(reference.obs)


def test_sampler_matches_negative_binomial():
    rng = np.random.default_rng(0)
    n_genes, n_cells = 40, 40_000
    profiles = np.exp(rng.normal(0.0, 2.0, (2, n_genes)))
    profiles /= profiles.sum(axis=1, keepdims=True)
    theta = np.exp(rng.normal(np.log(3.0), 0.5, n_genes))
    types = rng.integers(0, 2, n_cells)
    log_lib = np.log(200.0) + 0.5 * rng.standard_normal(n_cells)
    counts = _sample_counts(rng, profiles, theta, types, log_lib).toarray()
    mean = np.exp(log_lib)[:, None] * profiles[types]
    p_zero = (1.0 + mean / theta) ** -theta
    expected_zero = p_zero.mean(axis=0)
    se_zero = np.sqrt((p_zero * (1 - p_zero)).sum(axis=0)) / n_cells
    z_zero = ((counts == 0).mean(axis=0) - expected_zero) / se_zero
    variance = mean + mean**2 / theta
    z_mean = (counts.mean(axis=0) - mean.mean(axis=0)) / (np.sqrt(variance.sum(axis=0)) / n_cells)
    assert np.abs(z_zero).max() < 5
    assert np.abs(z_mean).max() < 5


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_cells", 0),
        ("n_genes", 1),
        ("n_experiments", 0),
        ("n_cell_types", 2.5),
        ("seed", -1),
        ("mean_nnz_per_cell", 10_000.0),
        ("library_size_sd", -0.1),
        ("inverse_dispersion", 0.0),
        ("programme_gene_fraction", 1.5),
        ("fold_change", 0.5),
        ("batch_effect_strength", float("nan")),
        ("restricted_type_fraction", 1.0),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"SimulationConfig.{field}"):
        SimulationConfig(**{"n_genes": 2000, field: value})


def test_config_errors_are_value_errors():
    with pytest.raises(ValueError, match="n_experiments"):
        SimulationConfig(n_cells=3, n_experiments=4)


def test_writer_refuses_to_overwrite(tmp_path):
    path = tmp_path / "a.h5ad"
    config = SimulationConfig(n_cells=50, n_genes=30, n_experiments=2, n_cell_types=2)
    write_h5ad(path, config)
    with pytest.raises(InputError, match="a.h5ad.*overwrite"):
        write_h5ad(path, config)
    write_h5ad(path, config, overwrite=True)
    assert anndata.read_h5ad(path).n_obs == 50
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5ad"]  # no temporary left


@pytest.mark.parametrize(
    ("option", "value"),
    [("layout", "coo"), ("dtype", "int8"), ("rows_per_block", 0), ("compression", "zstd"),
     ("n_jobs", 0)],
)
def test_writer_rejects_bad_options(tmp_path, option, value):
    with pytest.raises(InputError, match=option):
        write_h5ad(tmp_path / "x.h5ad", SMALL, **{option: value})
    assert not (tmp_path / "x.h5ad").exists()
