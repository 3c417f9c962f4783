"""The run folder after a finished training: model.pt and summary.json, no second copy of the weights."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from click.testing import CliRunner

from conftest import make_adata
from mars_scale.cli import main
from mars_scale.ingest import IngestConfig, ingest


def test_finished_run_keeps_one_copy_and_resume_is_a_no_op(tmp_path):
    adata = make_adata(300, 60, n_experiments=3, seed=11)
    adata.obs["experiment"] = pd.Categorical(np.repeat(["exp0", "exp1", "exp2"], 100))
    adata.write_h5ad(tmp_path / "in.h5ad")
    store = ingest([tmp_path / "in.h5ad"], tmp_path / "atlas.zarr",
                   config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nhidden = [16]\nn_latent = 4\n[train]\npretrain_epochs = 1\nfinetune_epochs = 1\n")
    run = tmp_path / "run"
    args = ["train", str(store), "--unannotated", "exp0", "--n-clusters", "3", "-o", str(run), "--config", str(cfg),
            "--device", "cpu"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in run.iterdir()) == ["model.pt", "summary.json"]
    before = torch.load(run / "model.pt", weights_only=False)
    assert "optimizer" not in before and before["phase"] == "done"
    r = CliRunner().invoke(main, [*args, "--resume"])
    assert r.exit_code == 0, r.output
    after = torch.load(run / "model.pt", weights_only=False)
    assert after["history"] == before["history"]  # not trained again
    for key, value in before["model"].items():
        assert torch.equal(after["model"][key], value), key
    r = CliRunner().invoke(main, ["annotate", str(store), "--model", str(run), "--device", "cpu"])
    assert r.exit_code == 0, r.output
