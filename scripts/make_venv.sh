#!/usr/bin/env bash
# Create the project's virtual environment and install dfm with its pinned dependencies.
#
# On the CPU machine: a fresh venv with torch==2.13.0 (the local CPU wheel; never a CUDA build).
# On a GPU machine whose Python already has a CUDA torch: the venv sees the system site-packages and
# keeps that torch (pinned to its installed version), so nothing replaces it.
# Usage: scripts/make_venv.sh [VENV_DIR] [EXTRAS]   (defaults: .venv, dev,megatron,data,video,plot,lora,tracking)
set -euo pipefail
venv=${1:-.venv}
extras=${2:-dev,megatron,data,video,plot,lora,tracking}
python=${PYTHON:-python3}
cpu_torch=${DFM_CPU_TORCH:-2.13.0}

cuda_torch=$("$python" - <<'PY' 2>/dev/null || true
try:
    import torch
    print(torch.__version__ if torch.version.cuda else "")
except Exception:
    print("")
PY
)

if [ -n "$cuda_torch" ]; then
  echo "make_venv: keeping the installed CUDA torch $cuda_torch"
  [ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
  torch_pin="torch==$cuda_torch"
else
  echo "make_venv: CPU machine, installing torch==$cpu_torch"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  torch_pin="torch==$cpu_torch"
fi

pin_file="$venv/torch-pin.txt"
echo "$torch_pin" > "$pin_file"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  -c constraints.txt -c "$pin_file" "$torch_pin" -e ".[$extras]"
"$venv/bin/python" -c "import torch, dfm; print(f'make_venv: dfm {dfm.__version__} with torch {torch.__version__} ready in $venv')"
