"""Tests of the synthetic atlas generator (mars_scale.simulate)."""

from __future__ import annotations

import dataclasses
import hashlib

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
    pbmc_like_config,
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
        ("n_subtypes", -1),
        ("n_subtypes", 1.5),
        ("subtype_closeness", 0.0),
        ("subtype_closeness", 1.2),
        ("condition_fraction", -0.1),
        ("condition_fraction", 1.0),
        ("condition_strength", -0.5),
        ("condition_strength", float("inf")),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ConfigError, match=f"SimulationConfig.{field}"):
        SimulationConfig(**{"n_genes": 2000, field: value})


def test_too_many_subtypes_are_refused():
    SimulationConfig(n_genes=200, n_cell_types=2, n_subtypes=50)  # type00_b ... type00_z
    with pytest.raises(ConfigError, match="SimulationConfig.n_subtypes.*at most 50"):
        SimulationConfig(n_genes=200, n_cell_types=2, n_subtypes=51)


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


# ---------------------------------------------------------------------------------------------
# Subtypes and a condition shared by all types (off by default)

# sha256 (first 16 hex digits) of the counts and cell types, recorded on main at 027097b,
# before subtypes and conditions existed. The default random streams must not change.
UNCHANGED = [
    (SMALL, "580e06f2693e9fb0", 170092),
    # 5 experiments x 16 types: more than 64 (experiment, type) pairs, so the library-size
    # calibration subsamples them with the model generator.
    (SimulationConfig(n_cells=1000, n_genes=300, n_experiments=5, n_cell_types=16, seed=11),
     "27c9346bae2c4f7f", 123982),
]


def _digest(sim: Simulator) -> tuple[str, int]:
    blocks = list(sim.iter_blocks(rows_per_block=700))
    x = sp.vstack([b.counts for b in blocks], format="csr")
    digest = hashlib.sha256()
    for arr in (x.indptr.astype(np.int64), x.indices.astype(np.int32), x.data.astype(np.int32),
                np.concatenate([b.cell_type for b in blocks]).astype(np.int32)):
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()[:16], x.nnz


@pytest.mark.parametrize(("config", "expected", "nnz"), UNCHANGED)
def test_new_options_at_their_defaults_leave_the_atlas_unchanged(config, expected, nnz):
    explicit = dataclasses.replace(config, n_subtypes=0, subtype_closeness=0.8,
                                   condition_fraction=0.0, condition_strength=1.0)
    sim = Simulator(explicit)
    assert _digest(sim) == (expected, nnz)
    assert list(sim.cell_types) == [f"type{t:02d}" for t in range(config.n_cell_types)]
    assert not sim.stimulated.any() and (sim.parent == -1).all()
    assert set(sim.obs_columns(0, np.zeros(3, dtype=np.int64))) == set()
    assert "parent_type" not in sim.describe() and "stimulated" not in sim.describe()


def _log_means(adata: anndata.AnnData, mask: np.ndarray | None = None) -> np.ndarray:
    """Mean log-normalised profile of each cell type (rows in category order)."""
    x = _lognorm(adata.X)
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    mask = np.ones(len(types), dtype=bool) if mask is None else mask
    return np.vstack([np.asarray(x[mask & (types == t)].mean(axis=0)).ravel()
                      for t in range(len(adata.obs["cell_type"].cat.categories))])


def _correlation_distance(profiles: np.ndarray) -> np.ndarray:
    return 1.0 - np.corrcoef(profiles)


SUBTYPED = SimulationConfig(n_cells=3000, n_genes=500, n_experiments=2, n_cell_types=6, seed=5,
                            n_subtypes=2, restricted_type_fraction=0.0)


@pytest.fixture(scope="module")
def subtyped():
    return simulate_anndata(SUBTYPED)


