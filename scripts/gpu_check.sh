#!/usr/bin/env bash
# GPU checks (issue 17), one prepared script for one CUDA GPU; at most BUDGET_S seconds (default 450: with set-up
# and summary about 8 minutes on an H100). Steps, in order of importance, each under its own `timeout` and each
# skippable with SKIP_<STEP>=1 (e.g. SKIP_PYTEST=1); a step that no longer fits the budget is left out:
#   caap_speed        CAAP engine (eager and method.compile) vs Captum FeatureAblation vs the per-patch reference
#                     loop on ViT-B/16 (random weights, 224 px, bf16 autocast), start=4 and start=0: images/s,
#                     peak memory, MFU (benchmarks/caap_speed.py), plus a torch profiler trace of the engine;
#   e2e_default       `python -m caap trainer=gpu_bf16 model=vit_base_augreg model.pretrained=false` on
#                     E2E_IMAGES synthetic images, default metrics, layers.start=4: the test loop's images/s
#                     (metrics.json `loop`) against the engine's raw rate;
#   metric_quantus    our patch-deletion curves vs Quantus RegionPerturbation on the same curves, bf16
#                     (benchmarks/metric_speed.py --quantus), and the 15 token metrics on the same pairs;
#   pytest_gpu        the `gpu` test marker (CUDA bf16 vs fp32, no host sync in the chunk loop, compile, memory
#                     estimate, pinned batches, LibraGrad's CUDA kernels);
#   e2e_faithfulness  the same run with metric=faithfulness on E2E_FAITH_IMAGES images;
#   layers_auto       layers=auto with 16 calibration images (all 78 ranges of ViT-B/16);
#   libragrad         LibraGrad's bf16 cost against a plain gradient pass (both fused-attention backwards);
#   e2e_compile       e2e_default with method.compile=true.
# Output: $OUT/gpu_check.json (every figure, the goals and whether each was met; scripts/gpu_summary.py) and
# $OUT/gpu_check_logs.tar.gz (each step's log and JSON); OUT defaults to outputs/gpu_check.
# Env: BUDGET_S, IMAGES (caap_speed, 64), E2E_IMAGES (512), E2E_FAITH_IMAGES (256), QUANTUS_IMAGES (32),
#      PEAK_TFLOPS (989: H100 SXM dense bf16), WORK (scratch folder, /tmp/gpu_check), DRY_RUN=1 (every step on
#      the CPU with tiny models: checks the commands, not the speed; budget and step limits x LIMIT_SCALE, default
#      8 there).
# Without a .venv (a bare GPU machine with torch installed) it installs the wheels carried in .whl/
# (`make gpu-wheels`) into /tmp/site: see scripts/gpu_env.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
BUDGET_S="${BUDGET_S:-450}"
IMAGES="${IMAGES:-64}"
E2E_IMAGES="${E2E_IMAGES:-512}"
E2E_FAITH_IMAGES="${E2E_FAITH_IMAGES:-256}"
QUANTUS_IMAGES="${QUANTUS_IMAGES:-32}"
PEAK_TFLOPS="${PEAK_TFLOPS:-989}"
OUT_DIR="${OUT:-outputs/gpu_check}"
WORK="${WORK:-/tmp/gpu_check}"
rm -rf "$WORK" && mkdir -p "$OUT_DIR" "$WORK"
: >"$WORK/steps.tsv"
source scripts/gpu_env.sh

if [ -n "${DRY_RUN:-}" ]; then  # the same commands on the CPU, with tiny models and sizes
  DEVICE=cpu
  LIMIT_SCALE="${LIMIT_SCALE:-8}"
  BUDGET_S=$((BUDGET_S * LIMIT_SCALE))  # the CPU is slower: the budget scales with the step limits
  SPEED_MODEL=fashiongrid
  SPEED_ARGS=(--images 2 --ref-images 1 --repeats 1 --no-memory --methods engine captum reference)
  E2E_MODEL=(model=test_vit model.img_size=28 data.dataset.image_size=28 trainer.accelerator=cpu data.num_workers=0)
  E2E_IMAGES=8 E2E_FAITH_IMAGES=4 QUANTUS_IMAGES=2
  QUANTUS_MODEL=vit_fashiongrid_patch7_56
  LIBRAGRAD_ARGS=(--model vit_fashiongrid_patch7_56 --batch 2 --repeats 1)
else
  DEVICE=cuda
  SPEED_MODEL=vit_base_patch16_224
  SPEED_ARGS=(--images "$IMAGES" --ref-images 1 --repeats 2 --methods engine engine_compiled captum reference)
  E2E_MODEL=(model=vit_base_augreg model.pretrained=false)
  QUANTUS_MODEL=vit_base_patch16_224
  LIBRAGRAD_ARGS=(--model vit_base_patch16_224 --batch 64 --repeats 10)
fi

