#!/usr/bin/env bash
# GPU smoke check, prepared for a machine with one CUDA GPU (never run in CI; never run on this project's
# CPU machines: it exits at once without CUDA). About 5 minutes on one GPU (estimate, not yet measured):
#   1. peak CUDA memory and s/iteration of one distillation iteration at CIFAR-10 IPC 10 scale (ConvNet-3
#      width 128, 100 images, DSA) for every memory mode (full, constant) x student execution (sequential,
#      batched), K = 0 and K = 3, N = 30 and 80 (benchmarks/unroll_memory.py, random expert parameters);
#   2. the in-process CUDA path end to end on a synthetic ImageFolder (distill --set device=cuda);
#   3. Ray Train with the NCCL backend: distill --num-workers 1 --use-gpu on the same data.
# Usage: bash benchmarks/gpu_smoke.sh [python]      (default python: .venv/bin/python, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: no CUDA device visible')" || exit 2
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
WORK=$(mktemp -d)
status=0

echo "== 1. one iteration: memory mode x student execution (IPC 10 scale)"
timeout 240 "$PY" benchmarks/unroll_memory.py --device cuda --syn-steps 30 80 --K 0 3 \
    --executions sequential batched --iterations 3 --warmup 1 || status=1

echo "== 2. distill in one process on CUDA (synthetic ImageFolder, 10 classes x 20 images of 32 px)"
"$PY" - "$WORK/ds" <<'PYEOF'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 20), ("test", 5)):
    for c in range(10):
        d = Path(sys.argv[1]) / split / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
PYEOF
COMMON=(--preset cifar10_ipc10 --output-dir "$WORK/runs" --no-tracking --set data.dataset=imagefolder
        --set "data.root=$WORK/ds" --set "data.cache_dir=$WORK/cache" --set data.train_per_class=null
        --set experts.num_experts=2 --set experts.epochs=4 --set experts.curriculum=false --set experts.eval_every=0
        --set distill.max_start_epoch=2 --set distill.K=1 --set distill.R=1 --set distill.iterations=3
        --set distill.eval_every=0 --set distill.checkpoint_every=3)
for mode in full constant; do
  for ex in sequential batched; do
    echo "-- unroll_memory=$mode student_execution=$ex"
    timeout 300 "$PY" -m contra_ray.distill "${COMMON[@]}" --name "cuda_${mode}_${ex}" --set device=cuda \
        --set distill.unroll_memory=$mode --set distill.student_execution=$ex || status=1
  done
done

echo "== 3. Ray Train, NCCL backend, one GPU worker"
timeout 300 "$PY" -m contra_ray.distill "${COMMON[@]}" --name nccl_w1 --set device=cuda --num-workers 1 --use-gpu \
    || status=1
rm -rf "$WORK"
echo "gpu_smoke: exit $status"
exit $status
