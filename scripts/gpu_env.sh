# Sourced by the GPU scripts (scripts/gpu_check.sh, scripts/gpu_train_fashionscenes.sh): sets $PY, the Python
# that runs caap here, and the environment of an offline run.
# PY=... picks an interpreter (src/ then goes first on PYTHONPATH). Else, with a .venv (`make setup`):
# .venv/bin/python. Else (a bare CUDA machine whose python3 has torch, lightning, torchmetrics, safetensors and
# the scientific stack but not caap's other dependencies): python3, after the wheels that `make gpu-wheels` put
# in .whl/ (and .whl_wandb/, when carried) are installed into /tmp/site; src/ goes on PYTHONPATH.
if [ -n "${PY:-}" ]; then
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
  for folder in .whl .whl_wandb; do # apart: W&B's wheels failing (a Python other than 3.12) spare the others
    if compgen -G "$folder/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$folder"/*.whl || echo "!! installing the wheels of $folder/ failed"
    fi
  done
  [ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export WANDB_MODE=offline WANDB_SILENT=true HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
