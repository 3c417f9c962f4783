"""Compare fine-tuning settings from one pretrained checkpoint on a simulated atlas.

Pretrains once (kept in ``OUT/pretrained``), then, for one variant, resumes from that checkpoint
with the given training options and reports, on the held-out experiment:

- ``mars``: ARI of the assignment to the unannotated landmarks (what ``annotate`` writes);
- ``used``: landmarks that at least one cell chooses;
- ``km_init``: ARI of the K-means that initialised the landmarks;
- ``km_final``: ARI of K-means (scikit-learn, 10 restarts) on the final embedding;
- ``nearest_annotated``: ARI of the name of the nearest annotated landmark.

Each result is appended to ``OUT/results.jsonl``. The held-out labels are only scored, never
used for a choice inside a run.

Example::

    python tools/finetune_variants.py atlas.zarr out wu5_ft5 --held-out exp00 --k 23 \\
        warmup_epochs=5 finetune_epochs=5 annotated_cells_per_epoch=None
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
import typing
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from mars_scale.config import RunConfig, TrainConfig
from mars_scale.model import Mars
from mars_scale.store import open_store

BASE = {"batch_size": 512, "annotated_cells_per_epoch": 20000, "pretrain_epochs": 10, "finetune_epochs": 10,
        "device": "cpu"}


def parse_options(pairs: list[str]) -> dict:
    hints = typing.get_type_hints(TrainConfig)
    out = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        if key not in hints:
            raise SystemExit(f"unknown train option {key!r}")
        if value == "None":
            out[key] = None
        else:
            kind = next(a for a in (*typing.get_args(hints[key]), hints[key]) if a in (int, float, str, bool))
            out[key] = kind(float(value)) if kind is int else kind(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("out", type=Path)
    p.add_argument("name")
    p.add_argument("options", nargs="*", help="train options as key=value")
    p.add_argument("--held-out", default="exp00")
    p.add_argument("--k", type=int, default=23)
    args = p.parse_args()
    atlas = open_store(args.store)
    pre = args.out / "pretrained"
    if not (pre / "checkpoint.pt").exists():
        Mars(atlas, unannotated=args.held_out, n_clusters=args.k, config=RunConfig(train=TrainConfig(**BASE))).train(
            run_dir=pre, stop_after_epoch=BASE["pretrain_epochs"])
    run = args.out / args.name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    shutil.copy(pre / "checkpoint.pt", run / "checkpoint.pt")
    options = parse_options(args.options)
    config = RunConfig(train=dataclasses.replace(TrainConfig(**BASE), **options))
    started = time.perf_counter()
    model = Mars(atlas, unannotated=args.held_out, n_clusters=args.k, config=config).train(run_dir=run, resume=True)
    seconds = time.perf_counter() - started

    experiment = np.asarray(atlas.obs_column("experiment"))
    held = np.flatnonzero(experiment == args.held_out)
    truth = np.asarray(atlas.obs_column("cell_type"))[held]
    index, z = model.embed(atlas, experiments=[args.held_out])
    z = z[np.argsort(index)]

    def nearest(points: np.ndarray) -> np.ndarray:
        return ((z[:, None, :] - points[None]) ** 2).sum(-1).argmin(1)

    assignment = nearest(model.unannotated_landmarks)
    annotated, _, names = model.annotated_landmarks
    init = model.state["kmeans_init"]
    result = {
        "name": args.name, "options": options,
        "mars": adjusted_rand_score(truth, assignment), "used": int(len(np.unique(assignment))),
        "km_init": adjusted_rand_score(truth[np.searchsorted(held, init["index"].numpy())], init["cluster"].numpy()),
        "km_final": adjusted_rand_score(truth, KMeans(args.k, n_init=10, random_state=0).fit_predict(z)),
        "nearest_annotated": adjusted_rand_score(truth, np.asarray(names)[nearest(annotated)]),
        "train_s": round(seconds),
    }
    print(json.dumps(result))
    with open(args.out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
