"""The ``mars-scale`` command line: parses options and calls the Python API, nothing more."""

from __future__ import annotations

import functools
import json
import logging
import sys

import click

from mars_scale.errors import MarsScaleError

logger = logging.getLogger("mars_scale")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("mars_scale")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _user_errors(fn):
    """Turn MarsScaleError (bad input, config, store) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MarsScaleError as exc:
            click.echo("error: " + " ".join(str(exc).split()), err=True)  # always one line
            sys.exit(getattr(exc, "exit_code", 2))  # 2, or 128 + signal for TrainingInterrupted
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.version_option(package_name="mars-scale")
def main(verbose: int, quiet: bool) -> None:
    """mars-scale: discover and name cell types across single-cell experiments, at atlas scale."""
    _setup_logging(verbose, quiet)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="Store to create (.zarr).")
@click.option("--experiment-key", default=None, help="obs column naming each cell's experiment (default: one experiment per file, named after it).")
@click.option("--label-key", default=None, help="obs column with cell types; missing values mark unannotated cells.")
@click.option("--unlabeled-values", multiple=True, default=None, metavar="VALUE",
              help="A label value meaning 'no cell type' (repeat per value; replaces the default list: "
                   "'', NA, nan, Unknown, unknown, unassigned).")
@click.option("--genes", type=click.Choice(["intersection", "union"]), default="intersection", show_default=True)
@click.option("--gene-key", default=None, help="var column with gene ids (default: var_names).")
@click.option("--layer", default=None, help="Read counts from this layer instead of X.")
@click.option("--min-counts", type=float, default=1.0, show_default=True, help="Drop cells with fewer total counts (paper: 5000 reads).")
@click.option("--min-genes", type=int, default=1, show_default=True, help="Drop cells with fewer expressed genes (paper: 500).")
@click.option("--min-cells", type=int, default=5, show_default=True, help="Drop genes expressed in fewer cells (paper: 5).")
@click.option("--rows-per-chunk", type=int, default=128, show_default=True, help="Cells per chunk of X.")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), default="3", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
@click.option("--append", "append_", is_flag=True,
              help="Add the experiments of INPUTS to the existing store OUTPUT (its genes and chunking; "
                   "atomic; an experiment name it has is refused).")
@click.option("--workers", type=int, default=None,
              help="Read, check and summarise blocks on a dask LocalCluster of this many processes "
                   "(same store as without).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run the block work on the dask cluster of this scheduler (tcp://host:8786); "
                   "its workers must read INPUTS at the same paths.")
@_user_errors
def ingest(inputs, output, experiment_key, label_key, unlabeled_values, genes, gene_key, layer, min_counts,
           min_genes, min_cells, rows_per_chunk, zarr_format, overwrite, append_, workers, scheduler) -> None:
    """Stream h5ad files or AnnData .zarr stores INPUTS into a new atlas store (or add them to one).

    Every other obs and var column of the inputs is carried over with its type.
    """
    from mars_scale.append import append as run_append
    from mars_scale.ingest import IngestConfig, ingest as run_ingest
    from mars_scale.store import StoreLayout

    try:
        layout = StoreLayout(rows_per_chunk=rows_per_chunk, zarr_format=int(zarr_format))
        config = IngestConfig(
            experiment_key=experiment_key, label_key=label_key, genes=genes, gene_key=gene_key,
            layer=layer, min_counts=min_counts, min_genes=min_genes, min_cells=min_cells, layout=layout,
            **({"unlabeled_values": tuple(unlabeled_values)} if unlabeled_values else {}),
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if append_:
        if overwrite:
            raise click.UsageError("--append adds to OUTPUT; it cannot be combined with --overwrite")
        result = run_append(list(inputs), output, config=config, workers=workers, scheduler=scheduler)
        for name, n in result.experiments.items():
            click.echo(f"appended {name}: {n:,} cells ({result.absent_genes[name]:,} store genes absent, read as zero)")
        for name, n in result.dropped_genes.items():
            if n:
                click.echo(f"{name}: {n:,} genes not in the store, dropped")
        click.echo(f"wrote {result.store}")
        return
    path = run_ingest(list(inputs), output, config=config, overwrite=overwrite, workers=workers,
                      scheduler=scheduler)
    click.echo(f"wrote {path}")


@main.command()
@click.argument("store", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_user_errors
def info(store, as_json) -> None:
    """Describe an atlas STORE: cells, genes, experiments, cell types, size."""
    from mars_scale.store import open_store

    summary = open_store(store).summary()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    s = summary
    click.echo(f"{s['path']}  (mars-scale store spec {s['spec_version']}, zarr v{s['zarr_format']}, {s['input_kind']})")
    click.echo(
        f"{s['n_cells']:,} cells x {s['n_genes']:,} genes, {s['nnz']:,} non-zeros "
        f"(density {s['density']:.4f}), {s['size_bytes'] / 1e6:,.1f} MB on disk"
    )
    click.echo(f"{len(s['experiments'])} experiments, {len(s['cell_types'])} cell types")
    if not s["checksums"]:
        click.echo(f"no chunk checksums (spec {s['spec_version']}, written before 0.1.1): "
                   "read without checks; re-run \"mars-scale ingest\" to add them")
    width = max(len(e["name"]) for e in s["experiments"])
    for e in s["experiments"]:
        types = ", ".join(f"{t} {n}" for t, n in e["cell_types"].items()) or "-"
        notes = [f"appended ({e['appended']})"] if e["appended"] else []
        if e["absent_genes"]:
            notes.append(f"{e['absent_genes']:,} genes absent")
        notes += [f"MARS results {key}" for key in e["annotation_runs"]]
        click.echo(
            f"  {e['name']:<{width}}  {e['n_cells']:>10,} cells  "
            f"{100 * e['annotated_fraction']:5.1f}% annotated  {types}"
            + (f"  [{'; '.join(notes)}]" if notes else "")
        )
    for run in s["annotation_runs"]:
        click.echo(f"annotation run {run['key']}: {', '.join(run['experiments']) or '?'} "
                   f"(run {run['run_id']}, {run['date'] or 'date unknown'}, model {run['model'] or '?'})")


@main.command()
@click.argument("store", type=click.Path(path_type=str))
@click.option("--quick", is_flag=True, help="Check only metadata, shard indexes and chunk sizes.")
@_user_errors
def verify(store, quick) -> None:
    """Check every chunk (checksums) and the structure of X in STORE; exit 2 at the first damage."""
    from mars_scale.verify import verify_store

    click.echo(verify_store(store, quick=quick).summary())


def _n_clusters(value: str | None, words: tuple[str, ...] = ("auto",)) -> int | str | None:
    if value is None or value in words:
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a whole number nor {' nor '.join(words)}",
                                 param_hint="--n-clusters") from None


@main.command()
@click.argument("store", type=click.Path(path_type=str))
@click.option("--unannotated", multiple=True, metavar="EXPERIMENT",
              help="Experiment whose cell types are discovered; repeat it for several that share the landmarks (one new study of several donors).")
@click.option("--n-clusters", default=None, callback=lambda ctx, param, value: _n_clusters(value), metavar="K|auto",
              help="Number of unannotated landmarks K (with --unannotated), or auto: the best silhouette of K-means on the new cells' embedding after the warm-up, at least the number of reference types they reach (docs/algorithm.md).")
@click.option("--reference-only", is_flag=True, help="Train only what depends on the annotated experiments (pretraining on them, warm-up, annotated landmarks), to start later runs --from.")
@click.option("--from", "reference", type=click.Path(path_type=str), default=None, help="Start from this --reference-only run: its network and annotated landmarks are reused, only the new experiments' landmarks and the fine-tuning are trained.")
@click.option("-o", "--output", "run_dir", required=True, type=click.Path(path_type=str), help="Run directory (checkpoints, model.pt).")
@click.option("--config", "config_file", type=click.Path(path_type=str), default=None, help="TOML file with [model] and [train] tables.")
@click.option("--pretrain-epochs", type=int, default=None, help="Autoencoder epochs (default: 25, or the config file's).")
@click.option("--finetune-epochs", type=int, default=None, help="MARS fine-tuning epochs (default: 30, or the config file's).")
@click.option("--batch-size", type=int, default=None, help="Cells per minibatch per process (under torchrun, per GPU) and per stream (default: 128, or the config file's).")
@click.option("--n-top-genes", type=int, default=None, help="Train on this many highly variable genes (seurat_v3 over experiments, from the counts); the model records them for annotate (default: all genes, or the config file's).")
@click.option("--annotated-contrast", type=float, default=None, help="Weight of the cross-entropy that pushes each annotated cell from its siblings' landmarks; 10 when the reference holds close subtypes (default: 0, or the config file's; docs/algorithm.md).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto, or the config file's).")
@click.option("--seed", type=int, default=None, help="Seeds weights, K-means and batch order (default: 0, or the config file's).")
@click.option("--resume", is_flag=True, help="Continue from RUN_DIR/checkpoint.pt.")
@click.option("--overwrite", is_flag=True, help="Replace an existing model in RUN_DIR.")
@_user_errors
def train(store, unannotated, n_clusters, reference_only, reference, run_dir, config_file, pretrain_epochs,
          finetune_epochs, batch_size, n_top_genes, annotated_contrast, device, seed, resume, overwrite) -> None:
    """Train MARS on STORE with one experiment (or several) held out as unannotated.

    mars-scale train STORE --reference-only -o ref/ trains a reference once; then
    mars-scale train STORE --unannotated donor7 --n-clusters 12 --from ref/ -o run/
    trains a new experiment at a cost that follows its own size.

    Runs as one process, or on several GPUs or nodes under torchrun:
    torchrun --nproc_per_node 8 -m mars_scale train STORE ...
    Under torchrun, --resume without a checkpoint yet starts from the beginning, so that
    torchrun --max-restarts N ... train --resume restarts from the last checkpoint.
    """
    from mars_scale.config import RunConfig, load_config, override
    from mars_scale.device import resolve_device
    from mars_scale.distributed import init_distributed, shutdown
    from mars_scale.model import Mars

    config = load_config(config_file) if config_file else RunConfig()
    config = override(config, pretrain_epochs=pretrain_epochs, finetune_epochs=finetune_epochs,
                      batch_size=batch_size, n_top_genes=n_top_genes, annotated_contrast=annotated_contrast,
                      device=device, seed=seed)
    if not (unannotated or reference_only):
        raise click.UsageError("pass --unannotated EXPERIMENT (with --n-clusters), or --reference-only")
    if reference_only and (unannotated or reference or n_clusters is not None):
        raise click.UsageError("--reference-only takes no --unannotated, --n-clusters or --from")
    if unannotated and n_clusters is None:
        raise click.UsageError("--unannotated needs --n-clusters")
    info = init_distributed(resolve_device(config.train.device))
    if not info.is_main:
        logging.getLogger("mars_scale").setLevel(logging.WARNING)
    try:
        model = Mars(store, unannotated=unannotated, n_clusters=n_clusters, config=config,
                     reference_only=reference_only, reference=reference)
        model.train(run_dir=run_dir, resume=resume, overwrite=overwrite, info=info)
        if info.is_main:
            path = model.save(run_dir, overwrite=True)
            usage = model.state.get("landmark_usage")
            unused = int((usage == 0).sum()) if usage is not None else 0
            click.echo(f"wrote {path} (a reference of {len(model.plan.annotated)} annotated experiments)" if reference_only
                       else f"wrote {path} ({unused} unused landmarks)")
            choice = model.state.get("n_clusters_choice")
            if choice:
                click.echo(f"K = {choice['n_clusters']} chosen (best silhouette at K = {choice['best_silhouette']}, "
                           f"{choice['reference_types_reached']} reference types reached)")
    finally:
        shutdown(info)


@main.command()
@click.argument("store", type=click.Path(path_type=str))
@click.option("--model", "run_dir", required=True, type=click.Path(path_type=str), help="Run directory (or model.pt) of a trained model.")
@click.option("--space", type=click.Choice(["latent", "umap"]), default="latent", show_default=True, help="Where clusters are named.")
@click.option("--key", "key_added", default="mars", show_default=True, help="Prefix of the results (obs/<key>_*, obsm/X_<key>, uns/<key>).")
@click.option("--overwrite", is_flag=True, help="Replace earlier results (and an existing --export file).")
@click.option("--export", type=click.Path(path_type=str), default=None, help="Also write the results alone to this .h5ad file.")
@click.option("--batch-size", type=int, default=4096, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the per-cluster samples (and UMAP).")
@click.option("--novelty-threshold", type=float, default=0.5, show_default=True, help="A cluster whose novelty reaches this is called novel.")
@click.option("--novelty-method", type=click.Choice(["matching", "margin"]), default="matching", show_default=True, help="matching: clusters matched one to one to the known types; margin: the earlier score.")
@click.option("--min-cluster-cells", type=int, default=10, show_default=True, help="Landmarks with fewer cells are dropped, their cells moved to the nearest other landmark.")
@click.option("--split-test/--no-split-test", default=True, show_default=True, help="Check the naming on expression: look inside each cluster called known for a population the reference lacks (a close subtype new to it) and call it new, and swap the calls of a cluster called new and the known cluster holding its nearest name where the reference's cells of that name are the first (docs/algorithm.md, 'The split test', 'A new cluster that is the known type').")
@click.option("--siblings/--no-siblings", default=True, show_default=True, help="With the split test: name close known types (subsets) per cell on expression in the clusters that mix them, where a classifier does better on annotated experiments it did not see than the embedding or the cluster's name would (docs/algorithm.md, 'Known siblings').")
@_user_errors
def annotate(store, run_dir, space, key_added, overwrite, export, batch_size, device, seed, novelty_threshold,
             novelty_method, min_cluster_cells, split_test, siblings) -> None:
    """Embed every cell of STORE, then cluster and name the model's unannotated experiment."""
    from mars_scale.annotate import annotate as run_annotate

    result = run_annotate(store, run_dir, key_added=key_added, space=space, overwrite=overwrite,
                          batch_size=batch_size, device=device, seed=seed, export=export,
                          novelty_threshold=novelty_threshold, novelty_method=novelty_method,
                          min_cluster_cells=min_cluster_cells, split_test=split_test, siblings=siblings)
    merged = f", {len(result.merged_landmarks)} merged into others" if result.merged_landmarks else ""
    click.echo(f"{result.unannotated}: {result.n_unannotated:,} cells in {result.naming.n_clusters} clusters "
               f"({len(result.unused_landmarks)} unused landmarks{merged})")
    rows = result.cluster_table()
    width = max([len("name")] + [len(r["name"]) for r in rows])
    click.echo(f"{'cluster':>7}  {'cells':>9}  {'name':<{width}}  {'probability':>11}  {'novelty':>7}  description")
    for r in rows:
        click.echo(f"{r['cluster']:>7}  {r['n_cells']:>9,}  {r['name']:<{width}}  {r['probability']:>11.3f}  "
                   f"{r['novelty']:>7.3f}  {r['description']}")
    click.echo(f"wrote {', '.join(result.written)} into {result.store}")
    if result.export is not None:
        click.echo(f"wrote {result.export}")


