"""Two data-parallel ranks (fsdp2, gloo, torchrun) train on energon shards; a run stopped after step 2 and
resumed continues exactly: the checkpoint keeps every rank's loader position (not only rank 0's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import ROOT
from support.distributed import free_port
from support.shards import make_samples, write_prepared

from dfm.adapters.tracking import read_metrics

pytest.importorskip("megatron.energon")


def _torchrun(run: Path, shards: Path, steps: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dfm.app.train"]
    command += ["--recipe", "wan_tiny_t2v", "runtime=fsdp2", f"run.dir={run}", "data.source=energon"]
    command += [f"data.path={shards}", "data.num_workers=0", "data.text_len=8", "data.shuffle_buffer=4"]
    command += ["model.in_channels=4", "model.out_channels=4", "train.global_batch_size=2", "checkpoint.interval=2"]
    command += [f"train.max_steps={steps}", "logging.level=WARNING"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_ranks_resume_their_own_loader_positions(tmp_path: Path) -> None:
    shards = write_prepared(tmp_path / "shards", make_samples(16, latent_shapes=((4, 2, 4, 4),), text_dim=32))
    _torchrun(tmp_path / "whole", shards, 4)
    _torchrun(tmp_path / "parted", shards, 2)
    _torchrun(tmp_path / "parted", shards, 4)  # resumes from step 2: each rank mid-way through its shard share
    want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "parted" / "metrics.jsonl")}
    assert got == want and sorted(want) == [1, 2, 3, 4], (got, want)
