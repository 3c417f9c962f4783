"""Reliability: a corpus of bad inputs, SIGKILL in mid-write, exact resume, concurrent writers,
dead ranks, non-finite losses and untrusted files.

Every error case runs through the CLI and checks three things: exit code 2, one line on stderr
that names the file and the problem, and no change on disk (a listing of names, sizes and
mtimes before and after). Crash tests kill real subprocesses with SIGKILL, so no cleanup code
runs, and then check that the store on disk opens (``open_store`` and ``anndata.read_zarr``)
and holds either the earlier content or the new one, never a mix. ``docs/reliability.md``
lists what each test guarantees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import psutil
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

import corpus
from conftest import make_adata
from mars_scale.annotate import result_keys
from mars_scale.checkpoint import load_checkpoint
from mars_scale.cli import main
from mars_scale.config import RunConfig, TrainConfig
from mars_scale.errors import CheckpointMismatchError, TrainingError
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.model import Mars
from mars_scale.nn import ModelConfig
from mars_scale.store import StoreLayout, open_store, store_lock

# Readers running beside a writer see its staging directory and lock file inside the store,
# which zarr reports as not part of the hierarchy.
pytestmark = [pytest.mark.filterwarnings(r"ignore:Object at \.mars-scale-staging-"),
              pytest.mark.filterwarnings(r"ignore:Object at \.mars-scale\.lock")]

TESTS = Path(__file__).resolve().parent
RESULT_COLUMNS = result_keys("mars")["obs"]
TINY_TOML = """\
[model]
hidden = [32]
n_latent = 8
[train]
pretrain_epochs = {pretrain}
finetune_epochs = {finetune}
batch_size = {batch}
min_steps_per_epoch = {steps}
pretrain_on = "{on}"
seed = 3
device = "cpu"
"""


# ---------------------------------------------------------------------------------------------
# helpers


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under ``path``: relative name -> (size, mtime in ns)."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def cli(*args) -> object:
    return CliRunner().invoke(main, ["-q", *[str(a) for a in args]])


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in result.output, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def write_toml(path: Path, *, pretrain=2, finetune=2, batch=512, steps=2, on="unannotated") -> Path:
    path.write_text(TINY_TOML.format(pretrain=pretrain, finetune=finetune, batch=batch, steps=steps, on=on))
    return path


def mars_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "mars_scale", *[str(a) for a in args]]


def subprocess_env(**extra) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS), **extra}
    env.pop("TORCHELASTIC_RESTART_COUNT", None)
    return env


def wait_for(predicate, *, timeout: float, proc: subprocess.Popen | None = None, poll: float = 0.01):
    """Poll until ``predicate()`` is truthy; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"the process ended (code {proc.returncode}) before the awaited state: {out[-2000:]}")
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s")


def sigkill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.returncode


def assert_valid_store(path: Path) -> ad.AnnData:
    atlas = open_store(path)
    adata = ad.read_zarr(path)
    assert adata.shape == (atlas.n_cells, atlas.n_genes)
    assert adata.X.nnz == atlas.nnz
    return adata