def test_subtypes_are_named_after_and_closest_to_their_parent(subtyped):
    sim = Simulator(SUBTYPED)
    names = list(subtyped.obs["cell_type"].cat.categories)
    assert names[:6] == [f"type{t:02d}" for t in range(6)]  # existing names unchanged
    parents = [name[: -len("_b")] for name in names[6:]]
    assert [name[-2:] for name in names[6:]] == ["_b", "_b"]
    assert len(set(parents)) == 2  # distinct parents
    assert [str(sim.cell_types[p]) for p in sim.parent[6:]] == parents
    assert sim.presence.all() and (sim.lineage[6:] == sim.lineage[sim.parent[6:]]).all()
    expected_parent = [name.removesuffix("_b") for name in subtyped.obs["cell_type"].astype(str)]
    assert list(subtyped.obs["parent_type"].astype(str)) == expected_parent
    assert list(subtyped.obs["parent_type"].cat.categories) == names[:6]
    assert list(subtyped.uns["simulation"]["parent_type"]) == [""] * 6 + parents

    counts = subtyped.obs["cell_type"].value_counts()
    assert (counts[names] > 100).all()
    dist = _correlation_distance(_log_means(subtyped))
    for sub, parent in zip(range(6, 8), parents):
        p = names.index(parent)
        others = [t for t in range(len(names)) if t not in (sub, p)]
        assert dist[sub, p] < 0.5 * dist[sub, others].min()
        # ... yet it is a different type: further from its parent than two halves of the
        # parent's cells are from each other.
        cells = np.flatnonzero(subtyped.obs["cell_type"].to_numpy() == parent)
        halves = np.zeros(subtyped.n_obs, dtype=bool)
        halves[cells[::2]] = True
        x = _lognorm(subtyped.X)
        a = np.asarray(x[halves].mean(axis=0)).ravel()
        b = np.asarray(x[cells[1::2]].mean(axis=0)).ravel()
        assert dist[sub, p] > 2 * (1 - np.corrcoef(a, b)[0, 1])


def test_closer_subtypes_are_closer_to_their_parent():
    distances = {}
    for closeness in (0.95, 0.5):
        adata = simulate_anndata(dataclasses.replace(SUBTYPED, subtype_closeness=closeness))
        dist = _correlation_distance(_log_means(adata))
        sim = Simulator(dataclasses.replace(SUBTYPED, subtype_closeness=closeness))
        distances[closeness] = np.array([dist[s, sim.parent[s]] for s in (6, 7)])
    assert (distances[0.95] < 0.7 * distances[0.5]).all()


def test_closeness_one_gives_the_parents_programme():
    sim = Simulator(dataclasses.replace(SUBTYPED, subtype_closeness=1.0))
    profiles = sim._profiles(0)
    for s in (6, 7):
        np.testing.assert_array_equal(profiles[s], profiles[sim.parent[s]])
    other = Simulator(dataclasses.replace(SUBTYPED, subtype_closeness=0.9))._profiles(0)
    assert not np.array_equal(other[6], other[sim.parent[6]])


def test_more_subtypes_than_types_reuse_parents_and_restricted_subtypes_stay_inside():
    config = SimulationConfig(n_cells=400, n_genes=200, n_experiments=4, n_cell_types=3,
                              n_subtypes=5, restricted_type_fraction=0.5, seed=2)
    sim = Simulator(config)
    parents = sim.parent[3:]
    assert sorted(parents[:3]) == [0, 1, 2]  # distinct parents first
    names = [str(n) for n in sim.cell_types[3:]]
    for name, p in zip(names, parents):
        assert name.startswith(f"{sim.cell_types[p]}_")
    assert len(set(names)) == 5 and {n[-1] for n in names} == {"b", "c"}
    for s, p in zip(range(3, 8), parents):
        assert not (sim.presence[:, s] & ~sim.presence[:, p]).any()  # only where the parent is
        assert sim.presence[:, s].any()
    # round(0.5 * 5) = 2 subtypes occur in fewer experiments than their parent (whose parent
    # occurs in at least two)
    fewer = [s for s, p in zip(range(3, 8), parents)
             if sim.presence[:, s].sum() < sim.presence[:, p].sum()]
    assert len(fewer) >= 1
    assert np.allclose(sim.composition.sum(axis=1), 1.0)
    assert not (sim.composition[~sim.presence] > 0).any()


