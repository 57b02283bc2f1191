#!/usr/bin/env bash
# LoRA fine-tuning of the `make demo` model on a new caption set (coloured backgrounds), end to end:
# base run -> diffusers export -> LoRA run -> adapter file -> samples with and without the adapter.
# Run from the repository root after `make demo` (it trains runs/demo first if that run is missing).
set -euo pipefail
py=${VENV:-.venv}/bin/python
[ -d runs/demo/checkpoints ] || "$py" -m dfm.app.train run.dir=runs/demo
"$py" -m dfm.app.convert export --checkpoint runs/demo --out runs/demo_export --overwrite
"$py" -m dfm.app.train --config examples/lora/default_lora.yaml
"$py" -m dfm.app.convert export-lora --checkpoint runs/demo_lora --out runs/demo_lora/adapter.safetensors --overwrite
prompts=(--prompt "a red circle moving right quickly on a navy background"
         --prompt "a yellow triangle moving left quickly on a teal background")
"$py" -m dfm.app.generate --checkpoint runs/demo_export "${prompts[@]}" --out runs/demo_lora/samples/base.mp4
"$py" -m dfm.app.generate --checkpoint runs/demo_export --lora runs/demo_lora/adapter.safetensors "${prompts[@]}" \
  --out runs/demo_lora/samples/lora.mp4
"$py" -m dfm.app.plot runs/demo_lora > /dev/null
echo "== LoRA example: runs/demo_lora/samples/{base,lora}.png (without / with the adapter), curves runs/demo_lora/curves.png =="
