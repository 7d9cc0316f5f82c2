#!/usr/bin/env bash
# Train the FashionScenes ViT (issue 16's benchmark model) on one CUDA GPU: about 6 minutes on an H100.
# Scene generation costs ~2.5 ms of CPU per scene, so the run is fed by NUM_WORKERS processes (16 cores: 14);
# Lightning's max_time stops the training at MAX_TIME (then the model is validated, tested in float32 and as the
# reloaded float16 weights, and its card written), and `timeout` ends everything at TRAIN_TIMEOUT_S.
# Output under $OUT (default outputs/gpu_train): fashionscenes/<model>.safetensors and <model>.json (weights and
# model card; export=false: src/caap/assets/ is untouched, copy them there after checking the card),
# fashionscenes_train.log and fashionscenes_metrics.csv (Lightning's CSV log: train loss, val mAP).
# Fashion-MNIST: Debian's package (`make setup`), or the copy in .fmnist/ (`make gpu-data`: carry it to a bare
# machine), or DATA_ROOT.
# Env: TRAIN_SIZE (2000000), BATCH_SIZE (512), LR (1e-3), NUM_WORKERS (14), MAX_TIME (00:00:04:30),
#      TRAIN_TIMEOUT_S (360), DATA_ROOT, EXTRA (more overrides, e.g. EXTRA="model.kwargs.patch_size=8").
# Without a .venv it installs the wheels of .whl/ (`make gpu-wheels`) first: see scripts/gpu_env.sh.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-outputs/gpu_train}"
RUN="$OUT_DIR/fashionscenes"
mkdir -p "$RUN"
source scripts/gpu_env.sh

read -r -a extra <<<"${EXTRA:-}"
root="${DATA_ROOT:-}"
[ -z "$root" ] && [ -d .fmnist ] && root="$PWD/.fmnist"
[ -n "$root" ] && extra+=("data_root=$root")
started=$(date +%s)
timeout -k 10 "${TRAIN_TIMEOUT_S:-360}" "$PY" -m caap.train --config-name train_fashionscenes \
  train_size="${TRAIN_SIZE:-2000000}" batch_size="${BATCH_SIZE:-512}" lr="${LR:-1e-3}" \
  num_workers="${NUM_WORKERS:-14}" precision=bf16-mixed half=true export=false \
  max_time="${MAX_TIME:-00:00:04:30}" output_dir="$RUN" hydra.run.dir="$RUN" "${extra[@]}" \
  2>&1 | tee "$OUT_DIR/fashionscenes_train.log"
rc=${PIPESTATUS[0]}
csv=$(ls "$RUN"/train/version_*/metrics.csv 2>/dev/null | tail -n 1)
[ -n "$csv" ] && cp "$csv" "$OUT_DIR/fashionscenes_metrics.csv"
"$PY" - "$RUN" "${csv:-}" <<'EOF'
import csv, json, sys
from pathlib import Path
run, log = Path(sys.argv[1]), sys.argv[2]
if log:
    rows = [r for r in csv.DictReader(open(log)) if r.get("val/mAP")]
    for r in rows:
        print(f"val mAP {float(r['val/mAP']):.4f} at step {r['step']}")
cards = [c for c in run.glob("*.json")]
for card in cards:
    c = json.loads(card.read_text())
    print(f"{c['model']}: test mAP {c['test_mAP']:.4f} (float32 {c.get('test_mAP_float32', float('nan')):.4f}), "
          f"{c['train_steps']} steps, {c['train_images_per_second']} images/s, {c['train_seconds']} s, {c['device']}")
if not cards:
    print("no model card: the training did not finish")
EOF
echo "== done in $(($(date +%s) - started)) s (rc=$rc): $RUN"
exit "$rc"
