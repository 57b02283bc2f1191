"""One training run per run directory: ``run.dir/.lock`` (flock), held by real processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import ROOT, cli

from dfm.adapters.tracking import read_metrics
from dfm.app.config import ConfigError, resolve_config
from dfm.app.services.run_dir import RunDirError, RunDirLock
from dfm.app.services.training import train
from dfm.domain.batch import Batch

HOLDER = """
import sys, time
from dfm.app.services.run_dir import RunDirLock
RunDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""
"""A process that takes a run directory's lock through dfm's own function and keeps it until killed."""


def tiny(run_dir: Path, *overrides: str):
    return resolve_config("wan_tiny_t2v", None, [f"run.dir={run_dir}", "logging.level=WARNING", *overrides])


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        refused = cli("train", "--recipe", "wan_tiny_t2v", f"run.dir={run_dir}", "train.max_steps=1")
    finally:
        holder.kill()  # SIGKILL: no clean release, the lock file keeps the holder's record
        holder.wait()
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    line = refused.stderr.splitlines()[-1]
    assert re.fullmatch(
        rf"error: run\.dir: {re.escape(str(run_dir))} is in use by another training run \(PID {holder.pid} on host "
        rf"{re.escape(socket.gethostname())}, since [-0-9T:+]+\); wait for it to finish or stop it, or choose "
        r"another run\.dir",
        line,
    ), line
    assert [p.name for p in run_dir.iterdir()] == [".lock"]  # nothing of the refused run was written

    taken = cli("train", "--recipe", "wan_tiny_t2v", f"run.dir={run_dir}", "train.max_steps=1", "logging.format=json")
    assert taken.returncode == 0, taken.stderr
    events = [json.loads(line) for line in taken.stderr.splitlines() if line.startswith("{")]
    stale = [e for e in events if e["event"].startswith("stale run.dir lock taken over")]
    assert len(stale) == 1 and stale[0]["pid"] == holder.pid and stale[0]["host"] == socket.gethostname()
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1]
    assert (run_dir / ".lock").read_text() == ""  # a run that ends normally leaves an empty (free) lock file


class _Probe:
    """The real synthetic source; on its first batch, another lock on the run directory is attempted."""

    def __init__(self, inner: Iterator[Batch], run_dir: Path) -> None:
        self.inner, self.run_dir, self.refusal = inner, run_dir, ""

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if not self.refusal:
            with pytest.raises(RunDirError) as refused:
                RunDirLock(self.run_dir).acquire()
            self.refusal = str(refused.value)
        return next(self.inner)

    def state_dict(self) -> dict:
        return self.inner.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)  # type: ignore[attr-defined]


def test_the_lock_is_held_while_training_and_released_after_success_and_errors(tmp_path: Path) -> None:
    from dfm.app import bootstrap
    from dfm.ports.runtime import Topology

    cfg = tiny(tmp_path, "train.max_steps=1")
    codec, text = bootstrap.build_codecs(cfg)
    probe = _Probe(iter(bootstrap.build_data_source(cfg, Topology(), codec, text)), tmp_path)
    train(cfg, data=probe)
    assert f"is in use by another training run (PID {os.getpid()} on host {socket.gethostname()}" in probe.refusal
    with pytest.raises(ConfigError, match=r"^seed: is 5, but the checkpoint"):
        train(tiny(tmp_path, "train.max_steps=2", "seed=5"))
    with RunDirLock(tmp_path) as lock:  # free again, and not stale: both runs released it
        assert lock.held
    assert (tmp_path / ".lock").read_text() == ""
