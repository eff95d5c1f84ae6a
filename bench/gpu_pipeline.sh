#!/usr/bin/env bash
# The full ResNet-56 CIFAR-10 pipeline on the complete JPEG copy, on one GPU, and the fine-tuning
# throughput with and without AMP / channels-last / compile (issue 5's "GPU evidence").
#
# Not run yet: no GPU was lent to the sessions that wrote it. On a GPU machine, with the JPEG zips
# copied into the git-ignored runs/ folder (for the device tool: name runs/jpeg75 in `carry`):
#
#   bash bench/gpu_pipeline.sh runs/jpeg75 runs/gpu
#
# 1. a ResNet-56 baseline trained on the same 50,000 JPEG training images (so the comparison with
#    the pruned network is fair: both see the same data);
# 2. `ekg run --preset paper`: adaptation, EKG search to keep 0.45, memory bank, 100 epochs of
#    fine-tuning with the ensemble, original-vs-pruned summary (RUN/summary.md);
# 3. bench/speed_options.py: fine-tuning images/s for plain, bf16, fp16, channels-last and compile.
set -euo pipefail
DATA=${1:?usage: bench/gpu_pipeline.sh DATA_DIR [OUT_DIR] (DATA_DIR holds cifar10_jpeg_train.zip and cifar10_jpeg_test.zip)}
OUT=${2:-runs/gpu}
pip install -q -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
ekg train --arch resnet56 --data "$DATA" --epochs 200 --out "$OUT/baseline" --amp bf16 --channels-last
ekg test --model "$OUT/baseline/model.pt" --data "$DATA"
ekg run --model "$OUT/baseline/model.pt" --data "$DATA" --keep 0.45 --out "$OUT/ekg" --preset paper
cat "$OUT/ekg/summary.md"
python bench/speed_options.py --run "$OUT/ekg" --data "$DATA" --device cuda --limit-train 50000