@main.command()
@click.argument("store", type=click.Path(path_type=str))
@click.option("--leave-one-out", "leave_one_out", is_flag=True, help="Hold out every annotated experiment in turn; score clusters against K-means baselines, names and novelty calls.")
@click.option("--annotation", "annotation_key", default=None, metavar="KEY", help="Score the annotation already in STORE under KEY (annotate --key) against the annotated experiment's own cell_type labels; trains nothing, writes nothing into STORE.")
@click.option("--remove-type", "remove_types", multiple=True, metavar="TYPE", help="Removed-type protocol: for each held-out experiment holding TYPE, hide TYPE's cells in the other experiments (they stay in the data as unlabelled cells, weight 0 in the annotated loss; the store is not modified), train, and score TYPE as new. Repeatable; 'all': each type with at least --min-type-cells cells in each held-out experiment, in turn.")
@click.option("--seeds", type=int, default=None, help="Number of seeds (0, 1, ..., N-1) per held-out experiment or scenario (default: 5 for --leave-one-out, 1 for --remove-type).")
@click.option("--config", "config_file", type=click.Path(path_type=str), default=None, help="TOML file with [model] and [train] tables.")
@click.option("--experiment", "experiments", multiple=True, help="Hold out only this experiment (repeatable).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--n-clusters", default="truth", show_default=True, metavar="truth|K|auto",
              callback=lambda ctx, param, value: _n_clusters(value, ("truth", "auto")),
              help="Protocols: K of each training: the held-out experiment's number of types (truth), a whole number, or auto (MARS chooses, as train --n-clusters auto).")
