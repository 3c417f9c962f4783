"""Random damage to every kind of file of a small annotated store: detected, or reads back identical.

The harness is ``benchmarks/fuzz.py`` (which runs thousands of cases); this runs a few dozen
per zarr format, plus `mars-scale verify` on chosen damage through the CLI.
"""

from __future__ import annotations

import collections
import importlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mars_scale.cli import main

# by name, from benchmarks/ on sys.path, so that the spawned worker imports the same module
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
fuzz = importlib.import_module("fuzz")

CI_CASES = 24


@pytest.fixture(scope="module")
def annotated_stores(tmp_path_factory) -> dict[int, Path]:
    base = tmp_path_factory.mktemp("fuzz")
    return {fmt: fuzz.build_store(base / f"v{fmt}", zarr_format=fmt, seed=0) for fmt in (3, 2)}


@pytest.mark.parametrize("fmt", [3, 2])
def test_random_damage_is_detected_or_harmless(annotated_stores, fmt):
    store = annotated_stores[fmt]
    files = fuzz.store_files(store)
    assert {f.relative_to(store).parts[0] for f in files} >= {"X", "obs", "var", "obsm", "uns", "zarr.json"} - (
        {"zarr.json"} if fmt == 2 else set())
    before = {f: f.read_bytes() for f in files}
    fuzzer = fuzz.Fuzzer(store)
    rng = np.random.default_rng(100 + fmt)
    try:
        cases = [fuzzer.run_case(rng, fuzz.KINDS[i % 4], by_size=bool(i % 2)) for i in range(CI_CASES)]
    finally:
        fuzzer.close()
    counts = collections.Counter(c["outcome"] for c in cases)
    bad = [c for c in cases if c["outcome"] in ("silent", "missed", "crash")]
    assert not bad, bad
    assert counts["detected"] >= CI_CASES // 2  # nearly every change to these bytes matters
    assert {f: f.read_bytes() for f in files} == before  # every case restored its file


def test_the_harness_would_report_silent_damage(annotated_stores, tmp_path, monkeypatch):
    """With verify disabled, a flipped bit in an obs column reads back wrong: the harness says "silent"."""
    store = tmp_path / "s.zarr"
    shutil.copytree(annotated_stores[3], store)
    fuzz._REFERENCE[str(store)] = fuzz.read_everything(store)  # not _prime: it silences the worker's logging
    import mars_scale.verify as verify_module

    monkeypatch.setattr(verify_module, "verify_store", lambda path, **kw: None)
    import zarr

    writable = zarr.open_group(store, mode="r+")
    values = writable["obs/n_counts"][:]
    values[3] += 1
    writable["obs/n_counts"][:] = values  # valid chunk (its checksum is recomputed), other data
    assert fuzz._evaluate(str(store))[0] == "silent"


def _verify(path, *args):
    return CliRunner().invoke(main, ["verify", *args, str(path)])


def test_verify_cli_intact_and_damaged(annotated_stores, tmp_path):
    store = tmp_path / "atlas.zarr"
    shutil.copytree(annotated_stores[3], store)
    result = _verify(store)
    assert result.exit_code == 0, result.output
    assert result.output.count("\n") == 1 and "intact (every chunk of" in result.output and "checksums" in result.output
    assert "intact (shard indexes and chunk sizes" in _verify(store, "--quick").output

    # a chunk of X/indices inside its shard: found by the full check, not by --quick
    shard = sorted((store / "X" / "indices" / "c").iterdir())[0]
    raw = bytearray(shard.read_bytes())
    raw[40] ^= 0x04
    shard.write_bytes(bytes(raw))
    assert _verify(store, "--quick").exit_code == 0
    result = _verify(store)
    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert "atlas.zarr: X/indices (rows 0:" in result.output and "checksum" in result.output

    # a shard index: found by --quick too
    raw[40] ^= 0x04
    raw[-10] ^= 0x01
    shard.write_bytes(bytes(raw))
    result = _verify(store, "--quick")
    assert result.exit_code == 2 and "X/indices (c/0): the shard index is truncated or its checksum differs" in result.output

    # the metadata of an obsm array written by annotate
    shard.write_bytes(bytes(raw[:-10] + bytearray([raw[-10] ^ 0x01]) + raw[-9:]))
    assert _verify(store).exit_code == 0
    meta = store / "obsm" / "X_mars" / "zarr.json"
    meta.write_text(meta.read_text().replace('"float32"', '"float64"'))
    result = _verify(store, "--quick")
    assert result.exit_code == 2 and "obsm/X_mars: metadata checksum differs" in result.output


def test_verify_refuses_what_is_not_a_store(tmp_path):
    result = _verify(tmp_path / "nothing.zarr")
    assert result.exit_code == 2 and "no such store" in result.output
