"""Run folder size: what a finished training leaves on disk, all genes and a gene selection.

Trains once per gene setting on a store (a short training: the sizes depend on the genes and
the network, not on the epochs), lists the run folder after ``train`` (the checkpoint written
after every epoch, what the earlier layout kept beside the model) and after ``save`` (the
model; ``save`` now removes the checkpoint). Results: ``benchmarks/results/run_folder.json``.

Example::

    python benchmarks/run_folder.py ../shared/data/cellbench_celseq2_dropseq.h5ad \\
        --unannotated Dropseq_3cl --n-clusters 3 --n-top-genes 0,2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_result  # noqa: E402


def _sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("h5ad", type=Path, help="Input with obs['experiment'] and obs['cell_type'].")
    parser.add_argument("--unannotated", required=True)
    parser.add_argument("--n-clusters", type=int, required=True)
    parser.add_argument("--n-top-genes", default="0,2000", help="Comma-separated; 0 = all genes.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from mars_scale.config import RunConfig, TrainConfig
    from mars_scale.ingest import IngestConfig, ingest
    from mars_scale.model import Mars

    settings = [int(v) for v in args.n_top_genes.split(",")]
    runs = {}
    with tempfile.TemporaryDirectory(prefix="mars-run-folder-") as tmp:
        store = ingest([args.h5ad], Path(tmp) / "atlas.zarr",
                       config=IngestConfig(experiment_key="experiment", label_key="cell_type"))
        for n in settings:
            config = RunConfig(train=TrainConfig(pretrain_epochs=1, finetune_epochs=1, warmup_epochs=0, device="cpu",
                                                 seed=args.seed, n_top_genes=n or None))
            run = Path(tmp) / f"run-{n or 'all'}"
            model = Mars(store, unannotated=args.unannotated, n_clusters=args.n_clusters, config=config)
            model.train(run_dir=run)
            after_train = _sizes(run)
            model.save(run)
            after_save = _sizes(run)
            runs["all" if n == 0 else str(n)] = {
                "n_genes": int(model.state["gene_index"].numel()) if model.state.get("gene_index") is not None
                else len(model.state["gene_ids"]),
                "after_train_bytes": after_train,
                "after_save_bytes": after_save,
                "earlier_layout_total_bytes": sum(after_train.values()) + after_save.get("model.pt", 0),
                "now_total_bytes": sum(after_save.values()),
            }
            print(n or "all", runs["all" if n == 0 else str(n)])
    path = write_result("run_folder", {"parameters": {"input": args.h5ad.name, "unannotated": args.unannotated,
                                                       "n_clusters": args.n_clusters, "settings": settings},
                                        "runs": runs})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