LIMIT_SCALE="${LIMIT_SCALE:-1}"

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - "$WORK/env.json" "$DEVICE" <<'EOF'
import importlib, json, platform, sys
import torch
wanted = ["hydra", "omegaconf", "timm", "lightning", "torchmetrics", "safetensors", "rich", "captum", "quantus",
          "wandb", "scipy", "h5py", "matplotlib", "caap"]
missing = [m for m in wanted if importlib.util.find_spec(m) is None]
versions = {m: getattr(importlib.import_module(m), "__version__", "?") for m in wanted if m not in missing}
cuda = torch.cuda.is_available()
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name() if cuda else "cpu", "versions": versions, "missing": missing}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
if sys.argv[2] == "cuda" and not cuda:
    sys.exit("no CUDA device visible to torch")
EOF
[ $? = 0 ] || exit 1
LOGGER=wandb
"$PY" -c "import wandb" 2>/dev/null || { LOGGER=csv; echo "wandb not importable: the e2e runs log to csv"; }

status=0
step() {  # step NAME LIMIT CMD...: run with a time limit inside the budget, keep going, record the outcome
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local skip="SKIP_${name^^}" left=$((BUDGET_S - ($(date +%s) - T0)))
  if [ -n "${!skip:-}" ]; then
    echo "== $name: skipped ($skip)"
    printf '%s\tskipped\t0\t0\n' "$name" >>"$WORK/steps.tsv"
    return
  fi
  if [ "$left" -lt "${MIN_STEP_S:-30}" ]; then
    echo "== $name: left out, ${left}s of the budget left"
    printf '%s\tno_time\t0\t0\n' "$name" >>"$WORK/steps.tsv"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, $((left))s of the budget left)"
  local started=$(date +%s)
  timeout -k 5 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$WORK/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - started))" "$limit" >>"$WORK/steps.tsv"
  [ "$rc" = 0 ] || { echo "!! $name failed (rc=$rc)"; status=1; }
}

e2e() {  # e2e NAME IMAGES BATCH LOGGER OVERRIDES...: sets CMD, one `python -m caap` run on synthetic images
  local name=$1 images=$2 batch=$3 logger=$4
  shift 4
  CMD=("$PY" -m caap trainer=gpu_bf16 "${E2E_MODEL[@]}" data=synthetic data.dataset.size="$images"
    data.batch_size="$batch" logger="$logger" hydra.run.dir="$WORK/$name" "$@")
}
# W&B (offline) in the first run, as users run it; CSV in the others (W&B's shutdown costs seconds per run)

step caap_speed 170 "$PY" benchmarks/caap_speed.py --device "$DEVICE" --dtype bf16 --models "$SPEED_MODEL" \
  --start 4 0 "${SPEED_ARGS[@]}" --peak-tflops "$PEAK_TFLOPS" --json "$WORK/caap_speed.json" \
  --trace "$WORK/engine_trace.json"
e2e e2e_default "$E2E_IMAGES" 64 "$LOGGER" layers.start=4 layers.stop=null
step e2e_default 100 "${CMD[@]}"
step metric_quantus 90 "$PY" benchmarks/metric_speed.py --quantus --device "$DEVICE" --model "$QUANTUS_MODEL" \
  --dtype bf16 --images "$QUANTUS_IMAGES" --repeats 2 --json "$WORK/metric_quantus.json"
step pytest_gpu 150 "$PY" -m pytest -q -m gpu tests/test_caap.py tests/test_caap_engine.py tests/test_libragrad.py \
  -p no:cacheprovider
e2e e2e_faithfulness "$E2E_FAITH_IMAGES" 64 csv layers.start=4 layers.stop=null metric=faithfulness
step e2e_faithfulness 120 "${CMD[@]}"
e2e layers_auto 24 16 csv layers=auto layers.calibration_images=16
step layers_auto 90 "${CMD[@]}"
for backward in value_only sdpa; do
  step "libragrad_$backward" 45 "$PY" benchmarks/libragrad_cost.py --device "$DEVICE" "${LIBRAGRAD_ARGS[@]}" \
    --dtype bfloat16 --attention-backward "$backward" --presets full wo_att wo_ln wo_act attnlrp \
    --json "$WORK/libragrad_$backward.json"
done
e2e e2e_compile "$E2E_IMAGES" 64 csv layers.start=4 layers.stop=null method.compile=true
step e2e_compile 150 "${CMD[@]}"

"$PY" scripts/gpu_summary.py "$WORK" "$OUT_DIR/gpu_check.json" || status=1
tar -czf "$OUT_DIR/gpu_check_logs.tar.gz" -C "$WORK" --exclude=maps --exclude=wandb --exclude='*.safetensors' . \
  || status=1
echo "== done in $(($(date +%s) - T0)) s: $OUT_DIR/gpu_check.json"
exit "$status"