@click.option("--min-type-cells", type=int, default=10, show_default=True, help="With --remove-type all: least cells of a type in the held-out experiment.")
@click.option("--min-cluster-cells", type=int, default=10, show_default=True, help="Protocols: before naming, landmarks with fewer cells are merged into the nearest other one (as annotate does).")
@click.option("--novelty-threshold", type=float, default=0.5, show_default=True, help="Protocols: a cluster whose novelty reaches this is called novel.")
@click.option("--split-test/--no-split-test", default=True, show_default=True, help="Protocols: name with annotate's split test (as annotate does by default).")
@click.option("-o", "--output", "output_dir", default="mars-evaluation", show_default=True, type=click.Path(path_type=str), help="Directory for evaluation.json, evaluation.md and (protocols) assignments.npz.")
@_user_errors
def evaluate(store, leave_one_out, annotation_key, remove_types, seeds, config_file, experiments, device,
             n_clusters, min_type_cells, min_cluster_cells, novelty_threshold, split_test, output_dir) -> None:
    """Score MARS on STORE: a protocol that trains (--leave-one-out, --remove-type) or a stored annotation.

    The protocols train once per held-out experiment (or scenario) and seed, say how many
    trainings that is before starting and, after the first, how long the rest will take.
    Where a K-means baseline beats MARS (mean ARI), the report says so.
    """
    from mars_scale.config import RunConfig, load_config, override
    from mars_scale.evaluate import (annotation_markdown, leave_one_out as run_loo, leave_type_out,
                                     markdown_table, score_annotation, write_report)

    modes = [name for name, on in (("--leave-one-out", leave_one_out), ("--annotation", annotation_key is not None),
                                   ("--remove-type", bool(remove_types))) if on]
    if not modes:
        raise click.UsageError("pass --leave-one-out, --annotation KEY or --remove-type TYPE")
    if len(modes) > 1:
        raise click.UsageError(f"pass only one of {', '.join(modes)}")
    if annotation_key is not None:
        given = [flag for flag, value in (("--seeds", seeds), ("--config", config_file), ("--experiment", experiments),
                                          ("--device", device), ("--n-clusters", n_clusters != "truth")) if value]
        if given:
            raise click.UsageError(f"--annotation scores without training: {', '.join(given)} do not apply")
        result = score_annotation(store, key_added=annotation_key)
        paths = write_report(result, output_dir)
        click.echo(annotation_markdown(result), nl=False)
        click.echo(f"wrote {paths['json']}, {paths['markdown']}")
        return
    if seeds is None:
        seeds = 5 if leave_one_out else 1
    if seeds < 1:
        raise click.BadParameter(f"must be at least 1, got {seeds}", param_hint="--seeds")
    config = load_config(config_file) if config_file else RunConfig()
    config = override(config, device=device)
    progress = functools.partial(click.echo, err=True)
    options = dict(seeds=tuple(range(seeds)), config=config, experiments=list(experiments) or None, k=n_clusters,
                   min_cluster_cells=min_cluster_cells, novelty_threshold=novelty_threshold, split_test=split_test,
                   progress=progress)
    if leave_one_out:
        result = run_loo(store, **options)
    else:
        types = "all" if "all" in remove_types else list(remove_types)
        result = leave_type_out(store, types, min_type_cells=min_type_cells, **options)
    paths = write_report(result, output_dir)
    click.echo(markdown_table(result), nl=False)
    click.echo(f"wrote {paths['json']}, {paths['markdown']}, {paths['assignments']}")


