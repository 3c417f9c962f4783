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
    assert written == sorted(EXPECTED[:3])  # no truth of the new experiment: no truth figure
    assert all(_is_png(p) for p in (tmp_path / "cli").glob("*.png"))


def test_one_colour_per_category_titles_count_cells_and_umap_is_kept(small_store, tmp_path, monkeypatch):
    import anndata as ad

    import mars_scale.plotting as plotting

    model = Mars(small_store, unannotated="exp0", n_clusters=4, config=TINY).train()
    annotate(small_store, model, device="cpu")
    calls = []
    real = plotting._scatter

    def spy(coords, codes, categories, **kw):
        calls.append((codes.copy(), list(categories), kw))
        return real(coords, codes, categories, **kw)

    monkeypatch.setattr(plotting, "_scatter", spy)
    plot(small_store, output_dir=tmp_path / "figs", max_cells=200, seed=1)
    adata = ad.read_zarr(small_store)
    # one colour per category across figures and in uns, as scanpy keeps them
    truth = dict(zip(adata.obs["cell_type"].cat.categories, adata.uns["cell_type_colors"]))
    names = dict(zip(adata.obs["mars_cell_type"].cat.categories, adata.uns["mars_cell_type_colors"]))
    shared = set(truth) & set(names)
    assert shared and all(truth[c] == names[c] for c in shared)
    novel = set(names) - set(truth)
    assert not ({names[c] for c in novel} & set(truth.values()))
    by_file = {kw["path"].name: (codes, cats, kw) for codes, cats, kw in calls}
    assert by_file["umap_truth.png"][2]["colours"] == list(adata.uns["cell_type_colors"])
    assert by_file["umap_name.png"][2]["colours"] == list(adata.uns["mars_cell_type_colors"])
    # titles count the cells coloured; truth is the new experiment's only
    exp_codes, exp_cats, _ = by_file["umap_experiment.png"]
    exp0 = int((exp_codes == exp_cats.index("exp0")).sum())  # drawn
    assert 0 < exp0 < 200
    codes, _, kw = by_file["umap_name.png"]
    assert int((codes >= 0).sum()) == exp0 and f"exp0: {exp0:,} cells; {200 - exp0:,} of other" in kw["title"]
    codes, _, kw = by_file["umap_truth.png"]
    assert int((codes >= 0).sum()) == exp0 and kw["title"].startswith(f"ground truth of exp0: {exp0:,} cells")
    assert "a random 200 of 300 cells" in by_file["umap_experiment.png"][2]["title"]
    # the UMAP is kept: NaN for the cells left out of the subsample
    umap = adata.obsm["X_umap"]
    assert umap.shape == (300, 2) and int(np.isfinite(umap[:, 0]).sum()) == 200
    # a second plot reuses the stored colours and replaces X_umap
    plot(small_store, output_dir=tmp_path / "again", max_cells=300, seed=2)
    again = ad.read_zarr(small_store)
    assert list(again.uns["cell_type_colors"]) == list(adata.uns["cell_type_colors"])
    assert np.isfinite(again.obsm["X_umap"]).all()
