"""`mars-scale simulate` and the one-pass store writer it streams into (`ingest_blocks`)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from mars_scale.cli import main
from mars_scale.errors import ConfigError, InputError
from mars_scale.ingest import CellBlock, IngestConfig, ingest_blocks
from mars_scale.store import SPEC_VERSION, open_store

SIZE = ["--cells", "1500", "--genes", "200", "--experiments", "3", "--cell-types", "6", "--seed", "3"]


def run(*args: str):
    return CliRunner().invoke(main, ["-q", *args])


@pytest.fixture(scope="module")
def direct_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "atlas.zarr"
    result = run("simulate", "-o", str(path), *SIZE)
    assert result.exit_code == 0, result.output
    return path


def test_store_opens_with_experiments_and_types(direct_store):
    atlas = open_store(direct_store)
    assert atlas.spec_version == SPEC_VERSION
    assert (atlas.n_cells, atlas.n_genes) == (1500, 200)
    assert atlas.experiments == ["exp00", "exp01", "exp02"]
    assert atlas.cell_types == [f"type{t:02d}" for t in range(6)]
    summary = atlas.summary()
    assert [e["n_cells"] for e in summary["experiments"]] == [500, 500, 500]
    assert all(e["annotated_fraction"] == 1.0 for e in summary["experiments"])

    adata = ad.read_zarr(direct_store)  # anndata opens it
    assert adata.shape == (1500, 200) and sp.issparse(adata.X) and adata.X.format == "csr"
    presence = np.asarray(adata.uns["simulation"]["presence"], dtype=bool)
    seen = np.zeros_like(presence)
    for e, exp in enumerate(atlas.experiments):
        for name in summary["experiments"][e]["cell_types"]:
            seen[e, atlas.cell_types.index(name)] = True
    # some types are missing from some experiments, exactly where the simulation put none
    assert not seen.all()
    assert not (seen & ~presence).any()
    assert (seen.any(axis=0)).sum() >= 5
    assert adata.uns["mars_scale"]["input_kind"] == "counts"
    assert np.array_equal(adata.X.data, np.round(adata.X.data)) and adata.X.data.min() > 0


def test_direct_store_equals_h5ad_then_ingest(tmp_path, direct_store):
    h5ad = tmp_path / "atlas.h5ad"
    assert run("simulate", "-o", str(h5ad), *SIZE).exit_code == 0
    via = tmp_path / "via.zarr"
    result = run("ingest", str(h5ad), "-o", str(via), "--experiment-key", "experiment",
                 "--label-key", "cell_type", "--min-cells", "0")
    assert result.exit_code == 0, result.output
    a, b = ad.read_zarr(direct_store), ad.read_zarr(via)
    # ingest drops genes expressed in no cell; the one-pass writer keeps every gene
    assert set(b.var_names) <= set(a.var_names)
    assert (a.var.loc[a.var_names.difference(b.var_names), "n_cells"] == 0).all()
    a = a[:, b.var_names]
    assert list(a.obs_names) == list(b.obs_names)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    for key in ("experiment", "cell_type", "n_counts", "n_genes"):
        np.testing.assert_array_equal(a.obs[key].astype(str).values, b.obs[key].astype(str).values)
    np.testing.assert_array_equal(a.var["n_cells"].values, b.var["n_cells"].values)
    np.testing.assert_allclose(a.var["mean"].values, b.var["mean"].values, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(a.var["std"].values, b.var["std"].values, rtol=1e-10, atol=1e-12)
    assert open_store(direct_store).experiment_ranges == open_store(via).experiment_ranges


def test_per_experiment_h5ad_files_ingest_as_experiments(tmp_path):
    folder = tmp_path / "files"
    result = run("simulate", "-o", str(folder), "--per-experiment", *SIZE)
    assert result.exit_code == 0, result.output
    files = sorted(folder.glob("*.h5ad"))
    assert [f.name for f in files] == ["exp00.h5ad", "exp01.h5ad", "exp02.h5ad"]
    assert [ad.read_h5ad(f).n_obs for f in files] == [500, 500, 500]
    out = tmp_path / "a.zarr"
    assert run("ingest", *map(str, files), "-o", str(out), "--label-key", "cell_type").exit_code == 0
    assert open_store(out).experiments == ["exp00", "exp01", "exp02"]


def test_same_seed_same_store_other_seed_differs(tmp_path, direct_store):
    again = tmp_path / "again.zarr"
    assert run("simulate", "-o", str(again), "--format", "zarr", "--zarr-format", "2", *SIZE).exit_code == 0
    other = tmp_path / "other.zarr"
    assert run("simulate", "-o", str(other), *SIZE[:-1], "4").exit_code == 0
    a, b, c = (open_store(p).read_rows(0, 1500) for p in (direct_store, again, other))
    assert (a != b).nnz == 0
    assert (a != c).nnz > 0


def test_bad_options_are_one_line_errors(tmp_path, direct_store):
    result = run("simulate", "-o", str(direct_store), *SIZE)
    assert result.exit_code == 2 and "already exists" in result.output
    result = run("simulate", "-o", str(tmp_path / "x.zarr"), "--cells", "0")
    assert result.exit_code == 2 and "n_cells" in result.output and "Traceback" not in result.output
    result = run("simulate", "-o", str(tmp_path / "x.zarr"), "--format", "zarr", "--per-experiment")
    assert result.exit_code == 2 and "--per-experiment" in result.output
    assert not (tmp_path / "x.zarr").exists()


def test_subtype_and_condition_options(tmp_path):
    path = tmp_path / "a.h5ad"
    result = run("simulate", "-o", str(path), *SIZE, "--subtypes", "2", "--subtype-closeness", "0.6",
                 "--condition-fraction", "0.5", "--condition-strength", "1.5", "--condition-specificity", "0.5")
    assert result.exit_code == 0, result.output
    adata = ad.read_h5ad(path)
    assert list(adata.obs.columns) == ["experiment", "cell_type", "parent_type", "condition"]
    config = adata.uns["simulation"]["config"]
    assert (config["n_subtypes"], config["subtype_closeness"]) == (2, 0.6)
    assert (config["condition_fraction"], config["condition_strength"], config["condition_specificity"]) == (0.5, 1.5, 0.5)
    subtypes = [t for t in adata.obs["cell_type"].cat.categories if t.endswith("_b")]
    assert len(subtypes) == 2
    for name in subtypes:
        assert set(adata.obs.loc[adata.obs["cell_type"] == name, "parent_type"]) == {name[:-2]}
    assert sorted(set(adata.obs["condition"])) == ["control", "stimulated"]
    result = run("simulate", "-o", str(tmp_path / "b.h5ad"), *SIZE, "--subtype-closeness", "0")
    assert result.exit_code == 2 and "subtype_closeness" in result.output
    assert "Traceback" not in result.output
    help_text = " ".join(run("simulate", "--help").output.split())
    for flag, default in (("--subtypes", "0"), ("--subtype-closeness", "0.8"),
                          ("--condition-fraction", "0.0"), ("--condition-strength", "1.0")):
        segment = help_text.split(f"{flag} ")[1].split(" --")[0]  # this option's help
        assert f"[default: {default}]" in segment, segment


def test_overwrite_replaces(tmp_path):
    path = tmp_path / "a.zarr"
    small = ["--cells", "300", "--genes", "50", "--experiments", "2", "--cell-types", "3"]
    assert run("simulate", "-o", str(path), *small).exit_code == 0
    assert run("simulate", "-o", str(path), *small[:1], "400", *small[2:], "--overwrite").exit_code == 0
    assert open_store(path).n_cells == 400
    assert [p.name for p in tmp_path.iterdir()] == ["a.zarr"]  # no temporary left behind


# ---------------------------------------------------------------------------------------------
# ingest_blocks


def _blocks(rows_per_experiment=(3, 2), n_genes=4):
    rng = np.random.default_rng(0)
    out, start = [], 0
    for e, n in enumerate(rows_per_experiment):
        counts = sp.csr_matrix(rng.integers(0, 3, (n, n_genes)).astype(np.int32))
        names = np.array([f"c{i}" for i in range(start, start + n)], dtype=object)
        out.append(CellBlock(counts, e, np.full(n, e % 2, dtype=np.int32), names))
        start += n
    return out


def _write(blocks, path, **kwargs):
    return ingest_blocks(blocks, path, genes=["g0", "g1", "g2", "g3"], experiments=["a", "b"],
                         cell_types=["t0", "t1"], **kwargs)


def test_ingest_blocks_roundtrip_drops_empty_cells(tmp_path):
    blocks = _blocks()
    dense = np.vstack([b.counts.toarray() for b in blocks])
    dense[1] = 0  # a cell without counts is dropped, as ingest does
    blocks[0] = CellBlock(sp.csr_matrix(dense[:3]), 0, blocks[0].cell_type, blocks[0].obs_names)
    path = _write(blocks, tmp_path / "a.zarr")
    adata = ad.read_zarr(path)
    keep = dense.sum(axis=1) > 0
    np.testing.assert_array_equal(adata.X.toarray(), dense[keep])
    assert list(adata.obs_names) == [f"c{i}" for i in np.flatnonzero(keep)]
    assert open_store(path).experiment_ranges == {"a": (0, int(keep[:3].sum())), "b": (int(keep[:3].sum()), int(keep.sum()))}
    assert list(adata.uns["mars_scale"]["sources"]["name"]) == []


def test_ingest_blocks_refuses_bad_streams(tmp_path):
    with pytest.raises(ConfigError, match="min_cells"):
        _write(_blocks(), tmp_path / "a.zarr", config=IngestConfig())
    with pytest.raises(InputError, match="grouped by experiment"):
        _write(_blocks()[::-1], tmp_path / "a.zarr")
    bad = _blocks()
    bad[1] = CellBlock(bad[1].counts * 0.5, 1, bad[1].cell_type, bad[1].obs_names)
    with pytest.raises(InputError, match="non-integer"):
        _write(bad, tmp_path / "a.zarr")
    with pytest.raises(InputError, match="experiment 'b' has no cells"):
        _write(_blocks()[:1], tmp_path / "a.zarr")
    assert not (tmp_path / "a.zarr").exists()
    assert list(tmp_path.iterdir()) == []
