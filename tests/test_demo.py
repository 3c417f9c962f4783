"""The demo end to end (without the plots): the README's first command must give a good answer."""

from mars_scale.demo import run_demo


def test_demo_clusters_names_and_flags_the_new_type(tmp_path):
    result = run_demo(tmp_path / "demo", plots=False)
    assert result.metrics["ari"] >= 0.9, result.metrics
    assert result.novel_types, "the demo atlas must hold a type absent from the reference"
    by_cluster = {c["cluster"]: c for c in result.clusters}
    called_novel = [by_cluster[c] for c in result.novel_clusters]
    # every cluster called novel is mostly a new type, and every known type keeps a name
    assert called_novel and all(c["truth"].split(" ")[0] in result.novel_types for c in called_novel), result.clusters
    named = [c for c in result.clusters if c["cluster"] not in result.novel_clusters]
    assert all(c["label"] == c["truth"].split(" ")[0] for c in named), result.clusters
    assert {"simulate", "ingest", "train", "annotate"} <= set(result.seconds)


def test_demo_train_options_reach_the_training(tmp_path, caplog):
    from mars_scale.model import Mars

    with caplog.at_level("INFO", logger="mars_scale"):
        run_demo(tmp_path / "demo", n_cells=1200, n_genes=200, plots=False,
                 train_options={"pretrain_epochs": 1, "finetune_epochs": 2, "warmup_epochs": 0})
    # one log line per fact: the simulation model once (not once per candidate), and why the
    # fine-tuning loss may rise once
    assert caplog.text.count("simulation model:") == 1
    assert caplog.text.count("the loss logged is the cells' squared distance") == 1
    model = Mars.load(tmp_path / "demo" / "run", tmp_path / "demo" / "atlas.zarr")
    assert [h["phase"] for h in model.history] == ["pretrain", "finetune", "finetune"]