@pytest.fixture
def one_thread():
    """Bitwise-reproducible CPU training in this process, as in the OMP_NUM_THREADS=1 children."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def good_store(work) -> Path:
    """1,200 cells in three experiments (exp0, exp1, exp2), small chunks: every array of X, and
    the obs codes, span at least three shard files. Read-only: tests damage copies."""
    adata = make_adata(1200, 60, n_experiments=3, seed=11)
    adata.obs["experiment"] = pd.Categorical(np.repeat(["exp0", "exp1", "exp2"], [400, 420, 380]))
    h5ad = corpus.write(work / "good.h5ad", adata)
    layout = StoreLayout(rows_per_chunk=16, chunks_per_shard=2)
    return ingest([h5ad], work / "good.zarr", config=IngestConfig(
        experiment_key="experiment", label_key="cell_type", min_cells=1, layout=layout))


# ---------------------------------------------------------------------------------------------
# 1. the corpus of bad inputs


@pytest.mark.parametrize("case", list(corpus.BAD_H5AD))
def test_bad_h5ad_is_refused_and_nothing_changes(tmp_path, case):
    build, extra, fragments = corpus.BAD_H5AD[case]
    src = build(tmp_path)
    before = snapshot(tmp_path)
    result = cli("ingest", src, "-o", tmp_path / "out.zarr", *extra)
    assert_one_line_error(result, *fragments)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case", list(corpus.DAMAGED_STORES))
def test_damaged_store_is_refused_and_nothing_changes(tmp_path, good_store, case):
    damage, command, fragments = corpus.DAMAGED_STORES[case]
    store = tmp_path / "atlas.zarr"
    shutil.copytree(good_store, store)
    damage(store)
    # pretraining on every experiment reads every row in its first epoch, before any checkpoint
    config = write_toml(tmp_path / "tiny.toml", pretrain=1, finetune=1, on="all")
    before = snapshot(tmp_path)
    if command == "info":
        result = cli("info", store)
    else:
        result = cli("train", store, "--unannotated", "exp0", "--n-clusters", "3",
                     "-o", tmp_path / "run", "--config", config)
    assert_one_line_error(result, str(store), *fragments)
    assert snapshot(tmp_path) == before


def test_nan_labels_are_unannotated_and_empty_experiments_are_absent(tmp_path):
    adata = make_adata(150, 30, n_experiments=3, seed=4)
    exp = adata.obs["experiment"].astype(str).to_numpy().copy()
    x = adata.X.toarray()
    x[exp == "exp2"] = 0  # every cell of exp2 fails QC: the experiment ends with 0 cells
    adata.X = sp.csr_matrix(x)
    labels = adata.obs["cell_type"].astype(object)
    nan_rows = np.flatnonzero(exp == "exp0")[:10]
    labels.iloc[nan_rows] = np.nan
    adata.obs["cell_type"] = pd.Categorical(labels)
    # "ghost" is a category without cells
    adata.obs["experiment"] = pd.Categorical(exp, categories=["exp0", "exp1", "exp2", "ghost"])
    src = corpus.write(tmp_path / "in.h5ad", adata)
    out = tmp_path / "out.zarr"
    result = cli("ingest", src, "-o", out, "--experiment-key", "experiment", "--label-key", "cell_type", "--min-cells", "1")
    assert result.exit_code == 0, result.output
    info = json.loads(cli("info", out, "--json").stdout)
    assert [e["name"] for e in info["experiments"]] == ["exp0", "exp1"]
    n0 = int((exp == "exp0").sum())
    assert info["experiments"][0]["n_cells"] == n0
    assert info["experiments"][0]["annotated_fraction"] == pytest.approx((n0 - 10) / n0)
    stored = assert_valid_store(out)
    assert stored.obs["cell_type"].isna().sum() == 10
    assert set(stored.obs_names[stored.obs["cell_type"].isna()]) == set(adata.obs_names[nan_rows])
    assert "nan" not in info["cell_types"] and len(info["cell_types"]) == 4


def test_one_cell_experiment(tmp_path, one_thread):
    adata = make_adata(241, 40, n_experiments=1, seed=6)
    adata.obs["experiment"] = pd.Categorical(["big"] * 120 + ["other"] * 120 + ["one"])
    src = corpus.write(tmp_path / "in.h5ad", adata)
    out = tmp_path / "out.zarr"
    assert cli("ingest", src, "-o", out, "--experiment-key", "experiment", "--label-key", "cell_type",
               "--min-cells", "1").exit_code == 0
    atlas = open_store(out)
    a, b = atlas.experiment_ranges["one"]
    assert b - a == 1
    config = write_toml(tmp_path / "tiny.toml")
    result = cli("train", out, "--unannotated", "one", "--n-clusters", "2", "-o", tmp_path / "r", "--config", config)
    assert_one_line_error(result, "--n-clusters 2 is larger than the 1 cells of experiment 'one'")
    # as the unannotated experiment with K = 1, and as an annotated one, it trains
    tiny = RunConfig(model=ModelConfig(hidden=(16,), n_latent=4),
                     train=TrainConfig(pretrain_epochs=1, finetune_epochs=1, batch_size=256, seed=0, device="cpu"))
    alone = Mars(out, unannotated="one", n_clusters=1, config=tiny).train()
    assert alone.unannotated_landmarks.shape == (1, 4) and np.isfinite(alone.unannotated_landmarks).all()
    model = Mars(out, unannotated="big", n_clusters=3, config=tiny).train()
    _, exps, _ = model.annotated_landmarks
    assert exps.count("one") == 1  # its single cell makes one annotated landmark
    assert np.isfinite(model.annotated_landmarks[0]).all()


def test_all_zero_cells_and_genes_are_dropped(tmp_path):
    adata = make_adata(100, 40, seed=8)
    x = adata.X.toarray()
    zero_cells, zero_genes = [3, 17, 18, 60, 99], [0, 5, 39]
    x[zero_cells] = 0
    x[:, zero_genes] = 0
    adata.X = sp.csr_matrix(x)
    src = corpus.write(tmp_path / "in.h5ad", adata)
    out = tmp_path / "out.zarr"
    assert cli("ingest", src, "-o", out, "--min-cells", "1").exit_code == 0
    stored = assert_valid_store(out)
    keep_cells = np.flatnonzero(x.sum(1) > 0)
    keep_genes = np.flatnonzero((x[keep_cells] > 0).sum(0) >= 1)
    assert not set(zero_cells) & set(keep_cells) and len(keep_cells) <= 95 and len(keep_genes) <= 37
    assert stored.shape == (len(keep_cells), len(keep_genes))
    assert list(stored.obs_names) == list(adata.obs_names[keep_cells])
    assert not set(stored.var_names) & {f"gene{j}" for j in zero_genes}
    np.testing.assert_array_equal(stored.X.toarray(), x[np.ix_(keep_cells, keep_genes)])


def test_lognorm_given_as_counts_is_detected(tmp_path):
    adata = make_adata(80, 30, seed=6)
    x = adata.X.toarray()
    adata.X = sp.csr_matrix(np.log1p(x / x.sum(1, keepdims=True) * 1e4).astype(np.float32))
    src = corpus.write(tmp_path / "lognorm.h5ad", adata)
    out = tmp_path / "out.zarr"
    result = CliRunner().invoke(main, ["ingest", str(src), "-o", str(out), "--min-cells", "0"])
    assert result.exit_code == 0
    assert "look log-normalised; recorded as lognorm" in result.stderr
    assert json.loads(cli("info", out, "--json").stdout)["input_kind"] == "lognorm"


def test_counts_up_to_2_24_are_stored_exactly(tmp_path):
    adata = make_adata(40, 20, seed=2)
    x = adata.X.toarray().astype(np.int64)
    x[5, 2] = 2**24  # the largest count float32 holds with all below it
    adata.X = sp.csr_matrix(x)
    out = tmp_path / "out.zarr"
    assert cli("ingest", corpus.write(tmp_path / "in.h5ad", adata), "-o", out, "--min-cells", "0").exit_code == 0
    stored = assert_valid_store(out)
    rows = x.sum(1) > 0
    np.testing.assert_array_equal(stored.X.toarray(), x[np.ix_(rows, (x[rows] > 0).any(0))])
    assert stored.X.dtype == np.float32 and stored.X.max() == 2**24


# ---------------------------------------------------------------------------------------------
# 6. untrusted files and user paths


@pytest.fixture
def audit_pickle():
    """Records every global that ``pickle`` looks up while the test runs (an audit event)."""
    events: list = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "pickle.find_class":
            events.append(args)

    sys.addaudithook(hook)  # hooks cannot be removed; this one goes quiet after the test
    yield events
    active[0] = False


def test_h5ad_is_read_without_unpickling(tmp_path, audit_pickle):
    marker = tmp_path / "pwned"
    binary = corpus.pickled_column(tmp_path, marker, protocol=4)
    ascii_ = corpus.pickled_column(tmp_path, marker, protocol=0)
    opaque = corpus.pickled_column(tmp_path, marker, protocol=4, opaque=True)
    # the column is read as bytes: not UTF-8 (binary pickle), or not a string type (opaque) ...
    assert_one_line_error(cli("ingest", binary, "-o", tmp_path / "a.zarr", "--label-key", "payload"),
                          "obs/payload", "not valid UTF-8")
    assert_one_line_error(cli("ingest", opaque, "-o", tmp_path / "b.zarr", "--label-key", "payload"),
                          "obs/payload", "unsupported dtype")
    # ... or as the text it is (protocol 0 pickles are ASCII)
    result = cli("ingest", ascii_, "-o", tmp_path / "c.zarr", "--label-key", "payload", "--min-cells", "0")
    assert result.exit_code == 0, result.output
    assert "mkdir" in open_store(tmp_path / "c.zarr").cell_types[0]
    # a column nobody asked for is never read
    assert cli("ingest", opaque, "-o", tmp_path / "d.zarr", "--min-cells", "0").exit_code == 0
    assert not marker.exists()
    assert audit_pickle == []


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path, good_store, audit_pickle):
    marker = tmp_path / "pwned"
    payload = {"format": "mars-scale-checkpoint", "phase": "done", "extra": corpus.Payload(marker)}
    run = tmp_path / "run"
    run.mkdir()
    torch.save(payload, run / "checkpoint.pt")
    torch.save(payload, run / "model.pt")
    with pytest.raises(CheckpointMismatchError, match="not a readable mars-scale checkpoint"):
        load_checkpoint(run / "checkpoint.pt")
    config = write_toml(tmp_path / "tiny.toml")
    store = tmp_path / "atlas.zarr"
    shutil.copytree(good_store, store)
    before = snapshot(tmp_path)
    result = cli("train", store, "--unannotated", "exp0", "--n-clusters", "3", "-o", run, "--config", config, "--resume")
    assert_one_line_error(result, "checkpoint.pt", "not a readable mars-scale checkpoint")
    result = cli("annotate", store, "--model", run, "--device", "cpu")
    assert_one_line_error(result, "model.pt", "not a readable mars-scale checkpoint")
    assert snapshot(tmp_path) == before
    assert not marker.exists()
    assert audit_pickle == []  # weights_only refuses before looking the global up


def test_user_paths_are_never_replaced_unless_they_are_stores(tmp_path, small_h5ad):
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "sub").mkdir()
    (mine / "sub" / "more.csv").write_text("1,2\n")
    a_file = tmp_path / "table.csv"
    a_file.write_text("x\n")
    before = snapshot(tmp_path)
    assert_one_line_error(cli("ingest", small_h5ad, "-o", mine), "mydata", "already exists", "--overwrite")
    assert_one_line_error(cli("ingest", small_h5ad, "-o", mine, "--overwrite"),
                          "mydata", "is not a mars-scale store")
    assert_one_line_error(cli("ingest", small_h5ad, "-o", a_file, "--overwrite"),
                          "table.csv", "is not a mars-scale store")
    assert snapshot(tmp_path) == before
    # an empty directory holds nothing to lose
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli("ingest", small_h5ad, "-o", empty, "--overwrite").exit_code == 0
    assert_valid_store(empty)


# ---------------------------------------------------------------------------------------------
# 2. crash safety: SIGKILL in mid-write


@pytest.fixture(scope="module")
def big_h5ad(work) -> Path:
    """20,000 cells x 2,000 genes (6 million non-zeros): ingest takes a few seconds."""
    from mars_scale.simulate import SimulationConfig, write_h5ad

    return write_h5ad(work / "big.h5ad", SimulationConfig(n_cells=20_000, n_genes=2_000, n_experiments=2, seed=1))


def _ingest_proc(src: Path, out: Path, *extra) -> subprocess.Popen:
    # 8 cells per chunk (4,096 values, the least), 256 chunks per shard: X/data is written as
    # about six shard files, one after the other
    return subprocess.Popen(mars_cmd("ingest", src, "-o", out, "--rows-per-chunk", "8", *extra),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _temporaries(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def _shards_written(out: Path) -> int:
    return sum(len(list((t / "X" / "data").rglob("c/*"))) for t in _temporaries(out))


def test_killed_ingest_leaves_no_store(tmp_path, big_h5ad):
    out = tmp_path / "atlas.zarr"
    proc = _ingest_proc(big_h5ad, out)
    wait_for(lambda: _temporaries(out), timeout=120, proc=proc)
    sigkill(proc)
    assert not out.exists()
    leftovers = _temporaries(out)
    assert len(leftovers) == 1
    # the leftover does not break the next run, which names it and leaves it alone
    result = CliRunner().invoke(main, ["ingest", str(big_h5ad), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert leftovers[0].name in result.stderr and "interrupted run" in result.stderr
    assert assert_valid_store(out).n_obs == 20_000
    assert _temporaries(out) == leftovers


def test_killed_overwrite_keeps_the_previous_store(tmp_path, big_h5ad, small_h5ad):
    out = tmp_path / "atlas.zarr"
    assert cli("ingest", small_h5ad, "-o", out).exit_code == 0
    old = snapshot(out)
    kills = 0
    for ready in (lambda: _temporaries(out), lambda: _shards_written(out) >= 3):
        proc = _ingest_proc(big_h5ad, out, "--overwrite")
        wait_for(ready, timeout=120, proc=proc)
        # in mid-write the target is still the complete previous store
        assert open_store(out).n_cells == 300
        sigkill(proc)
        kills += 1
        assert snapshot(out) == old
        assert assert_valid_store(out).n_obs == 300
    assert len(_temporaries(out)) == kills
    proc = _ingest_proc(big_h5ad, out, "--overwrite")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    assert assert_valid_store(out).n_obs == 20_000
    assert not list(tmp_path.glob(".atlas.zarr.old-*"))


# -- annotate ----------------------------------------------------------------------------------


def _results(path: Path) -> dict:
    """The annotation results a reader sees (anndata), element by element."""
    adata = ad.read_zarr(path)
    cols = [c for c in RESULT_COLUMNS if c in adata.obs.columns]
    return {
        "obs": adata.obs[cols].copy() if cols else None,
        "n_obs_columns": len(cols),
        "obsm": np.asarray(adata.obsm["X_mars"]) if "X_mars" in adata.obsm else None,
        "uns_model": str(adata.uns["mars"]["model"]) if "mars" in adata.uns else None,
    }


def assert_consistent(path: Path, references: list[dict], *, one_run: bool = True) -> dict:
    """The store opens, and each result element is absent or whole and from one finished run.

    ``one_run``: the obs result columns all come from the same run (else each column is whole
    and from some run).
    """
    open_store(path)
    seen = _results(path)
    assert seen["n_obs_columns"] in (0, len(RESULT_COLUMNS)), seen["n_obs_columns"]
    if seen["obs"] is not None:
        for column in RESULT_COLUMNS:
            assert any(seen["obs"][column].equals(ref["obs"][column]) for ref in references), column
        if one_run:
            assert any(seen["obs"].equals(ref["obs"]) for ref in references), "obs columns of two runs"
    if seen["obsm"] is not None:
        assert any(np.array_equal(seen["obsm"], ref["obsm"]) for ref in references)
    if seen["uns_model"] is not None:
        assert seen["uns_model"] in [ref["uns_model"] for ref in references]
    return seen


@pytest.fixture(scope="module")
def annotated(work, good_store):
    """Two tiny models (A, B) on the good store (exp1 unannotated), a store holding A's
    results, and the results A and B each give, as references."""
    tiny = RunConfig(model=ModelConfig(hidden=(32,), n_latent=8),
                     train=TrainConfig(pretrain_epochs=2, finetune_epochs=2, batch_size=256, seed=1, device="cpu"))
    runs = {}
    for name, seed in (("A", 1), ("B", 2)):
        config = dataclasses.replace(tiny, train=dataclasses.replace(tiny.train, seed=seed))
        runs[name] = work / f"run{name}"
        Mars(good_store, unannotated="exp1", n_clusters=4, config=config).train().save(runs[name])
    refs = {}
    for name in runs:
        copy = work / f"ref{name}.zarr"
        shutil.copytree(good_store, copy)
        assert cli("annotate", copy, "--model", runs[name], "--device", "cpu").exit_code == 0
        refs[name] = _results(copy)
    assert not refs["A"]["obs"].equals(refs["B"]["obs"])
    return {"store": work / "refA.zarr", "runs": runs, "refs": refs}


KILL_DRIVER = textwrap.dedent("""
    import json, os, signal, sys
    import importlib
    A = importlib.import_module("mars_scale.annotate")
    S = importlib.import_module("mars_scale.store")

    run_dir, plan = sys.argv[1], json.loads(sys.argv[2])
    original = {"move": S._move, "order": S.write_obs_publication}
    for store, step in plan:
        pid = os.fork()
        if pid == 0:  # the child writes, and dies by SIGKILL before commit mutation number `step`
            calls = [0]
            def hit():
                if calls[0] == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls[0] += 1
            S._move = lambda src, dst: (hit(), original["move"](src, dst))
            S.write_obs_publication = lambda *a: (hit(), original["order"](*a))
            A.annotate(store, run_dir, overwrite=True, device="cpu", seed=0)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print(json.dumps([store, step, os.WIFSIGNALED(status) and os.WTERMSIG(status)]), flush=True)
