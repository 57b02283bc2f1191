#!/usr/bin/env bash
# `make demo`: train the default recipe on built-in synthetic videos, then generate samples from captions.
# A second `make demo` resumes (or finds the run finished) and generates again.
set -euo pipefail
py=${VENV:-.venv}/bin/python
run_dir=${DEMO_RUN_DIR:-runs/demo}

echo "== dfm demo: training the default recipe into $run_dir (Ctrl-C stops with a checkpoint; run again to resume) =="
"$py" -m dfm.app.train run.dir="$run_dir"
echo "== dfm demo: generating =="
"$py" -m dfm.app.generate --checkpoint "$run_dir" \
  --prompt "a red circle moving right quickly" \
  --prompt "a blue square moving up quickly" \
  --prompt "a yellow triangle moving left quickly" \
  --out "$run_dir/samples/demo.mp4"
"$py" -m dfm.app.plot "$run_dir" > /dev/null
echo "== dfm demo: videos $run_dir/samples/demo_0{0,1,2}.mp4, contact sheet $run_dir/samples/demo.png, training curves $run_dir/curves.png =="
