"""The whole pipeline on a small simulated atlas: simulate, ingest, train, annotate, evaluate, plot.

``mars-scale demo`` runs it; it is also the quickest check that an installation works.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = ["DemoResult", "run_demo"]

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What the demo did: stage times, metrics, discovered novel types, and output paths."""

    directory: Path
    held_out: str
    n_clusters: int
    seconds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    kmeans_on_ae_ari: float = float("nan")
    novel_types: list[str] = field(default_factory=list)
    novel_clusters: list[str] = field(default_factory=list)
    clusters: list[dict[str, Any]] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)

    def summary(self) -> str:
        """A plain-text table for the terminal."""
        lines = [
            f"held-out experiment: {self.held_out} (K = {self.n_clusters})",
            f"ARI {self.metrics.get('ari', float('nan')):.3f}   NMI {self.metrics.get('nmi', float('nan')):.3f}   "
            f"accuracy {self.metrics.get('accuracy', float('nan')):.3f}   "
            f"(K-means on the pretrained embedding: ARI {self.kmeans_on_ae_ari:.3f})",
            f"types absent from the annotated experiments: {', '.join(self.novel_types) or 'none'}",
            "clusters called novel: " + (f"{len(self.novel_clusters)} (cluster {', '.join(self.novel_clusters)})"
                                          if self.novel_clusters else "none"),
            "",
            f"{'cluster':>8}  {'cells':>6}  {'name':<10} {'nearest':<10} {'prob':>5}  {'novelty':>7}  true majority",
        ]
        for c in self.clusters:
            lines.append(
                f"{c['cluster']:>8}  {c['n_cells']:>6}  {c['label']:<10} {c['nearest']:<10} {c['probability']:>5.2f}  "
                f"{c['novelty']:>7.2f}  {c['truth']}"
            )
        lines += ["", f"{'stage':<10} {'seconds':>8}"]
        lines += [f"{k:<10} {v:>8.1f}" for k, v in self.seconds.items()]
        lines += ["", "plots:"] + [f"  {p}" for p in self.plots]
        return "\n".join(lines)


def _held_out_choice(presence: np.ndarray) -> int:
    """The experiment with a type that no other experiment has (a novel type), else the last."""
    for e in range(presence.shape[0]):
        others = np.delete(presence, e, axis=0).any(axis=0)
        if (presence[e] & ~others).any():
            return e
    return presence.shape[0] - 1


def run_demo(
    directory: str | os.PathLike,
    *,
    n_cells: int = 4000,
    n_genes: int = 1000,
    n_experiments: int = 4,
    n_cell_types: int = 6,
    seed: int = 0,
    plots: bool = True,
    train_options: Mapping[str, Any] | None = None,
) -> DemoResult:
    """Run the whole pipeline on a simulated atlas in ``directory``.

    ``train_options`` overrides :class:`~mars_scale.config.TrainConfig` fields (the defaults
    otherwise, on the CPU), for probes of how an option changes the result.

    Returns
    -------
    DemoResult
        Stage timings, metrics of the held-out experiment against the simulated truth, the
        clusters called novel and the paths of the plots.
    """
    from mars_scale.annotate import annotate
    from mars_scale.config import RunConfig, TrainConfig
    from mars_scale.evaluate import kmeans_on_pretrained
    from mars_scale.ingest import IngestConfig, ingest
    from mars_scale.metrics import clustering_metrics
    from mars_scale.model import Mars
    from mars_scale.simulate import SimulationConfig, Simulator, write_h5ad_per_experiment
    from mars_scale.store import open_store

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # The first simulation (from ``seed`` on) in which some type occurs in one experiment only:
    # holding that experiment out gives a type to discover.
    # Candidates are built quietly: the simulation model is logged once, when it is written.
    sim_logger = logging.getLogger("mars_scale.simulate")
    level = sim_logger.level
    sim_logger.setLevel(logging.WARNING)
    try:
        for attempt in range(50):
            sim_config = SimulationConfig(
                n_cells=n_cells, n_genes=n_genes, n_experiments=n_experiments,
                n_cell_types=n_cell_types, seed=seed + attempt, restricted_type_fraction=0.3,
            )
            simulator = Simulator(sim_config)
            held = _held_out_choice(simulator.presence)
            others = np.delete(simulator.presence, held, axis=0).any(axis=0)
            if (simulator.presence[held] & ~others).any():
                break
    finally:
        sim_logger.setLevel(level)
    held_name = str(simulator.experiments[held])
    result = DemoResult(directory=directory, held_out=held_name, n_clusters=int(simulator.presence[held].sum()))
    result.novel_types = [str(t) for t in simulator.cell_types[simulator.presence[held] & ~others]]

    def stage(name: str):
        class _Timer:
            def __enter__(self):
                self.t = time.perf_counter()
                logger.info("demo: %s", name)

            def __exit__(self, *exc):
                result.seconds[name] = time.perf_counter() - self.t

        return _Timer()

    with stage("simulate"):
        h5ads = write_h5ad_per_experiment(directory / "h5ad", sim_config, overwrite=True)
    store_path = directory / "atlas.zarr"
    with stage("ingest"):
        # the held-out experiment's file is ingested like any other; its labels stay in the
        # store for evaluation only (training never reads them)
        ingest(h5ads, store_path, config=IngestConfig(experiment_key="experiment", label_key="cell_type"), overwrite=True)
    config = RunConfig(
        train=TrainConfig(**{"seed": seed, "device": "cpu", **(train_options or {})}),
    )
    run_dir = directory / "run"
    with stage("train"):
        model = Mars(store_path, unannotated=held_name, n_clusters=result.n_clusters, config=config)
        model.train(run_dir=run_dir, overwrite=True)  # a rerun of the demo starts over
        model.save(run_dir, overwrite=True)
    with stage("annotate"):
        annotation = annotate(store_path, run_dir, overwrite=True, seed=seed)
    with stage("evaluate"):
        store = open_store(store_path)
        a, b = store.experiment_ranges[held_name]
        truth_codes, types = store.categorical_codes("cell_type", a, b)
        cluster_codes, cluster_names = store.categorical_codes("mars_cluster", a, b)
        clusters = np.asarray(cluster_names, dtype=object)[cluster_codes]
        truth = np.asarray(types, dtype=object)[truth_codes]
        result.metrics = clustering_metrics(truth, clusters)
        init = kmeans_on_pretrained(model.state)
        if init is not None:
            idx = init["index"].numpy() - a
            result.kmeans_on_ae_ari = clustering_metrics(truth[idx], init["cluster"].numpy())["ari"]
        naming = annotation.naming
        for j, cid in enumerate(naming.clusters):
            members = clusters == str(cid)
            majority = "-"
            if members.any():
                values, counts = np.unique(truth[members], return_counts=True)
                majority = f"{values[np.argmax(counts)]} ({counts.max() / members.sum():.0%})"
            result.clusters.append({
                "cluster": str(cid), "n_cells": int(naming.n_cells[j]), "label": str(naming.label[j]),
                "nearest": str(naming.best_name[j]),
                "probability": float(naming.best_probability[j]), "novelty": float(naming.novelty[j]),
                "truth": majority,
            })
        result.novel_clusters = [c["cluster"] for c in result.clusters if c["label"] == naming.novel_label]
    if plots:
        from mars_scale.plotting import plot

        with stage("plot"):
            result.plots = [Path(p) for p in plot(store_path, output_dir=directory / "figures", seed=seed, max_cells=5000)]
    return result
