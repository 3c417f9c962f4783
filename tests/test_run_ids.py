"""Run ids on annotate's results: a reader never sees the elements of two runs.

A stress loop alternates ``annotate --overwrite`` runs of two models on one store while this
process reads the results in a loop with :func:`mars_scale.annotate.read_results`; every read
must be one run's results, whole.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr

from mars_scale.annotate import read_results, result_keys
from mars_scale.errors import StoreError
from mars_scale.store import metadata_damage, write_attrs
from test_reliability import annotated, good_store, mars_cmd, subprocess_env, work  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.filterwarnings(r"ignore:Object at \.mars-scale")]
COLUMNS = result_keys("mars")["obs"]


def _which(result: dict | None, refs: dict[str, dict]) -> str:
    """The reference run whose results ``result`` equals element by element, "none" or "mixed"."""
    if result is None:  # between the two commit writes of an overwrite: nothing is published
        return "none"
    for name, ref in refs.items():
        same_obs = all(result["obs"][c].reset_index(drop=True).equals(ref["obs"][c].reset_index(drop=True))
                       for c in COLUMNS)
        if same_obs and np.array_equal(result["obsm"]["X_mars"], ref["obsm"]) and \
                str(result["uns"]["model"]) == ref["uns_model"]:
            return name
    return "mixed"


def test_every_result_element_carries_the_published_run_id(tmp_path, annotated):
    store = tmp_path / "atlas.zarr"
    shutil.copytree(annotated["store"], store)
    result = read_results(store)
    assert result is not None and len(result["run_id"]) == 16
    assert _which(result, annotated["refs"]) == "A"
    root = zarr.open_group(store, mode="r")
    assert root["obs"].attrs["mars-scale-runs"] == {"mars": result["run_id"]}
    stamped = [root[f"obs/{c}"].attrs["mars-scale-run"] for c in COLUMNS]
    stamped += [root[f"obsm/{k}"].attrs["mars-scale-run"] for k in ("X_mars", "mars_name_probabilities")]
    assert set(stamped) == {result["run_id"]} and str(result["uns"]["run_id"]) == result["run_id"]
    assert read_results(store, key_added="other") is None
    assert metadata_damage(store) is None


def test_an_element_of_another_run_is_never_returned(tmp_path, annotated):
    """A column stamped with another run (as when a commit lands between two reads) is refused."""
    store = tmp_path / "atlas.zarr"
    shutil.copytree(annotated["store"], store)
    write_attrs(store / "obs" / "mars_novelty", {"mars-scale-run": "0123456789abcdef"})
    with pytest.raises(StoreError, match=r"atlas\.zarr: the mars results changed during each of 3 reads"):
        read_results(store, attempts=3)


def test_stress_alternating_overwrites_and_a_reader_never_mixes_runs(tmp_path, annotated):
    refs = annotated["refs"]
    store = tmp_path / "atlas.zarr"
    shutil.copytree(annotated["store"], store)
    codes: list[int] = []

    def writer():
        for name in ("B", "A", "B", "A", "B", "A"):
            proc = subprocess.run(mars_cmd("-q", "annotate", store, "--model", annotated["runs"][name], "--device", "cpu",
                                           "--overwrite"), env=subprocess_env(), capture_output=True, text=True)
            codes.append(proc.returncode)

    thread = threading.Thread(target=writer)
    thread.start()
    seen: dict[str, int] = {}
    while thread.is_alive():
        name = _which(read_results(store), refs)
        seen[name] = seen.get(name, 0) + 1
    thread.join()
    assert codes == [0] * 6
    assert seen.get("mixed", 0) == 0, seen
    assert seen.get("A", 0) > 0 and seen.get("B", 0) > 0, seen  # the reads overlapped both runs
    assert _which(read_results(store), refs) == "A"