""")

# Replacing results takes 20 mutations: hide the old obs columns, move 9 old elements aside and
# 9 new ones in (6 obs columns, 2 obsm arrays, uns), publish the new column order. These steps
# kill before the first, after the hiding, in the middle of the obs columns, between obsm and
# uns, and before the publishing one.
KILL_STEPS = (0, 1, 6, 17, 19)


def test_annotate_killed_at_each_commit_step_leaves_one_runs_results(tmp_path, annotated):
    refs = [annotated["refs"]["A"], annotated["refs"]["B"]]
    plan = []
    for step in KILL_STEPS:
        copy = tmp_path / f"step{step}.zarr"
        shutil.copytree(annotated["store"], copy)
        plan.append([str(copy), step])
    proc = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(annotated["runs"]["B"]), json.dumps(plan)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert [o[2] for o in outcomes] == [signal.SIGKILL] * len(KILL_STEPS)
    seen = {step: assert_consistent(Path(store), refs) for store, step, _ in outcomes}
    assert seen[0]["obs"].equals(refs[0]["obs"])  # killed before the commit: A untouched
    assert seen[19]["n_obs_columns"] == 0 and np.array_equal(seen[19]["obsm"], refs[1]["obsm"])
    # the next run takes over the dead writer's lock, clears its staging and lands B whole
    last = Path(outcomes[-1][0])
    assert (last / ".mars-scale.lock").exists()
    result = CliRunner().invoke(main, ["annotate", str(last), "--model", str(annotated["runs"]["B"]),
                                       "--device", "cpu", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert "taking over the lock" in result.stderr
    final = assert_consistent(last, [refs[1]])
    assert final["obs"].equals(refs[1]["obs"])
    assert not list(last.glob(".mars-scale*"))


def test_annotate_killed_in_mid_write_by_time(tmp_path, annotated):
    refs = [annotated["refs"]["A"], annotated["refs"]["B"]]
    store = tmp_path / "atlas.zarr"
    shutil.copytree(annotated["store"], store)
    proc = subprocess.Popen(mars_cmd("annotate", store, "--model", annotated["runs"]["B"], "--device", "cpu", "--overwrite"),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: list(store.glob(".mars-scale-staging-*")), timeout=180, proc=proc)
    sigkill(proc)
    assert_consistent(store, refs)
    assert_valid_store(store)
    assert (store / ".mars-scale.lock").exists()  # stale: taken over by the next writer


# -- training ------------------------------------------------------------------------------------


def test_training_killed_in_mid_epoch_resumes_to_the_same_model(tmp_path, good_store, one_thread):
    # 20 steps of 64 cells per pretraining epoch (about a second): a kill lands inside one
    config = write_toml(tmp_path / "tiny.toml", pretrain=3, finetune=2, batch=64, steps=20)
    common = ["train", good_store, "--unannotated", "exp0", "--n-clusters", "3", "--config", config]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(mars_cmd(*common, "-o", killed), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (killed / "checkpoint.pt").exists(), timeout=180, proc=proc, poll=0.005)
    time.sleep(0.05)  # into the second epoch
    sigkill(proc)
    saved = load_checkpoint(killed / "checkpoint.pt")
    assert saved["phase"] in ("pretrain", "finetune")  # pretraining epoch 2 unless the machine is fast
    assert not (killed / "model.pt").exists()
    # a temporary left by a save that was killed does not get in the way
    (killed / ".checkpoint.pt.tmp-deadbeef").write_bytes(b"half a checkpoint")
    assert cli(*common, "-o", killed, "--resume").exit_code == 0
    assert cli(*common, "-o", tmp_path / "straight").exit_code == 0
    resumed = load_checkpoint(killed / "model.pt")
    straight = load_checkpoint(tmp_path / "straight" / "model.pt")
    assert torch.equal(resumed["unannotated_landmarks"], straight["unannotated_landmarks"])
    assert torch.equal(resumed["annotated_landmarks"], straight["annotated_landmarks"])
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


# ---------------------------------------------------------------------------------------------
# 3. concurrent writers


def _annotate_proc(store: Path, run_dir: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(mars_cmd("-q", "annotate", store, "--model", run_dir, "--device", "cpu", *extra),
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_while(procs, store: Path, refs, *, one_run: bool) -> int:
    """Read the store with anndata while ``procs`` run. An element swapped between two of
    zarr's reads of one shard (its index, then its bytes) fails its chunk checksum, and one
    swapped between the read of its metadata and of its chunk (two runs with different numbers
    of clusters) fails to reshape: such a read raises, which is allowed (``read_results``
    retries it); returning wrong data is not."""
    reads = 0
    while any(p.poll() is None for p in procs):
        try:
            assert_consistent(store, refs, one_run=one_run)
        except ValueError as error:
            if "checksum" not in str(error) and "cannot reshape" not in str(error):
                raise
            continue
        reads += 1
    return reads


def test_two_annotate_runs_on_one_store_and_a_reader(tmp_path, good_store, annotated):
    """Two first annotations at once: one lands whole, the other is refused (by the lock, or
    because the results exist by then); a reader only ever sees none or all of one run."""
    refs = [annotated["refs"]["A"], annotated["refs"]["B"]]
    store = tmp_path / "atlas.zarr"
    shutil.copytree(good_store, store)
    procs = [_annotate_proc(store, annotated["runs"][name]) for name in ("A", "B")]
    reads = _read_while(procs, store, refs, one_run=True)
    outs = [p.communicate() for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], (codes, outs)
    err = outs[codes.index(2)][1].strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "another process" in err or "already exists from an earlier annotation" in err, err
    final = assert_consistent(store, refs)
    assert final["n_obs_columns"] == len(RESULT_COLUMNS) and final["obsm"] is not None
    assert reads > 0 and not (store / ".mars-scale.lock").exists()


def test_two_overwriting_annotate_runs_and_a_reader(tmp_path, annotated):
    """Two --overwrite runs at once on a store with results: the second is refused by the lock
    or both land; the store always opens and every element a reader sees is whole."""
    refs = [annotated["refs"]["A"], annotated["refs"]["B"]]
    store = tmp_path / "atlas.zarr"
    shutil.copytree(annotated["store"], store)
    procs = [_annotate_proc(store, annotated["runs"][name], "--overwrite") for name in ("A", "B")]
    reads = _read_while(procs, store, refs, one_run=False)
    outs = [p.communicate() for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) in ([0, 0], [0, 2]), (codes, outs)
    for code, (_, err) in zip(codes, outs):
        if code == 2:
            assert err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1
            assert "another process" in err and "is writing to this store" in err
    final = assert_consistent(store, refs, one_run=True)
    assert final["n_obs_columns"] == len(RESULT_COLUMNS) and final["obsm"] is not None
    assert reads > 0 and not (store / ".mars-scale.lock").exists()


def test_a_held_lock_refuses_annotate_through_the_cli(tmp_path, annotated):
    store = tmp_path / "atlas.zarr"
    shutil.copytree(annotated["store"], store)
    with store_lock(store):
        before = snapshot(store)
        result = cli("annotate", store, "--model", annotated["runs"]["B"], "--device", "cpu", "--overwrite")
        assert_one_line_error(result, str(store), "another process", f"pid {os.getpid()}")
        assert snapshot(store) == before
    assert not (store / ".mars-scale.lock").exists()


# ---------------------------------------------------------------------------------------------
# 4. distributed faults


def _torchrun(args, *, nproc=2, max_restarts=0) -> subprocess.Popen:
    port = 29700 + os.getpid() % 200 + 2 * max_restarts  # apart from test_train's ports
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--max-restarts", str(max_restarts), "--monitor-interval", "0.2",
           "--master_port", str(port), "-m", "mars_scale", *map(str, args)]
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _worker(torchrun: subprocess.Popen, local_rank: int) -> psutil.Process | None:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank) and "mars_scale" in " ".join(child.cmdline()):
                return child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def test_a_dead_rank_fails_the_job_instead_of_hanging(tmp_path, good_store):
    config = write_toml(tmp_path / "tiny.toml", pretrain=50, finetune=2, batch=256, steps=10)
    run = tmp_path / "run"
    proc = _torchrun(["train", good_store, "--unannotated", "exp0", "--n-clusters", "3", "-o", run,
                      "--config", config])
    try:
        wait_for(lambda: (run / "checkpoint.pt").exists(), timeout=240, proc=proc, poll=0.05)
        worker = _worker(proc, 1)
        assert worker is not None
        worker.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=300)  # the bound is the process-group timeout (600 s)
        elapsed = time.monotonic() - killed_at
    finally:
        _kill_group(proc)
    out = proc.stdout.read()
    assert proc.returncode != 0, out[-3000:]
    assert elapsed < 120, elapsed
    assert not (run / "model.pt").exists()
    assert load_checkpoint(run / "checkpoint.pt")["phase"] == "pretrain"  # the last good one


@pytest.mark.slow
def test_elastic_restart_resumes_from_the_last_checkpoint(tmp_path, good_store, one_thread):
    config = write_toml(tmp_path / "tiny.toml", pretrain=8, finetune=2, batch=256, steps=10)
    run = tmp_path / "run"
    proc = _torchrun(["train", good_store, "--unannotated", "exp0", "--n-clusters", "3", "-o", run,
                      "--config", config, "--resume"], max_restarts=1)
    try:
        wait_for(lambda: (run / "checkpoint.pt").exists(), timeout=240, proc=proc, poll=0.05)
        worker = _worker(proc, 1)
        assert worker is not None
        worker.send_signal(signal.SIGKILL)
        proc.wait(timeout=400)
    finally:
        _kill_group(proc)
    out = proc.stdout.read()
    assert proc.returncode == 0, out[-3000:]
    assert "yet: starting from the beginning" in out and "resuming from" in out
    restarted = Mars.load(run, good_store)
    assert [h["phase"] for h in restarted.history] == ["pretrain"] * 8 + ["finetune"] * 2
    # 2 ranks x 256 cells = 1 process x 512 cells (full batches), within float tolerance
    one = RunConfig(model=ModelConfig(hidden=(32,), n_latent=8),
                    train=TrainConfig(pretrain_epochs=8, finetune_epochs=2, batch_size=512, min_steps_per_epoch=10,
                                      seed=3, device="cpu"))
    reference = Mars(good_store, unannotated="exp0", n_clusters=3, config=one).train()
    np.testing.assert_allclose(restarted.unannotated_landmarks, reference.unannotated_landmarks, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# 5. numerics


TINY = RunConfig(model=ModelConfig(hidden=(32,), n_latent=8),
                 train=TrainConfig(pretrain_epochs=2, finetune_epochs=3, batch_size=512, min_steps_per_epoch=2,
                                   seed=3, device="cpu"))


def _poison(monkeypatch, module, name: str, *, at_call: int, value: float, tuple_result: bool = False):
    original = getattr(module, name)
    calls = [0]

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if calls[0] - 1 == at_call:
            if tuple_result:
                return (out[0] * value, *out[1:])
            return out * value
        return out

    monkeypatch.setattr(module, name, poisoned)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_fine_tuning_loss_stops_and_keeps_the_last_checkpoint(tmp_path, good_store, monkeypatch, value):
    import mars_scale.train as train_module

    run = tmp_path / "run"
    # two fine-tuning steps per epoch (800 annotated cells in batches of 512): call 2 is epoch 2, step 1
    _poison(monkeypatch, train_module, "unannotated_cell_loss", at_call=2, value=value, tuple_result=True)
    with pytest.raises(TrainingError, match=rf"fine-tuning loss became {value} at epoch 2, step 1; the last good checkpoint is kept"):
        Mars(good_store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=run)
    saved = load_checkpoint(run / "checkpoint.pt")
    assert (saved["phase"], saved["epoch"]) == ("finetune", 1)
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
    monkeypatch.undo()
    resumed = Mars(good_store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=run, resume=True)
    assert resumed.is_trained and np.isfinite(resumed.unannotated_landmarks).all()


def test_non_finite_pretraining_loss_stops_through_the_cli(tmp_path, good_store, monkeypatch):
    run = tmp_path / "run"
    config = write_toml(tmp_path / "tiny.toml", pretrain=3, finetune=1, steps=2)
    # two steps per pretraining epoch: call 3 is epoch 2, step 2
    _poison(monkeypatch, torch.nn.functional, "mse_loss", at_call=3, value=float("nan"))
    result = cli("train", good_store, "--unannotated", "exp0", "--n-clusters", "3", "-o", run, "--config", config)
    assert_one_line_error(result, "pretraining loss became nan at epoch 2, step 2", "last good checkpoint is kept")
    saved = load_checkpoint(run / "checkpoint.pt")
    assert (saved["phase"], saved["epoch"]) == ("pretrain", 1)
    assert not (run / "model.pt").exists()
