"""plot: PNG figures of an annotated store (UMAP by cluster, name, experiment, truth; confusion)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from mars_scale.annotate import annotate
from mars_scale.cli import main
from mars_scale.config import RunConfig, TrainConfig
from mars_scale.errors import StoreError
from mars_scale.model import Mars
from mars_scale.nn import ModelConfig
from mars_scale.plotting import plot

TINY = RunConfig(
    model=ModelConfig(hidden=(32,), n_latent=8),
    train=TrainConfig(pretrain_epochs=2, finetune_epochs=2, batch_size=128, min_steps_per_epoch=2, device="cpu"),
)
EXPECTED = ["umap_cluster.png", "umap_name.png", "umap_experiment.png", "umap_truth.png",
            "confusion_cluster.png", "confusion_name.png"]


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_plot_writes_non_empty_pngs(small_store, tmp_path):
    with pytest.raises(StoreError, match="mars-scale annotate"):
        plot(small_store, output_dir=tmp_path / "none")
    model = Mars(small_store, unannotated="exp0", n_clusters=4, config=TINY).train()
    annotate(small_store, model, device="cpu")
    paths = plot(small_store, output_dir=tmp_path / "figs", max_cells=200, seed=1)
    assert [p.name for p in paths] == EXPECTED
    for p in paths:
        assert _is_png(p), p
    assert not list((tmp_path / "figs").glob(".*"))  # no temporary files left

    # the CLI, and a store whose unannotated experiment has no ground truth: no confusion plots
    copy = tmp_path / "copy.zarr"
    shutil.copytree(small_store, copy)
    codes = copy / "obs" / "cell_type" / "codes"
    import zarr

    arr = zarr.open_array(codes, mode="r+")
    values = np.asarray(arr[:])
    from mars_scale.store import open_store

    a, b = open_store(copy).experiment_ranges["exp0"]
    values[a:b] = -1  # the unannotated experiment loses its ground truth
    arr[:] = values
    result = CliRunner().invoke(main, ["plot", str(copy), "-o", str(tmp_path / "cli"), "--max-cells", "150"])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in (tmp_path / "cli").glob("*.png"))
    assert written == sorted(EXPECTED[:4])
    assert all(_is_png(p) for p in (tmp_path / "cli").glob("*.png"))
