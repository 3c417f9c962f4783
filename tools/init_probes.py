"""Probes of the initialisation and the training defaults (held-out labels are only scored).

Five probes, each appending one JSON line per run to ``OUT``:

``criteria``
    Pretrain once, then embed the held-out cells twice: straight after pretraining (``ae``) and
    after the supervised warm-up (``wu``). For each embedding: the ARI of K-means (what would
    initialise the landmarks) and unsupervised scores that could choose between the two
    (silhouette, fraction of variance left unexplained by the K-means, Calinski-Harabasz,
    Davies-Bouldin, agreement of single K-means restarts, and ``transfer``: the median distance
    of held-out cells to the nearest annotated class mean over that of annotated cells to
    their own). With ``--subset H5AD:COLUMN``, also the ARI on the held-out cells that a
    boolean column of the source h5ad flags (matched by cell name), e.g. CellBench's demuxlet
    singlets.
``pretrain``
    The ARI of K-means on the pretrained embedding, for training options given as JSON.
``curve``
    Pretrain once, then run the auto warm-up epoch by epoch up to ``--epochs`` without its stop:
    after each epoch, the annotated experiments' agreement that the stop reads (the
    leave-one-experiment-out nearest-class-mean accuracy) beside the ARI of K-means on the
    held-out cells, and the epoch at which the auto warm-up would have stopped.
``objective``
    Full MARS runs for seeds ``FIRST_SEED..FIRST_SEED+SEEDS-1`` (training options as JSON):
    the final epoch's objective beside the ARI, to see whether the objective could choose
    between restarts, or how an option changes the ARI seed by seed.
``demo``
    The ``mars-scale demo`` atlas (simulated; one type only in the held-out experiment) with
    training options as JSON: ARI, and per cluster its main true type, name and novelty. The
    positional arguments are ignored (pass ``- - 0``).

Examples::

    python tools/init_probes.py criteria atlas.zarr Dropseq_3cl 3 --seed 0 --out probes.jsonl \\
        --subset ../shared/data/cellbench_celseq2_dropseq.h5ad:singlet
    python tools/init_probes.py pretrain atlas.zarr Dropseq_3cl 3 --out probes.jsonl \\
        --options '{"batch_size": 4096, "min_steps_per_epoch": 1}'
    python tools/init_probes.py objective atlas.zarr batch_1 2 --seeds 5 --out probes.jsonl
    python tools/init_probes.py curve atlas.zarr Dropseq_3cl 3 --epochs 6 --out probes.jsonl
    python tools/init_probes.py objective atlas.zarr batch3 3 --seeds 5 --out probes.jsonl \
        --options '{"finetune_lr": 0.001}'
    python tools/init_probes.py demo - - 0 --options '{"finetune_lr": 0.001}' --out probes.jsonl
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)

from mars_scale.config import RunConfig, TrainConfig
from mars_scale.landmarks import kmeans, nearest
from mars_scale.model import Mars
from mars_scale.store import open_store


def _embedding(model: Mars, atlas, experiments: list[str]) -> tuple[np.ndarray, np.ndarray]:
    index, z = model.embed(atlas, experiments=experiments)
    order = np.argsort(index)
    return index[order], z[order].astype(np.float32)


def _kmeans_labels(z: np.ndarray, k: int, seed: int, n_init: int = 10) -> tuple[np.ndarray, np.ndarray]:
    centroids = kmeans(z, k, seed=seed, n_init=n_init).centroids
    return np.asarray(nearest(z, centroids)[0]), centroids


def _subset_mask(atlas, held: str, spec: str) -> np.ndarray:
    """Held-out cells flagged by ``H5AD:COLUMN`` (a boolean obs column), in store order."""
    import anndata
    import zarr

    path, column = spec.rsplit(":", 1)
    flags = anndata.read_h5ad(path, backed="r").obs[column].astype(bool)
    a, b = atlas.experiment_ranges[held]
    names = [str(n) for n in zarr.open_group(atlas.path, mode="r")["obs/_index"][a:b]]
    return flags.reindex(names).to_numpy(dtype=bool, na_value=False)


def _scores(model: Mars, atlas, held: str, k: int, seed: int, truth: np.ndarray,
            subset: np.ndarray | None = None) -> dict:
    _, z = _embedding(model, atlas, [held])
    labels, centroids = _kmeans_labels(z, k, seed)
    restarts = [_kmeans_labels(z, k, 100 + r, n_init=1)[0] for r in range(6)]
    agreement = [adjusted_rand_score(restarts[i], restarts[j]) for i in range(6) for j in range(i + 1, 6)]
    index_a, z_a = _embedding(model, atlas, [e for e in atlas.experiments if e != held])
    types = np.asarray(atlas.obs_column("cell_type"))[index_a]
    known = np.array([t is not None and t == t for t in types])
    names = sorted(set(types[known]))
    means = np.stack([z_a[known][types[known] == t].mean(0) for t in names])
    own = np.linalg.norm(z_a[known] - means[np.searchsorted(names, types[known])], axis=1)
    held_nearest = np.sqrt(((z[:, None] - means[None]) ** 2).sum(-1)).min(1)
    extra = {} if subset is None else {
        "ari_kmeans_subset": adjusted_rand_score(truth[subset], labels[subset]),
        "n_subset": int(subset.sum()),
    }
    return {
        "ari_kmeans": adjusted_rand_score(truth, labels),
        **extra,
        "sil": float(silhouette_score(z, labels)),
        "fvu": float(((z - centroids[labels]) ** 2).sum() / ((z - z.mean(0)) ** 2).sum()),
        "ch": float(calinski_harabasz_score(z, labels)),
        "db": float(davies_bouldin_score(z, labels)),
        "stability": float(np.mean(agreement)),
        "transfer": float(np.median(held_nearest) / np.median(own)),
    }


def probe_criteria(atlas, held: str, k: int, seed: int, truth: np.ndarray,
                   subset: np.ndarray | None = None, warmups: tuple[int, ...] = (10,)) -> dict:
    base = TrainConfig(seed=seed)
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pretrained"
        Mars(atlas, unannotated=held, n_clusters=k, config=RunConfig(train=base)).train(
            run_dir=pre, stop_after_epoch=base.pretrain_epochs)
        variants = [("ae", 0)] + [("wu" if w == 10 else f"wu{w}", w) for w in warmups]
        for name, warmup in variants:
            run = Path(tmp) / name
            run.mkdir()
            shutil.copy(pre / "checkpoint.pt", run / "checkpoint.pt")
            config = RunConfig(train=dataclasses.replace(base, warmup_epochs=warmup, finetune_epochs=0))
            model = Mars(atlas, unannotated=held, n_clusters=k, config=config).train(run_dir=run, resume=True)
            result[name] = _scores(model, atlas, held, k, seed, truth, subset)
    return result


def probe_pretrain(atlas, held: str, k: int, seed: int, truth: np.ndarray, options: dict) -> dict:
    config = RunConfig(train=dataclasses.replace(
        TrainConfig(seed=seed, warmup_epochs=0, finetune_epochs=0), **options))
    model = Mars(atlas, unannotated=held, n_clusters=k, config=config).train()
    _, z = _embedding(model, atlas, [held])
    return {"options": options, "ari_kmeans": adjusted_rand_score(truth, _kmeans_labels(z, k, seed)[0]),
            "mse_last": model.history[-1]["loss"] if model.history else None}


def probe_curve(atlas, held: str, k: int, seed: int, truth: np.ndarray, epochs: int, options: dict) -> dict:
    import mars_scale.train as train

    base = dataclasses.replace(TrainConfig(seed=seed, warmup_epochs=None, finetune_epochs=0), **options)
    bar, gain, cap = train.WARMUP_ALIGNED, train.WARMUP_MIN_GAIN, train.AUTO_WARMUP_EPOCHS
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        growing = Path(tmp) / "growing"
        try:  # record the whole curve: the stop never fires, the cap is `epochs`
            train.WARMUP_ALIGNED, train.WARMUP_MIN_GAIN, train.AUTO_WARMUP_EPOCHS = float("inf"), float("-inf"), epochs
            for epoch in range(epochs + 1):
                history = Mars(atlas, unannotated=held, n_clusters=k, config=RunConfig(train=base)).train(
                    run_dir=growing, resume=epoch > 0, stop_after_epoch=base.pretrain_epochs + epoch).state["history"]
                snapshot = Path(tmp) / f"after_{epoch}"
                snapshot.mkdir()
                shutil.copy(growing / "checkpoint.pt", snapshot / "checkpoint.pt")
                config = RunConfig(train=dataclasses.replace(base, warmup_epochs=epoch))
                model = Mars(atlas, unannotated=held, n_clusters=k, config=config).train(run_dir=snapshot, resume=True)
                _, z = _embedding(model, atlas, [held])
                aligned = [h["alignment"] for h in history if h["phase"] == "warmup"]
                curve.append({"epoch": epoch, "alignment": aligned[-1] if epoch else None,
                              "ari_kmeans": adjusted_rand_score(truth, _kmeans_labels(z, k, seed)[0])})
        finally:
            train.WARMUP_ALIGNED, train.WARMUP_MIN_GAIN, train.AUTO_WARMUP_EPOCHS = bar, gain, cap
    scores = [c["alignment"] for c in curve[1:]]
    stop = next((i + 1 for i in range(len(scores)) if train.warmup_should_stop(scores[: i + 1])), None)
    return {"options": options, "curve": curve, "auto_stops_after": stop}


def probe_objective(atlas, held: str, k: int, seed: int, truth: np.ndarray, options: dict) -> dict:
    model = Mars(atlas, unannotated=held, n_clusters=k,
                 config=RunConfig(train=TrainConfig(**{**options, "seed": seed}))).train()
    _, z = _embedding(model, atlas, [held])
    landmarks = model.unannotated_landmarks.astype(np.float32)
    labels = np.asarray(nearest(z, landmarks)[0])
    last = model.history[-1]
    return {"options": options, "ari": adjusted_rand_score(truth, labels), "loss": last["loss"],
            "annotated": last["annotated"], "unannotated": last["unannotated"]}


def probe_demo(seed: int, options: dict) -> dict:
    from mars_scale.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        result = run_demo(tmp, seed=seed, plots=False, train_options=options)
    return {"options": options, "ari": result.metrics["ari"], "novel_types": result.novel_types,
            "clusters": [{"truth": c["truth"], "label": c["label"], "novelty": c["novelty"]} for c in result.clusters]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe", choices=("criteria", "pretrain", "objective", "curve", "demo"))
    p.add_argument("store")
    p.add_argument("held_out")
    p.add_argument("k", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="objective: seeds FIRST..FIRST+N-1")
    p.add_argument("--first-seed", type=int, default=0, help="objective: the first seed")
    p.add_argument("--options", default="{}", help="pretrain, curve, objective, demo: TrainConfig options as JSON")
    p.add_argument("--epochs", type=int, default=6, help="curve: warm-up epochs to record")
    p.add_argument("--subset", help="criteria: also score the cells H5AD:COLUMN flags")
    p.add_argument("--warmups", default="10", help="criteria: warm-up epochs to compare, e.g. 2,5,10")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    options = json.loads(args.options)
    if args.probe != "demo":
        atlas = open_store(args.store)
        a, b = atlas.experiment_ranges[args.held_out]
        truth = np.asarray(atlas.obs_column("cell_type"))[a:b]
    seeds = range(args.first_seed, args.first_seed + args.seeds) if args.probe == "objective" else [args.seed]
    for seed in seeds:
        started = time.perf_counter()
        if args.probe == "criteria":
            subset = None if args.subset is None else _subset_mask(atlas, args.held_out, args.subset)
            warmups = tuple(int(w) for w in args.warmups.split(","))
            result = probe_criteria(atlas, args.held_out, args.k, seed, truth, subset, warmups)
        elif args.probe == "curve":
            result = probe_curve(atlas, args.held_out, args.k, seed, truth, args.epochs, options)
        elif args.probe == "pretrain":
            result = probe_pretrain(atlas, args.held_out, args.k, seed, truth, options)
        elif args.probe == "demo":
            result = probe_demo(seed, options)
        else:
            result = probe_objective(atlas, args.held_out, args.k, seed, truth, options)
        record = {"probe": args.probe, "held": args.held_out, "seed": seed, **result,
                  "seconds": round(time.perf_counter() - started, 1)}
        print(json.dumps(record), flush=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
