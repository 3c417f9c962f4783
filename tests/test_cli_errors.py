"""Bad input to ``mars-scale ingest``: one line naming the problem, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from conftest import make_adata
from mars_scale.cli import main


def _run(args):
    return CliRunner().invoke(main, args)


def _write(path, adata):
    adata.write_h5ad(path)
    return path


def _assert_clean_failure(result, tmp_path, before, *patterns):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert "Traceback" not in result.output
    for p in patterns:
        assert p in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def _bad_values(tmp_path, value):
    a = make_adata(40, 20, seed=1)
    x = a.X.toarray()
    x[5, 3] = value
    a.X = sp.csr_matrix(x)
    return _write(tmp_path / "bad.h5ad", a)


def _no_x(tmp_path):
    p = _write(tmp_path / "nox.h5ad", make_adata(30, 10))
    with h5py.File(p, "r+") as f:
        del f["X"]
    return p


def _dup_genes(tmp_path):
    a = make_adata(30, 10)
    a.var_names = ["g0", "g1", "g1"] + [f"x{i}" for i in range(7)]
    return _write(tmp_path / "dup.h5ad", a)


def _empty(tmp_path):
    a = ad.AnnData(sp.csr_matrix((0, 10), dtype=np.float32))
    a.var_names = [f"g{i}" for i in range(10)]
    return _write(tmp_path / "empty.h5ad", a)


def _not_hdf5(tmp_path):
    p = tmp_path / "notes.h5ad"
    p.write_text("cell,gene\n1,2\n")
    return p


CASES = {
    "missing file": (lambda t: t / "missing.h5ad", [], ["missing.h5ad", "no such file"]),
    "not HDF5": (_not_hdf5, [], ["notes.h5ad", "not a readable HDF5"]),
    "no X": (_no_x, [], ["nox.h5ad", "has no X"]),
    "unknown obs column": (
        lambda t: _write(t / "a.h5ad", make_adata(30, 10)),
        ["--experiment-key", "donor"],
        ["a.h5ad", "'donor' does not exist", "experiment, cell_type"],
    ),
    "unknown label column": (
        lambda t: _write(t / "a.h5ad", make_adata(30, 10)),
        ["--label-key", "celltype"],
        ["'celltype' does not exist", "available: experiment, cell_type"],
    ),
    "duplicate genes": (_dup_genes, [], ["dup.h5ad", "duplicate gene names", "g1"]),
    "NaN": (lambda t: _bad_values(t, np.nan), [], ["bad.h5ad", "NaN", "row 5"]),
    "inf": (lambda t: _bad_values(t, np.inf), [], ["bad.h5ad", "infinite"]),
    "negative": (lambda t: _bad_values(t, -2.0), [], ["bad.h5ad", "negative", "row 5"]),
    "empty file": (_empty, [], ["empty.h5ad", "empty"]),
    "layer missing": (
        lambda t: _write(t / "a.h5ad", make_adata(30, 10)), ["--layer", "counts"], ["has no layer 'counts'"]
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(tmp_path, case):
    make, extra, patterns = CASES[case]
    src = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run(["ingest", str(src), "-o", str(tmp_path / "out.zarr"), *extra])
    _assert_clean_failure(result, tmp_path, before, *patterns)


def test_no_shared_genes(tmp_path):
    a, b = make_adata(30, 10, seed=1), make_adata(30, 10, seed=2)
    b.var_names = [f"other{i}" for i in range(10)]
    pa, pb = _write(tmp_path / "a.h5ad", a), _write(tmp_path / "b.h5ad", b)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run(["ingest", str(pa), str(pb), "-o", str(tmp_path / "out.zarr")])
    _assert_clean_failure(result, tmp_path, before, "no genes are shared", "a.h5ad", "b.h5ad")


def test_target_exists_is_left_alone(tmp_path):
    src = _write(tmp_path / "a.h5ad", make_adata(30, 10))
    out = tmp_path / "out.zarr"
    assert _run(["ingest", str(src), "-o", str(out), "--min-cells", "0"]).exit_code == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run(["ingest", str(src), "-o", str(out)])
    _assert_clean_failure(result, tmp_path, before, "out.zarr", "already exists", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp


def test_info_on_a_non_store(tmp_path):
    result = _run(["info", str(tmp_path)])
    assert result.exit_code == 2 and "not a zarr store" in result.stderr


def test_entry_point_exit_code(tmp_path):
    """The installed entry point (python -m mars_scale) exits 2 with one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "mars_scale", "ingest", str(tmp_path / "nope.h5ad"), "-o", str(tmp_path / "o.zarr")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope.h5ad'}: no such file"]


def test_ingest_and_info_cli(tmp_path, small_h5ad):
    out = tmp_path / "atlas.zarr"
    r = _run(["ingest", str(small_h5ad), "-o", str(out), "--experiment-key", "experiment", "--label-key", "cell_type"])
    assert r.exit_code == 0, r.output
    r = _run(["info", str(out), "--json"])
    import json

    info = json.loads(r.stdout)
    assert info["n_cells"] == 300 and [e["name"] for e in info["experiments"]] == ["exp0", "exp1", "exp2"]
    text = _run(["info", str(out)]).stdout
    assert "300 cells" in text and "exp1" in text and "100.0% annotated" in text
