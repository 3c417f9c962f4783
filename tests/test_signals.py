"""SIGTERM and SIGINT during training: a mid-epoch checkpoint that resumes to the same model,
one line and exit 128 + signal; a re-run without --resume is refused; annotate says to resume.

Run like the SIGKILL tests of tests/test_reliability.py (real subprocesses, one CPU thread).
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from mars_scale.checkpoint import load_checkpoint
from test_reliability import (  # noqa: F401  (good_store and work are fixtures)
    assert_one_line_error,
    cli,
    good_store,
    mars_cmd,
    one_thread,
    subprocess_env,
    wait_for,
    work,
    write_toml,
)

pytestmark = [pytest.mark.filterwarnings(r"ignore:Object at \.mars-scale")]


@pytest.fixture(scope="module")
def straight(work, good_store) -> tuple[Path, list[str]]:
    """An uninterrupted run of the tiny configuration (the reference)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = write_toml(work / "signals.toml", pretrain=3, finetune=8, batch=64, steps=20)
        common = ["train", good_store, "--unannotated", "exp0", "--n-clusters", "3", "--config", config]
        result = cli(*common, "-o", work / "straight")
        assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(before)
    return work / "straight" / "model.pt", common


def _stop(proc: subprocess.Popen, run: Path, sig: int, *, phase: str) -> dict:
    """Send ``sig`` once a checkpoint of ``phase`` exists (and 50 ms more, into the next epoch; the
    straight run has enough epochs left that a fast machine cannot finish in that time)."""
    def reached():
        try:
            return load_checkpoint(run / "checkpoint.pt")["phase"] == phase
        except Exception:  # not there yet
            return False

    wait_for(reached, timeout=240, proc=proc, poll=0.005)
    time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: training stopped by " + signal.Signals(sig).name), err
    assert "--resume" in lines[-1] and "Traceback" not in err, err
    return load_checkpoint(run / "checkpoint.pt")


def _assert_same_model(resumed_path: Path, straight_path: Path) -> None:
    resumed, reference = load_checkpoint(resumed_path), load_checkpoint(straight_path)
    assert torch.equal(resumed["unannotated_landmarks"], reference["unannotated_landmarks"])
    assert torch.equal(resumed["annotated_landmarks"], reference["annotated_landmarks"])
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in reference["history"]]


@pytest.mark.parametrize("sig, phase", [(signal.SIGTERM, "pretrain"), (signal.SIGINT, "finetune")])
def test_signal_writes_a_mid_epoch_checkpoint_that_resumes_to_the_same_model(tmp_path, straight, one_thread,
                                                                             sig, phase):
    reference, common = straight
    run = tmp_path / "run"
    proc = subprocess.Popen(mars_cmd(*common, "-o", run), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    saved = _stop(proc, run, sig, phase=phase)
    assert 0 < saved["step"] <= 20 and saved["partial"] is not None  # in the middle of an epoch
    assert not (run / "model.pt").exists()

    # the same command again without --resume is refused, and nothing changes
    before = (run / "checkpoint.pt").read_bytes()
    err = assert_one_line_error(cli(*common, "-o", run), "holds an unfinished training run",
                                "pass --resume to continue it or --overwrite to start over")
    assert f"step {saved['step']}" in err
    assert (run / "checkpoint.pt").read_bytes() == before

    # annotate on the run directory says to resume
    assert_one_line_error(cli("annotate", common[1], "--model", run, "--device", "cpu"),
                          "training did not finish", "--resume")

    assert cli(*common, "-o", run, "--resume").exit_code == 0
    _assert_same_model(run / "model.pt", reference)


def test_overwrite_starts_an_unfinished_run_over(tmp_path, straight, one_thread):
    reference, common = straight
    run = tmp_path / "run"
    proc = subprocess.Popen(mars_cmd(*common, "-o", run), env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _stop(proc, run, signal.SIGTERM, phase="pretrain")
    assert cli(*common, "-o", run, "--overwrite").exit_code == 0
    _assert_same_model(run / "model.pt", reference)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_after_the_same_step(tmp_path, good_store, one_thread):  # noqa: F811
    """Slurm signals the torchrun agent, which passes SIGTERM to its workers: both ranks stop
    after the same step, rank 0 writes the checkpoint, and --resume ends with the model of an
    uninterrupted two-process run."""
    from test_reliability import _kill_group, _torchrun

    config = write_toml(tmp_path / "ddp.toml", pretrain=6, finetune=1, batch=64, steps=20)
    args = ["train", good_store, "--unannotated", "exp0", "--n-clusters", "3", "--config", config]
    run = tmp_path / "run"
    proc = _torchrun([*args, "-o", run])
    try:
        wait_for(lambda: (run / "checkpoint.pt").exists(), timeout=240, proc=proc, poll=0.01)
        time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        proc.wait(timeout=120)
        elapsed = time.monotonic() - sent
    finally:
        _kill_group(proc)
    out = proc.stdout.read()
    assert proc.returncode != 0 and elapsed < 60, (proc.returncode, elapsed, out[-3000:])
    assert out.count("error: training stopped by SIGTERM") == 2, out[-3000:]  # one line per rank, same step
    saved = load_checkpoint(run / "checkpoint.pt")
    assert saved["step"] > 0 and not (run / "model.pt").exists()
    for target, extra in ((run, ["--resume"]), (tmp_path / "straight", [])):
        proc = _torchrun([*args, "-o", target, *extra])
        try:
            proc.wait(timeout=300)
        finally:
            _kill_group(proc)
        assert proc.returncode == 0, proc.stdout.read()[-3000:]
    _assert_same_model(run / "model.pt", tmp_path / "straight" / "model.pt")
