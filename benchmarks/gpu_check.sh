#!/usr/bin/env bash
# One-GPU check, under 5 minutes: a CUDA training epoch on a simulated store, a 1-rank nccl
# process group, faiss GPU or the torch fallback for nearest-landmark search, and the loader
# feeding the GPU (cells/s). Run from the repository root with the package importable:
#   bash benchmarks/gpu_check.sh [SCRATCH_DIR]
# DEVICE=cpu CELLS=5000 runs the same steps on a machine without a GPU (to test the script).
set -euo pipefail
scratch=${1:-$(mktemp -d)}
py=${PYTHON:-python}
device=${DEVICE:-cuda}
cells=${CELLS:-50000}
export MARS_CHECK_DEVICE=$device
echo "== devices"
$py - <<'PY'
import torch, faiss
from mars_scale.device import faiss_gpu_count
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("faiss", faiss.__version__, "usable faiss GPUs:", faiss_gpu_count())
PY
echo "== simulated store ($cells cells x 2,000 genes, 5 experiments, 10 types)"
start=$(date +%s)
$py -m mars_scale -q simulate -o "$scratch/atlas.zarr" --cells "$cells" --genes 2000 --experiments 5 --cell-types 10 --seed 0 --overwrite
echo "simulate: $(( $(date +%s) - start )) s"
echo "== loader feeding the device"
$py - "$scratch/atlas.zarr" <<'PY'
import os, sys, time, torch
from mars_scale.loader import Loader
device = os.environ["MARS_CHECK_DEVICE"]
for batch_size in (512, 2048):
    loader = Loader(sys.argv[1], batch_size=batch_size, seed=0)
    n, t = 0, time.perf_counter()
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        n += batch.n_rows
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"loader -> {device}, batch {batch_size}: {n / (time.perf_counter() - t):,.0f} cells/s over {n} cells")
PY
echo "== nearest landmarks on the device (faiss GPU or torch fallback) against faiss CPU"
$py - <<'PY'
import os, time, numpy as np, torch
from mars_scale.landmarks import kmeans, nearest
device = os.environ["MARS_CHECK_DEVICE"]
x = np.random.default_rng(0).normal(size=(1_000_000, 100)).astype(np.float32)
p = np.random.default_rng(1).normal(size=(50, 100)).astype(np.float32)
xt, pt = torch.from_numpy(x).to(device), torch.from_numpy(p).to(device)
nearest(xt[:1000], pt)  # warm-up (CUDA context, faiss smoke test)
if device.startswith("cuda"):
    torch.cuda.synchronize()
t = time.perf_counter(); a_dev, d_dev = nearest(xt, pt)
if device.startswith("cuda"):
    torch.cuda.synchronize()
t_dev = time.perf_counter() - t
t = time.perf_counter(); a_cpu, d_cpu = nearest(x, p); t_cpu = time.perf_counter() - t
agree = float((a_dev.cpu().numpy() == a_cpu).mean())
print(f"nearest, 1M x 100 against 50: {device} {t_dev:.3f} s, faiss CPU {t_cpu:.3f} s, "
      f"agreement {agree:.6f}, max |d| difference {float(np.abs(d_dev.cpu().numpy() - d_cpu).max()):.2e}")
PY
echo "== training under torchrun (1 rank; nccl on CUDA, gloo on CPU)"
cat > "$scratch/check.toml" <<TOML
[train]
pretrain_epochs = 3
finetune_epochs = 3
batch_size = 512
device = "$device"
TOML
start=$(date +%s)
$py -m torch.distributed.run --nproc_per_node 1 -m mars_scale train "$scratch/atlas.zarr" \
    --unannotated exp00 --n-clusters 10 -o "$scratch/run" --config "$scratch/check.toml" --overwrite 2>&1 \
    | grep -vE "^\s*$" | tail -n 25
echo "train (3 pretrain + 3 fine-tune epochs, 1 rank): $(( $(date +%s) - start )) s wall, process start included"
echo "== annotate on the device, ARI against the simulated truth"
start=$(date +%s)
$py -m mars_scale annotate "$scratch/atlas.zarr" --model "$scratch/run" --device "$device" --overwrite 2>&1 | tail -n 8
echo "annotate: $(( $(date +%s) - start )) s"
$py - "$scratch/atlas.zarr" <<'PY'
import sys
from mars_scale.store import open_store
import numpy as np
from mars_scale.metrics import ari
atlas = open_store(sys.argv[1])
experiment = np.asarray(atlas.obs_column("experiment"))
held = experiment == "exp00"
truth = np.asarray(atlas.obs_column("cell_type"))[held]
cluster = np.asarray(atlas.obs_column("mars_cluster"))[held]
print(f"ARI on exp00: {ari(truth, cluster):.3f}")
PY
echo "== done"
