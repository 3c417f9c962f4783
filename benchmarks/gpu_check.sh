#!/usr/bin/env bash
# One-GPU check, under 5 minutes: a CUDA training epoch on a simulated store, a 1-rank nccl
# process group, faiss GPU or the torch fallback for nearest-landmark search, and the loader
# feeding the GPU (cells/s). Run from the repository root with the package installed:
#   bash benchmarks/gpu_check.sh [SCRATCH_DIR]
set -euo pipefail
scratch=${1:-$(mktemp -d)}
py=${PYTHON:-python}
echo "== devices"
$py - <<'PY'
import torch, faiss
from mars_scale.device import faiss_gpu_count
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("faiss", faiss.__version__, "usable faiss GPUs:", faiss_gpu_count())
PY
echo "== simulated store (50,000 cells x 2,000 genes)"
$py -m mars_scale -q simulate -o "$scratch/atlas.zarr" --cells 50000 --genes 2000 --experiments 5 --cell-types 10 --seed 0 --overwrite
echo "== loader feeding the GPU"
$py - "$scratch/atlas.zarr" <<'PY'
import sys, time, torch
from mars_scale.loader import Loader
loader = Loader(sys.argv[1], batch_size=1024, seed=0)
n, t = 0, time.perf_counter()
for batch in loader:
    batch = batch.to("cuda", non_blocking=True)
    n += batch.n_rows
torch.cuda.synchronize()
print(f"loader -> cuda: {n / (time.perf_counter() - t):,.0f} cells/s over {n} cells")
PY
echo "== nearest landmarks on the GPU (faiss GPU or torch fallback) against faiss CPU"
$py - <<'PY'
import numpy as np, torch, time
from mars_scale.landmarks import nearest
x = np.random.default_rng(0).normal(size=(1_000_000, 100)).astype(np.float32)
p = np.random.default_rng(1).normal(size=(50, 100)).astype(np.float32)
t = time.perf_counter(); a_gpu, _ = nearest(torch.from_numpy(x).cuda(), torch.from_numpy(p).cuda()); torch.cuda.synchronize()
print(f"GPU nearest: {time.perf_counter() - t:.2f} s")
a_cpu, _ = nearest(x, p)
print("agreement with faiss CPU:", float((a_gpu.cpu().numpy() == a_cpu).mean()))
PY
echo "== one CUDA training epoch under torchrun (1 rank, nccl)"
cat > "$scratch/gpu.toml" <<'TOML'
[train]
pretrain_epochs = 1
finetune_epochs = 1
batch_size = 1024
device = "cuda"
TOML
start=$(date +%s)
$py -m torch.distributed.run --nproc_per_node 1 -m mars_scale train "$scratch/atlas.zarr" \
    --unannotated exp00 --n-clusters 10 -o "$scratch/run" --config "$scratch/gpu.toml" --overwrite
echo "train (1 pretrain + 1 fine-tune epoch, nccl, 1 rank): $(( $(date +%s) - start )) s"
echo "== done"