@main.command()
@click.argument("store", type=click.Path(path_type=str))
@click.option("-o", "--output", "output_dir", default="mars-figures", show_default=True, type=click.Path(path_type=str), help="Directory for the PNG files.")
@click.option("--key", "key_added", default="mars", show_default=True, help="Prefix the results were written under.")
@click.option("--max-cells", type=int, default=50_000, show_default=True, help="Most cells in the UMAP (random subsample).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the subsample and UMAP.")
@_user_errors
def plot(store, output_dir, key_added, max_cells, seed) -> None:
    """Draw UMAPs (clusters, names, experiments, ground truth) and confusion heatmaps of STORE."""
    from mars_scale.plotting import plot as run_plot

    for path in run_plot(store, output_dir=output_dir, key_added=key_added, max_cells=max_cells, seed=seed):
        click.echo(f"wrote {path}")


@main.command()
@click.option("-o", "--output", required=True, type=click.Path(path_type=str),
              help="Store to create (.zarr), .h5ad file, or directory of .h5ad files with --per-experiment.")
@click.option("--cells", type=int, default=10_000, show_default=True, help="Number of cells.")
@click.option("--genes", type=int, default=20_000, show_default=True, help="Number of genes.")
@click.option("--experiments", type=int, default=4, show_default=True, help="Number of experiments (batches).")
@click.option("--cell-types", type=int, default=10, show_default=True, help="Number of cell types.")
@click.option("--seed", type=int, default=0, show_default=True, help="The atlas is a function of the options and the seed.")
@click.option("--subtypes", type=int, default=0, show_default=True,
              help="Extra cell types, each a subtype of one of the others (type03 -> type03_b).")
