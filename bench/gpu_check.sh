#!/usr/bin/env bash
# One short GPU check (a few minutes on one GPU): ResNet18 on synthetic CIFAR-shaped data, bf16.
# Prints training images/s of pnc's loop vs a plain PyTorch loop (goal >= 0.95), and measurement images/s
# (all blocks, avgpool, all metrics) vs a plain inference pass (goal <= 1.15).
# Usage on a GPU machine, from the repository root:  bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'; PY=.venv/bin/python; }
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no GPU visible to torch"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
PYEOF
PYTHONUNBUFFERED=1 "$PY" bench/bench_train.py --model resnet18 --image-size 32 --samples 20000 --batch-size 256 \
  --epochs 2 --repeats 2 --precision bf16 --workers 4 --measure
