"""Training: losses against full-batch forms, closed form, resume, DDP over gloo, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

from conftest import make_adata
from mars_scale.cli import main
from mars_scale.config import ConfigError, RunConfig, TrainConfig, config_from_dict, load_config
from mars_scale.errors import CheckpointMismatchError, InputError
from mars_scale.ingest import IngestConfig, ingest
from mars_scale.losses import closed_form_landmarks, landmark_separation, unannotated_landmark_loss
from mars_scale.model import Mars
from mars_scale.nn import ModelConfig
from mars_scale.store import open_store

TINY = RunConfig(
    model=ModelConfig(hidden=(32,), n_latent=8),
    train=TrainConfig(pretrain_epochs=2, finetune_epochs=3, batch_size=512, min_steps_per_epoch=2, seed=3, device="cpu"),
)


def _balanced_store(tmp_path: Path, sizes=(100, 120, 80), n_genes=60, name="atlas.zarr") -> Path:
    adata = make_adata(sum(sizes), n_genes, n_experiments=len(sizes), seed=11)
    adata.obs["experiment"] = pd.Categorical(np.repeat([f"exp{i}" for i in range(len(sizes))], sizes))
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    return ingest([path], tmp_path / name, config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))


# -- losses -----------------------------------------------------------------------------------


def test_closed_form_is_the_reference_update():
    means = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    prev = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.0, 3.0]])
    lam = 0.2
    got = closed_form_landmarks(means, prev, lam=lam)
    # p_k = (mu_k - lam/(K-1) * sum_{j != k} p_j) / (1 - lam), by hand for k = 0:
    # others = (3, 0) + (0, 3) = (3, 3); (0 - 0.1 * 3) / 0.8 = -0.375
    np.testing.assert_allclose(got[0].numpy(), [-0.375, -0.375])
    np.testing.assert_allclose(got[1].numpy(), [(2 - 0.1 * 1) / 0.8, (0 - 0.1 * 4) / 0.8])
    # one class: the mean
    np.testing.assert_allclose(closed_form_landmarks(means[:1], prev[:1], lam=lam).numpy(), means[:1].numpy())


def test_unannotated_loss_matches_eq2_by_hand():
    z = torch.tensor([[0.0], [1.0], [10.0]])
    p = torch.tensor([[0.0], [9.0]])
    # min distances 0, 1, 1 -> mean 2/3; separation: d(p0,p1) = 81 over K(K-1) = 2 ordered pairs
    # sum over ordered pairs = 162 -> 162 / 2 = 81
    assert landmark_separation(p).item() == pytest.approx(81.0)
    assert unannotated_landmark_loss(z, p, lam=0.2).item() == pytest.approx(2 / 3 - 0.2 * 81.0)



def test_padding_rows_count_in_no_unannotated_loss():
    """The same batch with and without the loader's padding rows gives the same cell loss, the
    same landmark loss and the same landmark gradient; a batch of padding alone gives 0."""
    from mars_scale.losses import unannotated_cell_loss

    rng = np.random.default_rng(4)
    z = torch.tensor(rng.normal(size=(6, 3)))
    pad = z[[0, 2]] + 50.0  # far from every landmark: counting them would move the loss a lot
    padded = torch.cat([z, pad])
    keep = torch.tensor([True] * 6 + [False] * 2)

    def landmark_step(rows, keep):
        p = torch.tensor(np.arange(9.0).reshape(3, 3) / 4, requires_grad=True)
        loss = unannotated_landmark_loss(rows, p, lam=0.2, keep=keep)
        loss.backward()
        return loss.item(), p.grad

    p = torch.tensor(np.arange(9.0).reshape(3, 3) / 4)
    reference = ((z.unsqueeze(1) - p.unsqueeze(0)) ** 2).sum(-1).min(1).values.mean()  # eq. 2 by hand
    loss, assign = unannotated_cell_loss(padded, p, keep=keep)
    assert float(loss) == pytest.approx(float(reference), rel=1e-12)
    assert float(unannotated_cell_loss(padded, p)[0]) > 10 * float(reference)  # unmasked, the padding counts
    assert assign.shape == (8,)
    loss_p, grad_p = landmark_step(padded, keep)
    loss_ref, grad_ref = landmark_step(z, None)
    assert loss_p == pytest.approx(loss_ref, rel=1e-12)
    torch.testing.assert_close(grad_p, grad_ref)
    only = unannotated_cell_loss(pad, p, keep=torch.zeros(2, dtype=torch.bool))[0]
    assert float(only) == 0.0 and torch.isfinite(only)


def _with_padding(batch, n_extra: int):
    """``batch`` with ``n_extra`` padding rows appended (repeats of its first rows, as the loader pads)."""
    from mars_scale.loader import Batch

    x = batch.x
    csr = sp.csr_matrix((x.values().numpy(), x.col_indices().numpy(), x.crow_indices().numpy()), shape=x.shape)
    rows = np.r_[np.arange(batch.n_rows), np.arange(n_extra)]
    grown = csr[rows]
    dtype = x.crow_indices().numpy().dtype
    return Batch(
        x=torch.sparse_csr_tensor(torch.from_numpy(grown.indptr.astype(dtype)), torch.from_numpy(grown.indices.astype(dtype)),
                                  torch.from_numpy(grown.data.astype(np.float32)), size=grown.shape),
        experiment=batch.experiment[rows], label=batch.label[rows], index=batch.index[rows],
        is_padding=torch.from_numpy(np.r_[batch.is_padding.numpy(), np.ones(n_extra, dtype=bool)]),
        epoch=batch.epoch, step=batch.step,
    )


def test_training_ignores_padding_rows_in_the_unannotated_batches(tmp_path, monkeypatch):
    """Fine-tuning on unannotated batches that carry extra padding rows (as a rank of a padded
    DDP epoch does) gives the model trained on the same batches without them."""
    import mars_scale.train as train_module
    from mars_scale.loader import Loader

    fine_tune_seed = TINY.train.seed + 2  # the trainer's unannotated fine-tuning stream

    class PaddedLoader(Loader):
        def __iter__(self):
            for batch in super().__iter__():
                yield _with_padding(batch, 3) if self.shuffle and self.seed == fine_tune_seed else batch

    store = _balanced_store(tmp_path)
    plain = Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train()
    monkeypatch.setattr(train_module, "Loader", PaddedLoader)
    padded = Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train()
    finetune = [[h["unannotated"] for h in m.history if h["phase"] == "finetune"] for m in (plain, padded)]
    np.testing.assert_allclose(finetune[1], finetune[0], rtol=1e-5)
    np.testing.assert_allclose(padded.unannotated_landmarks, plain.unannotated_landmarks, rtol=1e-5, atol=1e-6)

def test_training_ignores_padding_rows_in_every_stream(tmp_path, monkeypatch):
    """Padding rows in the pretraining, annotated and unannotated batches (a warm-up included)
    change no loss and no weight: the same history and model as without them."""
    import mars_scale.train as train_module
    from mars_scale.loader import Loader

    class PaddedLoader(Loader):
        def __iter__(self):
            for batch in super().__iter__():
                yield _with_padding(batch, 2) if self.shuffle else batch

    store = _balanced_store(tmp_path)
    config = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "warmup_epochs": 1}))
    plain = Mars(store, unannotated="exp0", n_clusters=3, config=config).train()
    monkeypatch.setattr(train_module, "Loader", PaddedLoader)
    padded = Mars(store, unannotated="exp0", n_clusters=3, config=config).train()
    assert [h["phase"] for h in padded.history] == ["pretrain"] * 2 + ["warmup"] + ["finetune"] * 3
    for key in ("loss", "annotated", "unannotated"):
        np.testing.assert_allclose([h.get(key, 0) for h in padded.history], [h.get(key, 0) for h in plain.history],
                                   rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(padded.unannotated_landmarks, plain.unannotated_landmarks, rtol=1e-5, atol=1e-6)


def test_the_trainers_minibatch_weights_add_up_to_the_full_annotated_term(tmp_path):
    """The trainer's own weights (train._AnnotatedWeights on the landmark lookup of
    train._AnnotatedLandmarks), over an epoch of the annotated training loader, make the mean
    batch loss the cell part of sum_i L_i computed by a dense loop; unlabelled rows weigh 0, and
    so do the padding rows of a rank in a two-rank epoch."""
    from mars_scale.loader import Loader
    from mars_scale.losses import annotated_cell_loss
    from mars_scale.train import _AnnotatedLandmarks, _AnnotatedWeights, plan_training

    sizes = (50, 121, 80)
    adata = make_adata(sum(sizes), 40, n_experiments=3, seed=5)
    adata.obs["experiment"] = pd.Categorical(np.repeat(["exp0", "exp1", "exp2"], sizes))
    types = adata.obs["cell_type"].astype(object).to_numpy()
    types[np.random.default_rng(2).random(len(types)) < 0.3] = np.nan  # unlabelled cells
    adata.obs["cell_type"] = pd.Categorical(types)
    adata.write_h5ad(tmp_path / "in.h5ad")
    store = open_store(ingest([tmp_path / "in.h5ad"], tmp_path / "a.zarr",
                              config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1)))
    plan = plan_training(store, unannotated="exp0", n_clusters=2)
    cpu = torch.device("cpu")
    annotated, weights = _AnnotatedLandmarks(plan, cpu), _AnnotatedWeights(plan, store, device=cpu)
    rng = np.random.default_rng(0)
    z = torch.tensor(rng.normal(size=(store.n_cells, 4)))  # a stand-in embedding per store row
    p = torch.tensor(rng.normal(size=(len(annotated.pairs), 4)))
    codes, _ = store.categorical_codes("cell_type", 0, store.n_cells)
    full = 0.0
    for name in plan.annotated:  # 1/N_e sum over the labelled cells j of e of d(z_j, p_{e, y_j})
        e, (lo, hi) = plan.experiments.index(name), store.experiment_ranges[name]
        cells = [j for j in range(lo, hi) if codes[j] >= 0]
        full += sum(float(((z[j] - p[int(annotated.lookup[e, codes[j]])]) ** 2).sum()) for j in cells) / len(cells)
    loader = Loader(store, batch_size=67, experiments=list(plan.annotated), shuffle=True, seed=1)  # 201 rows: 3 batches
    losses = []
    for batch in loader:
        idx = annotated.lookup[batch.experiment, batch.label.clamp(min=0)]
        w = weights(batch, idx)
        assert (w[batch.label < 0] == 0).all() and (w[batch.label >= 0] > 0).all()
        losses.append(float(annotated_cell_loss(z[batch.index], p[idx.clamp(min=0)], w)))
    assert len(losses) == 3 and np.mean(losses) == pytest.approx(full, rel=1e-6)
    padded = 0
    for rank in (0, 1):  # 201 rows over 2 ranks: one rank's last batch carries a padding row
        for batch in Loader(store, batch_size=60, experiments=list(plan.annotated), shuffle=True, seed=1,
                            rank=rank, world_size=2):
            w = weights(batch, annotated.lookup[batch.experiment, batch.label.clamp(min=0)])
            assert (w[batch.is_padding] == 0).all()
            padded += batch.n_padding
    assert padded > 0


def test_minibatch_annotated_loss_sums_to_full_batch():
    """The trainer's weights (losses.annotated_weights) make an epoch of batches add up to the
    cell part of sum_i L_i: each annotated experiment's mean over its labelled cells, computed
    here by a plain loop. Unlabelled rows are drawn too (they count in N_A, not in N_e)."""
    from mars_scale.losses import annotated_cell_loss, annotated_weights

    rng = np.random.default_rng(0)
    exp = np.repeat([1, 2, 3], [10, 20, 30])  # experiment 0 is the unannotated one: no rows here
    label = np.where(rng.random(60) < 0.25, -1, 0)
    z = rng.normal(size=(60, 4))
    t = rng.normal(size=(60, 4))
    full = 0.0
    for e in (1, 2, 3):  # 1/N_i sum_{labelled j in i} d(z_j, p_{y_j})
        cells = [j for j in range(60) if exp[j] == e and label[j] >= 0]
        full += sum(float(((z[j] - t[j]) ** 2).sum()) for j in cells) / len(cells)
    n_labelled = torch.zeros(4, dtype=torch.float64)
    for e in (1, 2, 3):
        n_labelled[e] = float(((exp == e) & (label >= 0)).sum())
    batches = np.split(rng.permutation(60), 6)  # an epoch: 6 batches of B = 10
    total = 0.0
    for batch in batches:
        w = annotated_weights(torch.tensor(label[batch] >= 0, dtype=torch.float64), torch.tensor(exp[batch]),
                              n_labelled, 60.0)
        assert (w[torch.tensor(label[batch] < 0)] == 0).all()
        total += float(annotated_cell_loss(torch.tensor(z[batch]), torch.tensor(t[batch]), w))
    assert total / len(batches) == pytest.approx(full, rel=1e-12)  # the mean of the batch losses


def test_annotated_contrast_loss_against_a_dense_loop():
    """Cross-entropy over each cell's own experiment's landmarks, weighted; zero weights drop out."""
    from mars_scale.losses import annotated_contrast_loss

    rng = np.random.default_rng(1)
    z = torch.tensor(rng.normal(size=(7, 3)))
    p = torch.tensor(rng.normal(size=(5, 3)))
    p_exp = torch.tensor([0, 0, 1, 1, 1])
    cell_exp = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    target = torch.tensor([1, 2, 4, 0, 3, -1, 2])
    w = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.3, 0.0, 0.0])
    expected = 0.0
    for j in range(7):
        if w[j] == 0:
            continue
        own = [k for k in range(5) if p_exp[k] == cell_exp[j]]
        d = {k: float(((z[j] - p[k]) ** 2).sum()) for k in own}
        log_norm = np.log(sum(np.exp(-v) for v in d.values()))
        expected += float(w[j]) * (d[int(target[j])] + log_norm)
    got = annotated_contrast_loss(z, p, p_exp, cell_exp, target, w)
    assert float(got) == pytest.approx(expected, rel=1e-10)
    # a cell far nearer its own landmark than any other costs almost nothing
    far = annotated_contrast_loss(torch.tensor([[0.0, 0, 0]]), torch.tensor([[0.0, 0, 0], [10.0, 0, 0]]),
                                  torch.tensor([0, 0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([1.0]))
    assert float(far) == pytest.approx(np.log1p(np.exp(-100.0)), abs=1e-12)
    with pytest.raises(ConfigError, match="annotated_contrast"):
        TrainConfig(annotated_contrast=-1.0)


# -- configuration ------------------------------------------------------------------------------


def test_config_file_is_validated(tmp_path):
    good = tmp_path / "a.toml"
    good.write_text("[model]\nhidden = [64]\nn_latent = 10\n[train]\nlam = 0.3\nbatch_size = 64\n")
    cfg = load_config(good)
    assert cfg.model.hidden == (64,) and cfg.train.lam == 0.3 and cfg.train.batch_size == 64
    bad = tmp_path / "b.toml"
    bad.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match=r"b.toml: unknown key train.learning_rate"):
        load_config(bad)
    with pytest.raises(ConfigError, match="must be of type int"):
        config_from_dict({"train": {"batch_size": "64"}})
    with pytest.raises(ConfigError, match="lam must be in"):
        config_from_dict({"train": {"lam": 1.5}})
    with pytest.raises(ConfigError, match="unknown section"):
        config_from_dict({"optimizer": {}})


def test_toml_examples_in_the_docs_are_valid_configs():
    """Every ```toml block of README.md and docs/ loads, and means what it says (a renamed option fails)."""
    root = Path(__file__).resolve().parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    blocks = [b for page in pages for b in re.findall(r"```toml\n(.*?)```", page.read_text(), flags=re.S)]
    assert blocks
    for block in blocks:
        data = tomllib.loads(block)
        config = config_from_dict(data, source="docs")
        for section, values in data.items():
            for key, value in values.items():
                expected = tuple(value) if isinstance(value, list) else value
                assert getattr(getattr(config, section), key) == expected, (section, key)


# -- training -----------------------------------------------------------------------------------


def test_bad_training_input(tmp_path):
    store = _balanced_store(tmp_path)
    with pytest.raises(InputError, match=r"unknown experiment 'nope' \(known: exp0, exp1, exp2\)"):
        Mars(store, unannotated="nope", n_clusters=2)
    with pytest.raises(InputError, match="positive integer"):
        Mars(store, unannotated="exp0", n_clusters=0)
    with pytest.raises(InputError, match="larger than the 100 cells"):
        Mars(store, unannotated="exp0", n_clusters=101)
    # a store with no labels has no annotated experiment
    adata = make_adata(80, 30, n_experiments=2, seed=5)
    del adata.obs["cell_type"]
    adata.write_h5ad(tmp_path / "nolab.h5ad")
    nolab = ingest([tmp_path / "nolab.h5ad"], tmp_path / "nolab.zarr", config=IngestConfig(experiment_key="experiment", min_cells=1))
    with pytest.raises(InputError, match="no annotated experiment"):
        Mars(nolab, unannotated="exp0", n_clusters=2)


def test_train_save_load_and_gene_check(tmp_path):
    store = _balanced_store(tmp_path)
    model = Mars(store, unannotated="exp0", n_clusters=4, config=TINY).train(run_dir=tmp_path / "run")
    assert model.is_trained
    assert model.unannotated_landmarks.shape == (4, 8)
    emb, exps, types = model.annotated_landmarks
    # one landmark per (annotated experiment, cell type) present
    adata = ad.read_zarr(store)
    present = adata.obs[adata.obs.experiment != "exp0"].groupby(["experiment", "cell_type"], observed=True).size()
    assert len(emb) == len(present) and set(zip(exps, types)) == set(present.index)
    assert [h["phase"] for h in model.history] == ["pretrain"] * 2 + ["finetune"] * 3
    model.save(tmp_path / "run")
    with pytest.raises(InputError, match="already exists"):
        model.save(tmp_path / "run")
    loaded = Mars.load(tmp_path / "run", store)
    idx0, z0 = model.embed(experiments=["exp0"])
    idx1, z1 = loaded.embed(experiments=["exp0"])
    np.testing.assert_array_equal(idx0, idx1)
    np.testing.assert_allclose(z0, z1, rtol=1e-6)
    # a store with other genes is refused
    adata = make_adata(300, 61, n_experiments=3, seed=11)
    adata.write_h5ad(tmp_path / "other.h5ad")
    other = ingest([tmp_path / "other.h5ad"], tmp_path / "other.zarr", config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))
    with pytest.raises(CheckpointMismatchError, match="genes do not match"):
        Mars.load(tmp_path / "run", other)



def test_store_spec_is_checked_when_a_model_or_checkpoint_is_loaded(tmp_path):
    """The checkpoint records the spec of the store it was trained on; loading it for a store
    whose spec reads differently (or with no spec recorded) is refused, naming the field."""
    from mars_scale.checkpoint import load_checkpoint, save_checkpoint

    store = _balanced_store(tmp_path)
    atlas = open_store(store)
    quick = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "pretrain_epochs": 1,
                                                             "finetune_epochs": 1}))
    model = Mars(store, unannotated="exp0", n_clusters=3, config=quick)
    model.train(run_dir=tmp_path / "part", stop_after_epoch=1)  # leaves checkpoint.pt
    model.train(run_dir=tmp_path / "run")
    model.save(tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / "model.pt")
    assert saved["store_spec"] == atlas.spec_version
    major, minor, patch = (int(v) for v in atlas.spec_version.split("."))

    def with_spec(path: Path, spec):
        payload = load_checkpoint(path)
        if spec is None:
            del payload["store_spec"]
        else:
            payload["store_spec"] = spec
        save_checkpoint(path, payload)

    # same major.minor while the major is 0: the spec reads alike, the model loads
    with_spec(tmp_path / "run" / "model.pt", f"{major}.{minor}.{patch + 7}")
    Mars.load(tmp_path / "run", store)
    newer = f"{major}.{minor + 1}.0"
    with_spec(tmp_path / "run" / "model.pt", newer)
    with pytest.raises(CheckpointMismatchError, match=rf"store spec {atlas.spec_version} .*store_spec {newer}"):
        Mars.load(tmp_path / "run", store)
    with pytest.raises(CheckpointMismatchError, match="store_spec"):
        Mars(store, unannotated="exp0", n_clusters=3, config=quick).train(run_dir=tmp_path / "run", resume=True)
    with_spec(tmp_path / "run" / "model.pt", None)
    with pytest.raises(CheckpointMismatchError, match="model.pt: store_spec is missing"):
        Mars.load(tmp_path / "run", store)
    # a training checkpoint is checked before a resume
    with_spec(tmp_path / "part" / "checkpoint.pt", "9.0.0")
    with pytest.raises(CheckpointMismatchError, match="store_spec 9.0.0"):
        Mars(store, unannotated="exp0", n_clusters=3, config=quick).train(run_dir=tmp_path / "part", resume=True)

def test_resume_gives_the_uninterrupted_result(tmp_path):
    store = _balanced_store(tmp_path)
    full = Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "full")
    part = Mars(store, unannotated="exp0", n_clusters=3, config=TINY)
    part.train(run_dir=tmp_path / "part", stop_after_epoch=3)  # pretraining + 1 fine-tuning epoch
    assert not part.is_trained
    resumed = Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "part", resume=True)
    np.testing.assert_array_equal(resumed.unannotated_landmarks, full.unannotated_landmarks)
    for key, value in full.state["model"].items():
        torch.testing.assert_close(resumed.state["model"][key], value, rtol=0, atol=0)


def test_resume_after_pretraining_only(tmp_path):
    store = _balanced_store(tmp_path)
    full = Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "full")
    Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "p", stop_after_epoch=1)
    resumed = Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "p", resume=True)
    np.testing.assert_array_equal(resumed.unannotated_landmarks, full.unannotated_landmarks)


def test_train_cli(tmp_path):
    store = _balanced_store(tmp_path)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nhidden = [32]\nn_latent = 8\n[train]\npretrain_epochs = 1\nfinetune_epochs = 1\n")
    r = CliRunner().invoke(main, ["train", str(store), "--unannotated", "exp1", "--n-clusters", "3", "-o", str(tmp_path / "run"), "--config", str(cfg), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "model.pt").exists()
    r = CliRunner().invoke(main, ["train", str(store), "--unannotated", "exp1", "--n-clusters", "3", "-o", str(tmp_path / "run")])
    assert r.exit_code == 2 and "already holds a trained model" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepochs = 3\n")
    r = CliRunner().invoke(main, ["train", str(store), "--unannotated", "exp1", "--n-clusters", "3", "-o", str(tmp_path / "r2"), "--config", str(bad)])
    assert r.exit_code == 2 and "unknown key train.epochs" in r.stderr


def _torchrun(args, nproc, env_extra=None, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + os.getpid() % 1000 + nproc), "-m", "mars_scale", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("sizes, k", [((100, 120, 80), "3"), ((100, 120, 80, 90), "3"), ((100, 120, 80), "auto")],
                         ids=["no-warmup", "auto-warmup", "auto-k"])
def test_two_gloo_ranks_match_one_process(tmp_path, sizes, k):
    """2 ranks x half the batch = 1 process x the whole batch (every step sees all rows).

    With 3 annotated experiments the auto warm-up runs too, and its agreement check (summed
    over ranks) must read the same on both. With ``--n-clusters auto`` rank 0 chooses K and
    the other rank gets it.
    """
    store = _balanced_store(tmp_path, sizes=sizes)
    common = ["train", str(store), "--unannotated", "exp0", "--n-clusters", k, "--device", "cpu"]
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\nhidden = [32]\nn_latent = 8\n[train]\npretrain_epochs = 2\nfinetune_epochs = 3\nseed = 1\n")
    one = _torchrun([*common, "-o", str(tmp_path / "one"), "--config", str(cfg), "--batch-size", "512"], nproc=1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun([*common, "-o", str(tmp_path / "two"), "--config", str(cfg), "--batch-size", "256"], nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    a = Mars.load(tmp_path / "one", store)
    b = Mars.load(tmp_path / "two", store)
    np.testing.assert_allclose(b.unannotated_landmarks, a.unannotated_landmarks, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b.annotated_landmarks[0], a.annotated_landmarks[0], rtol=1e-4, atol=1e-4)
    _, za = a.embed(experiments=["exp0"])
    _, zb = b.embed(experiments=["exp0"])
    np.testing.assert_allclose(zb, za, rtol=1e-3, atol=1e-4)
    aligned = [[h["alignment"] for h in m.history if h["phase"] == "warmup"] for m in (a, b)]
    assert (len(aligned[0]) > 0) == (len(sizes) == 4)  # the warm-up runs with 3 annotated experiments
    np.testing.assert_allclose(aligned[1], aligned[0], atol=1e-6)


def test_annotated_contrast_enters_the_encoder_steps(tmp_path, monkeypatch):
    """With annotated_contrast > 0 every warm-up and fine-tuning step adds the cross-entropy of
    the annotated cells over their own experiment's landmarks; with 0 it is never computed."""
    import mars_scale.train as train_module

    calls = []
    real = train_module.annotated_contrast_loss

    def spy(z, p, p_exp, cell_exp, target, w):
        calls.append((tuple(z.shape), tuple(p.shape), bool((p_exp[target.clamp(min=0)] == cell_exp)[w > 0].all())))
        return real(z, p, p_exp, cell_exp, target, w)

    monkeypatch.setattr(train_module, "annotated_contrast_loss", spy)
    store = _balanced_store(tmp_path)
    Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train()
    assert calls == []
    config = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "annotated_contrast": 1.0}))
    model = Mars(store, unannotated="exp0", n_clusters=3, config=config).train()
    finetune = [h for h in model.history if h["phase"] == "finetune"]
    assert len(finetune) == 3 and all(np.isfinite(h["loss"]) for h in finetune)
    assert len(calls) >= 3 and all(ok for _, _, ok in calls)  # each target is a landmark of the cell's experiment
    assert calls[0][1][0] == len(model.annotated_landmarks[0])


def test_unused_landmarks_are_reported_and_pruned(tmp_path):
    # the unannotated experiment holds 100 copies of one cell: K-means puts the 3 landmarks at
    # the same place, every cell chooses the first, and the other two stay unused
    adata = make_adata(300, 60, n_experiments=3, seed=11)
    adata.obs["experiment"] = pd.Categorical(np.repeat(["exp0", "exp1", "exp2"], [100, 120, 80]))
    x = adata.X.toarray()
    x[:100] = x[0]
    adata.X = sp.csr_matrix(x)
    adata.write_h5ad(tmp_path / "dup.h5ad")
    store = ingest([tmp_path / "dup.h5ad"], tmp_path / "dup.zarr",
                   config=IngestConfig(experiment_key="experiment", label_key="cell_type", min_cells=1))
    kept = Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train()
    full_usage = kept.state["landmark_usage"].numpy()
    assert len(full_usage) == 3 and full_usage.sum() == 100 and (full_usage == 0).sum() == 2
    config = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "prune_unused": True}))
    pruned = Mars(store, unannotated="exp0", n_clusters=3, config=config).train()
    assert pruned.state["landmark_usage"].tolist() == [100]
    np.testing.assert_array_equal(pruned.unannotated_landmarks, kept.unannotated_landmarks[full_usage > 0])


def test_warmup_resumes_exactly_and_uses_only_the_annotated_term(tmp_path):
    store = _balanced_store(tmp_path)
    config = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "warmup_epochs": 2}))
    full = Mars(store, unannotated="exp0", n_clusters=3, config=config).train(run_dir=tmp_path / "full")
    phases = [h["phase"] for h in full.history]
    assert phases == ["pretrain"] * 2 + ["warmup"] * 2 + ["finetune"] * 3
    warmup = [h for h in full.history if h["phase"] == "warmup"]
    assert all(h["unannotated"] == 0 and h["annotated"] > 0 for h in warmup)
    # the landmarks are initialised after the warm-up, so they differ from a run without it;
    # the K-means on the pretrained embedding (the baseline) is the plain run's initialisation
    no_warmup = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "warmup_epochs": 0}))
    plain = Mars(store, unannotated="exp0", n_clusters=3, config=no_warmup).train(run_dir=tmp_path / "plain")
    assert not np.allclose(plain.unannotated_landmarks, full.unannotated_landmarks)
    assert plain.state["kmeans_pretrained"] is None
    for key in ("index", "cluster"):
        torch.testing.assert_close(full.state["kmeans_pretrained"][key], plain.state["kmeans_init"][key])
    # interrupted inside the warm-up (2 pretraining + 1 warm-up epoch), then resumed
    Mars(store, unannotated="exp0", n_clusters=3, config=config).train(run_dir=tmp_path / "part", stop_after_epoch=3)
    resumed = Mars(store, unannotated="exp0", n_clusters=3, config=config).train(run_dir=tmp_path / "part", resume=True)
    np.testing.assert_array_equal(resumed.unannotated_landmarks, full.unannotated_landmarks)
    assert [h["phase"] for h in resumed.history] == phases


@pytest.mark.parametrize(("configured", "n_annotated", "expected"),
                         [(None, 1, 0), (None, 2, 0), (None, 3, 10), (None, 19, 10), (0, 19, 0), (4, 1, 4)])
def test_auto_warmup_needs_three_annotated_experiments(configured, n_annotated, expected):
    from mars_scale.train import resolve_warmup_epochs

    assert resolve_warmup_epochs(configured, n_annotated=n_annotated) == expected


def test_alignment_matches_a_dense_leave_one_experiment_out_classifier(tmp_path):
    from mars_scale.distributed import DistInfo
    from mars_scale.nn import Autoencoder
    from mars_scale.train import _alignment, _class_means, embed, plan_training

    store = open_store(_balanced_store(tmp_path, sizes=(60, 90, 70, 80)))
    plan = plan_training(store, unannotated="exp0", n_clusters=3)
    model = Autoencoder.from_config(store.n_genes, TINY.model, mean=torch.as_tensor(store.var_column("mean")),
                                    std=torch.as_tensor(store.var_column("std")), rng=torch.Generator().manual_seed(5))
    info, cpu = DistInfo(), torch.device("cpu")
    sums, counts = _class_means(model.encoder, store, plan, batch_size=64, device=cpu, info=info, n_latent=8)
    got = _alignment(model.encoder, store, plan, sums, counts, batch_size=64, device=cpu, info=info)
    # reference: every annotated cell against the class means of the cells of the other experiments
    parts = list(embed(model.encoder, store, experiments=list(plan.annotated), batch_size=64, device=cpu, info=info))
    exp, lab, z = (torch.cat([p[i] for p in parts]).numpy() for i in (1, 2, 3))
    right = scored = 0
    for e in np.unique(exp):
        other = (exp != e) & (lab >= 0)
        types = np.unique(lab[other])
        means = np.stack([z[other & (lab == t)].astype(np.float64).mean(0) for t in types])
        mine = (exp == e) & np.isin(lab, types)
        nearest = types[((z[mine][:, None, :] - means[None]) ** 2).sum(-1).argmin(1)]
        right += int((nearest == lab[mine]).sum())
        scored += int(mine.sum())
    assert scored > 0 and 0 < right < scored  # an untrained encoder misclassifies some cells
    assert got == pytest.approx(right / scored, abs=1e-12)


@pytest.mark.parametrize(("alignment", "stop"), [
    ([], False), ([0.95], False), ([0.992], True), ([0.95, 0.97], False), ([0.95, 0.953], True),
    ([0.95, 0.96, 0.991], True), ([float("nan")], False), ([0.9, 0.89], True),
])
def test_the_auto_warmup_stops_once_the_annotated_experiments_agree(alignment, stop):
    from mars_scale.train import warmup_should_stop

    assert warmup_should_stop(alignment) is stop


def test_auto_warmup_records_alignment_stops_early_and_resumes_exactly(tmp_path, monkeypatch):
    import mars_scale.train as train

    store = _balanced_store(tmp_path, sizes=(100, 120, 80, 90))
    auto = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "warmup_epochs": None}))
    # an unreachable bar and no minimum gain: the warm-up runs to its cap, recording alignment
    monkeypatch.setattr(train, "AUTO_WARMUP_EPOCHS", 3)
    monkeypatch.setattr(train, "WARMUP_ALIGNED", 2.0)
    monkeypatch.setattr(train, "WARMUP_MIN_GAIN", -1.0)
    capped = Mars(store, unannotated="exp0", n_clusters=3, config=auto).train()
    scores = [h["alignment"] for h in capped.history if h["phase"] == "warmup"]
    assert len(scores) == 3 and all(0 <= a <= 1 for a in scores)
    # a bar just under the first epoch's score: one epoch, then the landmarks
    monkeypatch.setattr(train, "WARMUP_ALIGNED", scores[0] - 1e-9)
    full = Mars(store, unannotated="exp0", n_clusters=3, config=auto).train(run_dir=tmp_path / "full")
    assert [h["phase"] for h in full.history] == ["pretrain"] * 2 + ["warmup"] + ["finetune"] * 3
    assert sum(h["phase"] == "warmup" for h in full.state["history"]) == 1
    # interrupted right after the early stop, then resumed: the same landmarks
    Mars(store, unannotated="exp0", n_clusters=3, config=auto).train(run_dir=tmp_path / "part", stop_after_epoch=3)
    resumed = Mars(store, unannotated="exp0", n_clusters=3, config=auto).train(run_dir=tmp_path / "part", resume=True)
    np.testing.assert_array_equal(resumed.unannotated_landmarks, full.unannotated_landmarks)
    # an explicit number of epochs is run in full, without the check
    fixed = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "warmup_epochs": 3}))
    history = Mars(store, unannotated="exp0", n_clusters=3, config=fixed).train().history
    warm = [h for h in history if h["phase"] == "warmup"]
    assert len(warm) == 3 and not any("alignment" in h for h in warm)


def test_negative_warmup_is_refused():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(warmup_epochs=-1)


def test_rows_per_block_reaches_the_training_loaders(tmp_path, monkeypatch):
    import mars_scale.train as train_module

    store = _balanced_store(tmp_path)
    made = []
    original = train_module.Loader

    def spy(*args, **kwargs):
        loader = original(*args, **kwargs)
        made.append((kwargs.get("rows_per_block"), loader.n_blocks))
        return loader

    monkeypatch.setattr(train_module, "Loader", spy)
    config = RunConfig(model=TINY.model, train=TrainConfig(**{**TINY.train.__dict__, "rows_per_block": 16}))
    Mars(store, unannotated="exp0", n_clusters=3, config=config).train()
    training = [n for rows, n in made if rows == 16]
    assert len(training) == 3  # pretraining, annotated and unannotated streams
    assert training[0] >= 100 // 16  # exp0's 100 cells in blocks of about 16 rows
    with pytest.raises(ConfigError, match="rows_per_block"):
        TrainConfig(rows_per_block=0)


def test_cli_annotated_contrast_reaches_the_training_config(tmp_path, monkeypatch):
    """``train --annotated-contrast W`` sets ``TrainConfig.annotated_contrast``; a negative weight
    is refused with exit 2 before anything is trained."""
    from click.testing import CliRunner

    import mars_scale.model as model_module
    from mars_scale.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_mars(store, *, unannotated, n_clusters, config, **_):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(model_module, "Mars", fake_mars)
    args = ["train", str(tmp_path / "atlas.zarr"), "--unannotated", "e", "--n-clusters", "3",
            "-o", str(tmp_path / "run"), "--device", "cpu"]
    result = CliRunner().invoke(main, [*args, "--annotated-contrast", "10"])
    assert isinstance(result.exception, Stop), result.output
    assert seen["config"].train.annotated_contrast == 10.0
    result = CliRunner().invoke(main, args)
    assert seen["config"].train.annotated_contrast == 0.0
    refused = CliRunner().invoke(main, [*args, "--annotated-contrast", "-1"])
    assert refused.exit_code == 2 and "annotated_contrast" in refused.output


def test_a_checkpoint_of_another_format_version_is_refused(tmp_path):
    """The checkpoint is the TrainState plus provenance, format version 1; another version is
    refused with a one-line error instead of being half-read."""
    from mars_scale.checkpoint import load_checkpoint, save_checkpoint

    store = _balanced_store(tmp_path)
    Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "part", stop_after_epoch=1)
    path = tmp_path / "part" / "checkpoint.pt"
    payload = load_checkpoint(path)
    assert payload["format_version"] == 1 and payload["phase"] == "pretrain" and payload["epoch"] == 1
    save_checkpoint(path, {**payload, "format_version": 2})
    with pytest.raises(CheckpointMismatchError, match="checkpoint format version 2"):
        Mars(store, unannotated="exp0", n_clusters=3, config=TINY).train(run_dir=tmp_path / "part", resume=True)
    r = CliRunner().invoke(main, ["train", str(store), "--unannotated", "exp0", "--n-clusters", "3", "--device", "cpu",
                                  "-o", str(tmp_path / "part"), "--resume"])
    assert r.exit_code == 2 and "checkpoint format version 2" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_auto_k_is_chosen_recorded_and_resumed_exactly(tmp_path):
    """n_clusters="auto": K from the silhouette and the reference types reached, written into
    the model; a run stopped after the choice resumes to the same model."""
    store = _balanced_store(tmp_path, sizes=(150, 120, 130))
    full = Mars(store, unannotated="exp0", n_clusters="auto", config=TINY).train(run_dir=tmp_path / "full")
    choice = full.state["n_clusters_choice"]
    k = full.plan.n_clusters
    assert k == choice["n_clusters"] == full.state["n_clusters"] == len(full.unannotated_landmarks)
    assert k == max(choice["best_silhouette"], choice["reference_types_reached"])
    assert 1 <= choice["reference_types_reached"] <= 4  # the store's four types
    silhouette = {int(q): v for q, v in choice["silhouette"].items()}
    assert min(silhouette) == 2 and choice["best_silhouette"] == max(silhouette, key=silhouette.get)
    full.save(tmp_path / "full")
    loaded = Mars.load(tmp_path / "full", store)
    assert loaded.plan.n_clusters == k
    part = Mars(store, unannotated="exp0", n_clusters="auto", config=TINY)
    part.train(run_dir=tmp_path / "part", stop_after_epoch=3)  # pretraining, the choice, 1 fine-tuning epoch
    resumed = Mars(store, unannotated="exp0", n_clusters="auto", config=TINY).train(run_dir=tmp_path / "part",
                                                                                   resume=True)
    assert resumed.state["n_clusters_choice"] == choice
    np.testing.assert_array_equal(resumed.unannotated_landmarks, full.unannotated_landmarks)


def test_auto_k_on_the_command_line(tmp_path):
    store = _balanced_store(tmp_path)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("[model]\nhidden = [32]\nn_latent = 8\n[train]\npretrain_epochs = 1\nfinetune_epochs = 1\n")
    r = CliRunner().invoke(main, ["train", str(store), "--unannotated", "exp1", "--n-clusters", "auto", "-o",
                                  str(tmp_path / "run"), "--config", str(cfg), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    k = Mars.load(tmp_path / "run", store).plan.n_clusters
    assert re.search(rf"K = {k} chosen \(best silhouette at K = \d+, \d+ reference types reached\)", r.output)
    r = CliRunner().invoke(main, ["train", str(store), "--unannotated", "exp1", "--n-clusters", "many", "-o",
                                  str(tmp_path / "r2")])
    assert r.exit_code == 2 and "neither a whole number nor auto" in r.stderr
