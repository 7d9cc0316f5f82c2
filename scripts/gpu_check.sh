#!/usr/bin/env bash
# GPU checks for CAAP (arXiv 2603.13652), one prepared script for a CUDA machine:
#   1. `pytest -m gpu`: the engine on CUDA in bf16 with fused attention agrees with fp32 (and fp32 with the
#      per-patch reference loop);
#   2. the speed benchmark on vit_base_patch16_224 (random weights), 224 px, start=4 of 12, bf16 autocast, fused
#      attention: images/s of the engine vs Captum FeatureAblation and the reference loop, peak memory, and model
#      FLOP utilisation = images/s x 196 patched passes x (12-4)/12 x ~35 GFLOP / peak (H100 bf16 dense: 989 TFLOP/s).
# Usage: scripts/gpu_check.sh [IMAGES]   (env: PEAK_TFLOPS, default 989; OUT: folder for the JSON rows)
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGES="${1:-64}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
OUT_DIR="${OUT:-outputs}"
mkdir -p "$OUT_DIR"
export WANDB_MODE=offline

if [ ! -x .venv/bin/python ]; then
  echo "== .venv missing: make setup"
  make setup
fi
PY=.venv/bin/python

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"

echo "== pytest -m gpu"
status=0
timeout 300 "$PY" -m pytest -q -m gpu tests/test_caap.py -p no:cacheprovider || status=$?

echo "== benchmark: vit_base_patch16_224, 224 px, start=4/12, bf16, fused attention, ${IMAGES} images"
timeout 300 "$PY" benchmarks/caap_speed.py --device cuda --dtype bf16 --models vit_base_patch16_224 \
  --start 4 --images "$IMAGES" --ref-images 2 --repeats 2 --peak-tflops "$PEAK_TFLOPS" \
  --json "$OUT_DIR/caap_gpu_bench.json" || status=$?

exit "$status"
