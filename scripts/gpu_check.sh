#!/usr/bin/env bash
# GPU checks, one prepared script for a CUDA machine (about 5 minutes on an H100):
#   1. `pytest -m gpu`: CAAP on CUDA in bf16 with fused attention agrees with fp32 (and fp32 with the per-patch
#      reference loop); LibraGrad's value-only attention backward equals the explicit path on CUDA kernels and
#      FullGrad+ stays complete;
#   2. CAAP speed on vit_base_patch16_224 (random weights), 224 px, start=4 of 12, bf16 autocast, fused
#      attention: images/s of the engine vs Captum FeatureAblation and the reference loop, peak memory, MFU;
#   3. LibraGrad cost on vit_base_patch16_224, batch 64, fp32 and bf16, both fused-attention backwards:
#      plain vs full and the ablations, and a kernel profile of plain vs full in bf16;
#   4. metric speed (benchmarks/metric_speed.py) on the FashionGrid model, batched vs one forward per step.
# Usage: scripts/gpu_check.sh [IMAGES]   (env: PEAK_TFLOPS, default 989; OUT: folder for logs and JSON rows;
#        SKIP_PYTEST, SKIP_LIBRAGRAD, SKIP_CAAP_SPEED: skip those steps)
# Without a .venv (a bare GPU machine with torch installed), it uses python3 with PYTHONPATH=src, after
# installing the wheels carried in .whl/ (hydra-core, omegaconf, antlr4, captum, timm) into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
IMAGES="${1:-64}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
OUT_DIR="${OUT:-outputs}"
mkdir -p "$OUT_DIR"
export WANDB_MODE=offline PYTHONUNBUFFERED=1

if [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
  if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, timm; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), 'timm', timm.__version__)"

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, keep going, remember failures
  local name=$1 limit=$2
  shift 2
  echo "== $name"
  timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "!! $name failed (rc=$rc)"; status=1; }
}

[ -n "${SKIP_PYTEST:-}" ] || step pytest_gpu 240 "$PY" -m pytest -q -m gpu tests/test_caap.py tests/test_libragrad.py -p no:cacheprovider
[ -n "${SKIP_LIBRAGRAD:-}" ] || for dtype in float32 bfloat16; do
  for backward in value_only sdpa; do
    step "libragrad_cost_${dtype}_${backward}" 90 "$PY" benchmarks/libragrad_cost.py --device cuda \
      --model vit_base_patch16_224 --batch 64 --repeats 10 --dtype "$dtype" --attention-backward "$backward" \
      --presets full wo_att wo_ln wo_act attnlrp
  done
done
[ -n "${SKIP_LIBRAGRAD:-}" ] || step libragrad_profile_bf16 90 "$PY" benchmarks/libragrad_cost.py --device cuda --model vit_base_patch16_224 \
  --batch 64 --repeats 2 --dtype bfloat16 --presets full --profile
if [ -f benchmarks/metric_speed.py ]; then
  step metric_speed 150 "$PY" benchmarks/metric_speed.py --device cuda
fi
[ -n "${SKIP_CAAP_SPEED:-}" ] || step caap_speed 240 "$PY" benchmarks/caap_speed.py --device cuda --dtype bf16 --models vit_base_patch16_224 \
  --start 4 --images "$IMAGES" --ref-images 2 --repeats 2 --peak-tflops "$PEAK_TFLOPS" \
  --json "$OUT_DIR/caap_gpu_bench.json"
exit "$status"