CONDITIONED = SimulationConfig(n_cells=3000, n_genes=500, n_experiments=4, n_cell_types=6, seed=9,
                               restricted_type_fraction=0.0, condition_fraction=0.5)


@pytest.fixture(scope="module")
def conditioned():
    return simulate_anndata(CONDITIONED)


def _condition_response(adata: anndata.AnnData, stimulated: np.ndarray,
                        genes: np.ndarray) -> np.ndarray:
    """Per type: pseudo-bulk log fold-change, stimulated over control, of ``genes`` less that
    of the other genes (which the renormalisation and the batch effects move)."""
    x = sp.csr_matrix(adata.X, dtype=np.float64)
    x = sp.csr_matrix(sp.diags(1.0 / np.asarray(x.sum(axis=1)).ravel()) @ x)
    types = adata.obs["cell_type"].cat.codes.to_numpy()
    lfc = np.vstack([
        np.log(np.asarray(x[stimulated & (types == t)].mean(axis=0)).ravel() + 1e-6)
        - np.log(np.asarray(x[~stimulated & (types == t)].mean(axis=0)).ravel() + 1e-6)
        for t in range(len(adata.obs["cell_type"].cat.categories))
    ])
    expressed = np.asarray((x > 0).sum(axis=0)).ravel() > 100
    return lfc[:, genes & expressed].mean(axis=1) - lfc[:, ~genes & expressed].mean(axis=1)


def test_stimulated_experiments_raise_the_condition_genes_in_every_type(conditioned):
    sim = Simulator(CONDITIONED)
    assert sim.stimulated.sum() == 2
    exp = conditioned.obs["experiment"].cat.codes.to_numpy()
    stimulated = sim.stimulated[exp]
    assert list(conditioned.obs["condition"].astype(str)) == [
        "stimulated" if s else "control" for s in stimulated
    ]
    assert list(conditioned.uns["simulation"]["stimulated"]) == list(sim.stimulated)
    genes = np.isin(conditioned.var_names, conditioned.uns["simulation"]["condition_genes"])
    assert genes.sum() == 25  # 5 % of the genes

    response = _condition_response(conditioned, stimulated, genes)
    assert (response > 0.3).all()  # every type responds
    # ... each with its own magnitude, as drawn
    assert response.max() > 1.4 * response.min()
    assert np.corrcoef(response, sim.condition_response)[0, 1] > 0.9
    # Without the condition, the same experiments and genes show no response.
    control = simulate_anndata(dataclasses.replace(CONDITIONED, condition_fraction=0.0))
    assert "condition" not in control.obs
    assert np.abs(_condition_response(control, stimulated, genes)).max() < 0.15


@pytest.mark.parametrize(("n_experiments", "fraction", "expected"),
                         [(4, 0.1, 1), (4, 0.5, 2), (4, 0.99, 3), (2, 0.5, 1), (1, 0.5, 0)])
def test_some_but_never_all_experiments_are_stimulated(n_experiments, fraction, expected):
    config = SimulationConfig(n_cells=200, n_genes=100, n_experiments=n_experiments,
                              n_cell_types=3, condition_fraction=fraction, seed=1)
    sim = Simulator(config)
    assert sim.stimulated.sum() == expected
    assert list(sim.obs_columns(0, np.array([0, 1]))["condition"][0]) == ["control",
                                                                          "stimulated"]


