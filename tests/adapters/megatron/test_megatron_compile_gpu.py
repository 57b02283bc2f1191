"""The megatron runtime with compiled blocks (and selective activation checkpointing) trains as it does eagerly.

One GPU, fp32 (TF32 off): three steps of the tiny WAN recipe with ``train.compile=true`` and
``train.activation_checkpointing=selective`` against the same run uncompiled without checkpointing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        __import__("importlib").util.find_spec("megatron") is None, reason="needs megatron-core (the megatron extra)"
    ),
]
RTOL = 1e-4
"""Inductor's fused kernels reorder float32 sums; the losses agree to a few ulps of the reductions."""


def _losses(run_dir: Path, *overrides: str) -> list[float]:
    args = ["--recipe", "wan_tiny_t2v", f"run.dir={run_dir}", "runtime=megatron", "train.precision=fp32"]
    args += ["train.max_steps=3", "train.log_interval=1", "checkpoint.interval=100", *overrides]
    subprocess.run([sys.executable, "-m", "dfm.app.train", *args], check=True, timeout=400)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def test_compiled_selective_megatron_matches_eager(tmp_path: Path) -> None:
    eager = _losses(tmp_path / "eager")
    compiled = _losses(tmp_path / "compiled", "train.compile=true", "train.activation_checkpointing=selective")
    assert len(eager) == len(compiled) == 3
    for e, c in zip(eager, compiled, strict=True):
        assert abs(c - e) <= RTOL * abs(e), (eager, compiled)
