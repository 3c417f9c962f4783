"""Data integrity: chunk and metadata checksums, structural checks of X rows, older stores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from conftest import build_loader_store

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import writes_as_spec_0_1_0  # noqa: E402
from mars_scale import store as store_module
from mars_scale.errors import StoreError
from mars_scale.store import has_checksum, metadata_damage, open_store, x_rows_damage


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, zarr.Array]:
    found = {}
    for name, member in group.members():
        if isinstance(member, zarr.Group):
            found.update(_arrays(member, f"{prefix}{name}/"))
        else:
            found[prefix + name] = member
    return found


def _old_store(directory: Path, *, zarr_format: int = 3) -> Path:
    """A store as spec 0.1.0 wrote it: blosc chunks without checksums, no metadata checksums."""
    with writes_as_spec_0_1_0():
        return build_loader_store(directory, zarr_format=zarr_format)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("integrity")
    return {fmt: build_loader_store(base / f"v{fmt}", zarr_format=fmt) for fmt in (2, 3)}


@pytest.mark.parametrize("fmt", [2, 3])
def test_every_array_and_node_of_a_new_store_is_checksummed(stores, fmt):
    path = stores[fmt]
    root = zarr.open_group(path, mode="r")
    arrays = _arrays(root)
    assert {"X/data", "X/indices", "X/indptr", "obs/_index", "var/mean", "uns/mars_scale/input_kind"} <= set(arrays)
    assert [k for k, a in arrays.items() if not has_checksum(a)] == []
    assert metadata_damage(path) is None
    atlas = open_store(path)
    assert atlas.checksummed and atlas.spec_version == store_module.SPEC_VERSION
    assert all(atlas.reader(k).direct for k in ("X/data", "X/indices", "X/indptr"))
    import anndata as ad

    adata = ad.read_zarr(path)
    assert (adata.X != atlas.read_rows(0, atlas.n_cells)).nnz == 0


def _first_chunk_file(array_dir: Path) -> Path:
    files = sorted(p for p in array_dir.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr.json")))
    return files[0]


@pytest.mark.parametrize("fmt", [2, 3])
def test_a_flipped_bit_in_a_chunk_is_caught_by_the_direct_reader_and_by_zarr(tmp_path, stores, fmt):
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(stores[fmt], path)
    chunk = _first_chunk_file(path / "X" / "data")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 3] ^= 0x10  # inside the blosc frame of the first chunk, past its header
    chunk.write_bytes(bytes(raw))
    atlas = open_store(path)
    with pytest.raises(StoreError, match=r"s\.zarr: X/data \(rows 0:\d+\) .*checksum"):
        atlas.read_rows(0, atlas.n_cells)
    with pytest.raises(Exception, match="(?i)checksum"):
        zarr.open_group(path, mode="r")["X/data"][:]


def test_metadata_checksum_catches_a_changed_value(tmp_path, stores):
    import shutil

    path = tmp_path / "s.zarr"
    shutil.copytree(stores[3], path)
    meta = path / "X" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["shape"][1] += 1  # still valid JSON, now wrong
    meta.write_text(json.dumps(doc))
    assert metadata_damage(path) == "X: metadata checksum differs"
    meta.write_text(json.dumps(doc)[:-3])
    assert "X: metadata is not valid JSON" in metadata_damage(path)


def test_older_store_opens_reads_and_info_says_it_has_no_checksums(tmp_path, stores):
    from mars_scale.cli import main

    old = _old_store(tmp_path)
    root = zarr.open_group(old, mode="r")
    assert not has_checksum(root["X/data"])
    atlas = open_store(old)
    assert atlas.spec_version == "0.1.0" and not atlas.checksummed
    assert not atlas.reader("X/data").direct or atlas.reader("X/data")._files.checksum is None
    new = open_store(stores[3])
    np.testing.assert_array_equal(atlas.read_rows(0, atlas.n_cells).toarray(), new.read_rows(0, new.n_cells).toarray())
    result = CliRunner().invoke(main, ["info", str(old)])
    assert result.exit_code == 0, result.output
    assert "no chunk checksums (spec 0.1.0" in result.output
    assert "no chunk checksums" not in CliRunner().invoke(main, ["info", str(stores[3])]).output
    assert metadata_damage(old, required=False) is None
    assert metadata_damage(old) is not None  # a checksummed store may not lack them
    result = CliRunner().invoke(main, ["verify", str(old)])
    assert result.exit_code == 0 and "no checksums in spec 0.1.0: structure only" in result.output, result.output


# ------------------------------------------------------------------------- structural checks


def _rows(rows: list[list[tuple[int, float]]]):
    indptr = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
    indices = np.array([g for r in rows for g, _ in r], dtype=np.int32)
    data = np.array([v for r in rows for _, v in r], dtype=np.float32)
    return indptr, data, indices


def test_x_rows_damage_accepts_good_rows_and_names_each_problem():
    good = _rows([[(0, 1.0), (5, 2.0)], [], [(1, 3.0), (2, 1.0), (9, 4.0)], [(0, 1.0)]])
    assert x_rows_damage(*good, n_genes=10, nnz=6) is None
    indptr, data, indices = good
    cases = {
        "outside 0:6": (indptr + 1, data, indices),
        "decreasing": (np.array([0, 3, 2, 5, 6]), data, indices),
        "zeros (a chunk of X/data": (indptr, np.where(np.arange(6) == 2, 0, data).astype(np.float32), indices),
        "not finite and positive": (indptr, np.where(np.arange(6) == 2, np.nan, data).astype(np.float32), indices),
        "not finite and positive ": (indptr, np.where(np.arange(6) == 4, np.inf, data).astype(np.float32), indices),
        "not finite and positive  ": (indptr, np.where(np.arange(6) == 4, -1, data).astype(np.float32), indices),
        "outside 0:10": (indptr, data, np.where(np.arange(6) == 4, 10, indices).astype(np.int32)),
        "outside 0:10 ": (indptr, data, np.where(np.arange(6) == 0, -3, indices).astype(np.int32)),
        "sorted and unique": (indptr, data, indices[[0, 1, 2, 2, 4, 5]]),  # a gene twice in row 2
        "sorted and unique ": (indptr, data, indices[[0, 1, 3, 2, 4, 5]]),  # row 2 out of order
    }
    for expected, (p, d, i) in cases.items():
        problem = x_rows_damage(p, d, i, n_genes=10, nnz=6)
        assert problem is not None and expected.strip() in problem, (expected, problem)


def test_damage_that_decodes_cleanly_in_an_older_store_is_refused_not_returned(tmp_path):
    """Without checksums a chunk can decode to wrong values: the row checks stop them."""
    old = _old_store(tmp_path)
    atlas = open_store(old)
    n = atlas.n_cells
    writable = zarr.open_group(old, mode="r+")
    first = atlas.read_rows(0, 1)
    writable["X/indices"][1] = writable["X/indices"][0]  # row 0 holds its first gene twice
    with pytest.raises(StoreError, match=rf"atlas-v3\.zarr: X rows 0:{n} hold gene indices that are not sorted"):
        open_store(old).read_rows(0, n)
    writable["X/indices"][1] = atlas.n_genes + 7
    with pytest.raises(StoreError, match=r"X rows 0:1 hold gene indices outside 0:200"):
        open_store(old).read_rows(0, 1)
    writable["X/indices"][1] = first.indices[1]
    writable["X/data"][3] = np.nan
    with pytest.raises(StoreError, match=r"not finite and positive"):
        open_store(old).read_rows(0, 5)
    writable["X/data"][3] = 1.0
    writable["X/indptr"][5] = 10**9
    with pytest.raises(StoreError, match=r"X rows 0:5 have X/indptr outside"):
        open_store(old).read_rows(0, 5)