def test_subtypes_and_condition_are_deterministic_and_independent(tmp_path):
    config = dataclasses.replace(SUBTYPED, n_cells=1000, n_experiments=3, condition_fraction=0.4)
    a, b = simulate_anndata(config), simulate_anndata(config)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
    assert list(a.obs.columns) == ["experiment", "cell_type", "parent_type", "condition"]
    written = anndata.read_h5ad(write_h5ad(tmp_path / "a.h5ad", config, rows_per_block=123))
    assert (written.X != a.X).nnz == 0 and written.obs.equals(a.obs)
    parts = [anndata.read_h5ad(p) for p in write_h5ad_per_experiment(tmp_path / "per", config)]
    for key in ("parent_type", "condition"):
        stacked = np.concatenate([part.obs[key].astype(str).to_numpy() for part in parts])
        np.testing.assert_array_equal(stacked, a.obs[key].astype(str).to_numpy())
    # The condition's draws do not depend on the subtypes, nor the subtypes' on the condition.
    with_both = Simulator(config)
    condition_only = Simulator(dataclasses.replace(config, n_subtypes=0))
    subtypes_only = Simulator(dataclasses.replace(config, condition_fraction=0.0))
    np.testing.assert_array_equal(with_both.stimulated, condition_only.stimulated)
    np.testing.assert_array_equal(with_both.condition_genes, condition_only.condition_genes)
    np.testing.assert_array_equal(with_both.condition_response[:6],
                                  condition_only.condition_response)
    np.testing.assert_array_equal(with_both.parent, subtypes_only.parent)
    np.testing.assert_array_equal(with_both._logfc, subtypes_only._logfc)
    other = simulate_anndata(dataclasses.replace(config, seed=config.seed + 1))
    assert (other.X != a.X).nnz > 0


def test_condition_specificity_raises_each_lineages_own_genes_only_in_its_stimulated_cells():
    config = dataclasses.replace(CONDITIONED, n_subtypes=2, condition_specificity=1.0)
    shared_only = dataclasses.replace(config, condition_specificity=0.0)
    sim, base = Simulator(config), Simulator(shared_only)
    # The shared programme and everything else are drawn as without the type-specific genes.
    np.testing.assert_array_equal(sim.stimulated, base.stimulated)
    np.testing.assert_array_equal(sim.condition_genes, base.condition_genes)
    np.testing.assert_array_equal(sim.condition_response, base.condition_response)
    for e in range(config.n_experiments):  # only the stimulated experiments' profiles change
        same = np.array_equal(sim._profiles(e), base._profiles(e))
        assert same != bool(sim.stimulated[e]), e
    adata = simulate_anndata(config)
    stimulated = sim.stimulated[adata.obs["experiment"].cat.codes.to_numpy()]

    own = sim._specific_condition > 0
    assert own.sum(axis=1)[0] == 25  # as many as the shared programme's 25 genes
    subtypes = np.flatnonzero(sim.parent >= 0)
    np.testing.assert_array_equal(own[subtypes], own[sim.parent[subtypes]])  # a lineage's genes
    shared = np.isin(np.arange(config.n_genes), sim.condition_genes)
    for t in range(config.n_cell_types):
        mine = own[t] & ~shared & ~np.delete(own[:config.n_cell_types], t, axis=0).any(axis=0)
        response = _condition_response(adata, stimulated, mine)
        others = np.delete(np.arange(config.n_cell_types), t)
        # the type (and its subtypes) raise them; the other lineages do not
        assert response[t] > 0.3, (t, response)
        assert np.abs(response[others]).max() < 0.5 * response[t], (t, response)


def test_pbmc_like_config():
    config = pbmc_like_config(n_cells=2000, seed=3)
    assert (config.n_cells, config.n_genes, config.n_experiments, config.seed) == (2000, 2000, 4, 3)
    sim = Simulator(config)
    assert len(sim.cell_types) == 7 and (sim.parent >= 0).sum() == 2
    assert sim.presence.all()  # every type in every experiment
    assert sim.stimulated.sum() == 2
    assert config.subtype_closeness == pytest.approx(0.7)