@click.option("--subtype-closeness", type=float, default=0.8, show_default=True,
              help="How close a subtype is to its parent, in (0, 1] (1: the parent's programme).")
@click.option("--condition-fraction", type=float, default=0.0, show_default=True,
              help="Fraction of the experiments stimulated by a condition shared by all types, "
                   "like interferon (0: none).")
@click.option("--condition-strength", type=float, default=1.0, show_default=True,
              help="Typical log fold-change of the condition's genes.")
@click.option("--condition-specificity", type=float, default=0.0, show_default=True,
              help="Genes each lineage raises in stimulated cells besides the shared programme, as a "
                   "multiple of its size (0: one programme for all types).")
@click.option("--format", "fmt", type=click.Choice(["zarr", "h5ad"]), default=None,
              help="zarr: an atlas store, streamed without an intermediate file; h5ad: input for "
                   "\"mars-scale ingest\". Default: h5ad if OUTPUT ends in .h5ad or with --per-experiment, else zarr.")
@click.option("--per-experiment", is_flag=True, help="Write one .h5ad file per experiment into the directory OUTPUT (h5ad only).")
@click.option("--rows-per-chunk", type=int, default=128, show_default=True, help="Cells per chunk of X (zarr).")
@click.option("--zarr-format", type=click.Choice(["2", "3"]), default="3", show_default=True)
@click.option("--jobs", type=int, default=1, show_default=True, help="Worker processes generating cells (same output for any value).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@_user_errors
def simulate(output, cells, genes, experiments, cell_types, seed, subtypes, subtype_closeness,
             condition_fraction, condition_strength, condition_specificity, fmt, per_experiment, rows_per_chunk,
             zarr_format, jobs, overwrite) -> None:
    """Simulate an atlas with known cell types and batch effects, streaming with bounded memory.

    Counts are negative binomial with varying library sizes, cell-type programmes and
    experiment effects; some cell types occur in only some experiments. Optionally some types
    have close subtypes, and some experiments carry a condition shared by all types.
    """
    from mars_scale.simulate import SimulationConfig, write_h5ad, write_h5ad_per_experiment, write_store
    from mars_scale.store import StoreLayout

    if fmt is None:
        fmt = "h5ad" if per_experiment or output.endswith(".h5ad") else "zarr"
    if per_experiment and fmt != "h5ad":
        raise click.UsageError("--per-experiment writes .h5ad files; use it with --format h5ad")
    config = SimulationConfig(n_cells=cells, n_genes=genes, n_experiments=experiments,
                              n_cell_types=cell_types, seed=seed, n_subtypes=subtypes,
                              subtype_closeness=subtype_closeness,
                              condition_fraction=condition_fraction,
                              condition_strength=condition_strength,
                              condition_specificity=condition_specificity)
    if fmt == "zarr":
        try:
            layout = StoreLayout(rows_per_chunk=rows_per_chunk, zarr_format=int(zarr_format))
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        path = write_store(output, config, layout=layout, n_jobs=jobs, overwrite=overwrite)
    elif per_experiment:
        files = write_h5ad_per_experiment(output, config, n_jobs=jobs, overwrite=overwrite)
        click.echo(f"wrote {len(files)} files to {output}")
        return
    else:
        path = write_h5ad(output, config, n_jobs=jobs, overwrite=overwrite)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--dir", "directory", type=click.Path(path_type=str), default="mars-scale-demo", show_default=True,
              help="Where the simulated data, store, model and figures go.")
@click.option("--cells", type=int, default=4000, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--no-plots", is_flag=True, help="Skip the UMAP and confusion figures.")
@_user_errors
def demo(directory, cells, seed, no_plots) -> None:
    """Run the whole pipeline on a small simulated atlas and print what it found.

    Simulate four experiments (one with a cell type no other has), ingest them from h5ad, hold
    that experiment out unannotated, train, annotate, evaluate against the simulated truth and
    plot.
    """
    from mars_scale.demo import run_demo

    result = run_demo(directory, n_cells=cells, seed=seed, plots=not no_plots)
    click.echo(result.summary())


if __name__ == "__main__":  # pragma: no cover
    main()
