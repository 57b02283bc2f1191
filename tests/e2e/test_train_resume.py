"""Training end to end on the tiny recipe: exact resume, signals, bad checkpoints, NaN, a full disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from support.cli import ROOT, cli

from dfm.adapters.checkpoint import DCPCheckpointStore
from dfm.adapters.tracking import read_metrics
from dfm.app.config import ConfigError, TrainConfig, resolve_config
from dfm.app.services.run_dir import RunDirError
from dfm.app.services.training import TrainingError, train
from dfm.domain.batch import Batch
from dfm.ports.checkpoint import CheckpointError


def tiny(run_dir: Path, *overrides: str) -> TrainConfig:
    return resolve_config("wan_tiny_t2v", None, [f"run.dir={run_dir}", "logging.level=WARNING", *overrides])


def model_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    store = DCPCheckpointStore(run_dir / "checkpoints")
    latest = store.latest()
    assert latest is not None
    from dfm.app.services.checkpoints import load_for_inference

    _, model = load_for_inference(latest.path, use_ema=False)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resumed_run_continues_exactly(tmp_path: Path) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(tiny(whole, "train.max_steps=4", "checkpoint.interval=2"))
    first = train(tiny(split, "train.max_steps=2", "checkpoint.interval=2"))
    assert first.step == 2
    resumed = train(tiny(split, "train.max_steps=4", "checkpoint.interval=2"))  # checkpoint.resume=auto
    assert resumed.step == 4
    a, b = read_metrics(whole / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    wa, wb = model_weights(whole), model_weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_never_starts_over(tmp_path: Path) -> None:
    train(tiny(tmp_path, "train.max_steps=2"))
    again = train(tiny(tmp_path, "train.max_steps=2", "checkpoint.resume=never"))
    assert again.step == 2
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def _wait_for_steps(proc: subprocess.Popen[str], metrics: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    raise AssertionError("training did not log in time")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_at_the_step_boundary_and_the_next_run_resumes(
    tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    args = ["--recipe", "wan_tiny_t2v", f"run.dir={tmp_path}", "train.max_steps=100000", "checkpoint.interval=100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dfm.app.train", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_steps(proc, tmp_path / "metrics.jsonl", 3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "stopped" in out + err and "--resume auto" in out + err
    stopped_at = DCPCheckpointStore(tmp_path / "checkpoints").latest()
    assert stopped_at is not None and stopped_at.step >= 3
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert logged[-1]["step"] == stopped_at.step
    resumed = train(tiny(tmp_path, f"train.max_steps={stopped_at.step + 2}"))
    assert resumed.step == stopped_at.step + 2
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, stopped_at.step + 3))


def test_a_corrupted_checkpoint_is_refused_before_training(tmp_path: Path) -> None:
    train(tiny(tmp_path, "train.max_steps=2"))
    ckpt = tmp_path / "checkpoints" / "step_0000002"
    data_file = next(ckpt.glob("tensors/*.safetensors"))
    data_file.write_bytes(data_file.read_bytes()[:-100])
    before = (tmp_path / "metrics.jsonl").read_text()
    result = cli("train", "--recipe", "wan_tiny_t2v", f"run.dir={tmp_path}", "train.max_steps=4", "--resume", str(ckpt))
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and data_file.name in result.stderr and "corrupted" in result.stderr
    assert "Traceback" not in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_in_use(tmp_path: Path) -> None:
    train(tiny(tmp_path, "train.max_steps=2"))
    ckpts = tmp_path / "checkpoints"
    partial = ckpts / ".tmp-step_0000004-crashed"  # what a kill during the write of step 4 leaves behind
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\0" * 1000)
    unfinished = ckpts / "step_0000003"  # a directory without a manifest is never a checkpoint
    unfinished.mkdir()
    resumed = train(tiny(tmp_path, "train.max_steps=3"))
    assert resumed.step == 3
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


class NaNAfter:
    """The real synthetic source, with non-finite latents from step ``bad_from`` on."""

    def __init__(self, inner: Iterator[Batch], bad_from: int, per_step: int) -> None:
        self.inner, self.bad_from, self.per_step, self.count = inner, bad_from, per_step, 0

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = next(self.inner)
        self.count += 1
        if (self.count - 1) // self.per_step + 1 >= self.bad_from:
            batch = Batch(
                latents=batch.latents * float("nan"),
                text=batch.text,
                sample_index=batch.sample_index,
                text_mask=batch.text_mask,
            )
        return batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)  # type: ignore[attr-defined]


def test_non_finite_steps_are_skipped_then_the_run_stops_with_its_checkpoint_intact(tmp_path: Path) -> None:
    from dfm.app import bootstrap
    from dfm.ports.runtime import Topology

    cfg = tiny(tmp_path, "train.max_steps=10", "checkpoint.interval=2", "train.max_consecutive_nonfinite=3")
    codec, text = bootstrap.build_codecs(cfg)
    source = NaNAfter(iter(bootstrap.build_data_source(cfg, Topology(), codec, text)), bad_from=3, per_step=2)
    with pytest.raises(TrainingError) as stopped:
        train(cfg, data=source)
    assert str(stopped.value) == (
        "3 consecutive steps had a non-finite loss or gradient (last at step 5); stopping. The last checkpoint "
        f"before step 3 is intact: {tmp_path / 'checkpoints' / 'step_0000002'} (--resume "
        f"{tmp_path / 'checkpoints' / 'step_0000002'} goes back to it). Lower optim.lr (a resumed run uses the "
        "new value), check the data, or raise train.max_consecutive_nonfinite."
    )  # not step 4's checkpoint, written during the streak
    logged = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped"] for r in logged] == [0.0, 0.0, 1.0, 1.0]
    assert [(r["loss"], r["grad_norm"], r["mse"]) for r in logged[2:]] == [(None, None, None)] * 2  # null in JSON
    assert all(isinstance(r["loss"], float) and isinstance(r["grad_norm"], float) for r in logged[:2])
    latest = DCPCheckpointStore(tmp_path / "checkpoints").latest()
    assert latest is not None and latest.step == 4  # skipped steps leave the weights of step 2: still good
    weights = model_weights(tmp_path)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_out_of_disk_space_while_saving_keeps_the_previous_checkpoint(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    cfg = tiny(run_dir, "train.max_steps=20", "checkpoint.interval=1", "checkpoint.keep_last=20")
    with pytest.raises(CheckpointError, match=r"out of disk space while writing checkpoint step \d+ .* is intact"):
        train(cfg)
    store = DCPCheckpointStore(run_dir / "checkpoints")
    latest = store.latest()
    assert latest is not None
    state = {"runtime": {}}
    store.load(latest, state)  # verified and loadable
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_changed_optimizer_settings_are_used_on_resume_and_logged_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """optim.lr/betas/eps come from the config on resume (the advice "lower optim.lr" works)."""
    train(tiny(tmp_path, "train.max_steps=2", "optim.lr=1e-3"))
    capsys.readouterr()
    changed = ["optim.lr=5e-4", "optim.betas=0.5,0.9", "optim.eps=1e-6"]
    train(tiny(tmp_path, "train.max_steps=3", *changed, "logging.level=INFO", "logging.format=json"))
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    logged = {e["key"]: (e["old"], e["new"]) for e in events if e["event"].startswith("setting changed")}
    assert logged == {
        "optim.lr": (0.001, 0.0005),
        "optim.betas": ([0.9, 0.999], [0.5, 0.9]),
        "optim.eps": (1e-8, 1e-6),
        "train.max_steps": (2, 3),
        "logging.level": ("WARNING", "INFO"),
        "logging.format": ("auto", "json"),
    }
    assert sum(e["event"].startswith("setting changed") for e in events) == len(logged)  # once each
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["lr"] for r in records] == [1e-3, 1e-3, 5e-4]


def test_resume_refuses_another_seed_or_global_batch_size(tmp_path: Path) -> None:
    train(tiny(tmp_path, "train.max_steps=2"))
    before = (tmp_path / "metrics.jsonl").read_text(), (tmp_path / "config.yaml").read_text()
    ckpt = tmp_path / "checkpoints" / "step_0000002"
    with pytest.raises(ConfigError) as refused:
        train(tiny(tmp_path, "train.max_steps=4", "seed=3", "train.global_batch_size=4"))
    assert refused.value.problems == [
        f"seed: is 3, but the checkpoint {ckpt} was trained with 0; resuming requires the same value (set seed=0), "
        "or start a new run in another run.dir",
        f"train.global_batch_size: is 4, but the checkpoint {ckpt} was trained with 2; resuming requires the same "
        "value (set train.global_batch_size=2), or start a new run in another run.dir",
    ]
    assert ((tmp_path / "metrics.jsonl").read_text(), (tmp_path / "config.yaml").read_text()) == before


def test_resume_from_another_run_directory_takes_its_newest_checkpoint(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    train(tiny(first, "train.max_steps=2", "checkpoint.interval=1"))
    result = cli("train", "--recipe", "wan_tiny_t2v", f"run.dir={second}", "train.max_steps=3", "--resume", str(first))
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in read_metrics(second / "metrics.jsonl")] == [3]
    train(tiny(first, "train.max_steps=3"))  # the first run itself continued to step 3
    assert read_metrics(second / "metrics.jsonl")[0]["loss"] == read_metrics(first / "metrics.jsonl")[-1]["loss"]
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"^checkpoint\.resume: no checkpoint under .*empty"):
        train(tiny(second, "train.max_steps=4", f"checkpoint.resume={empty}"))


def _fill(disk: Path, leave_blocks: int) -> None:
    """Fill the filesystem of ``disk`` up to ``leave_blocks`` free blocks."""
    stat = os.statvfs(disk)
    (disk / "filler").write_bytes(b"\0" * ((stat.f_bavail - leave_blocks) * stat.f_frsize))
    assert os.statvfs(disk).f_bavail == leave_blocks


def test_out_of_disk_space_writing_config_yaml_keeps_the_old_one(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    train(tiny(run_dir, "train.max_steps=1", "checkpoint.interval=1"))
    old = (run_dir / "config.yaml").read_text()
    _fill(small_disk, leave_blocks=1)  # the lock file's record takes the last block
    with pytest.raises(RunDirError) as full:
        train(tiny(run_dir, "train.max_steps=2"))
    assert str(full.value) == (
        f"out of disk space writing {run_dir / 'config.yaml'} (config.yaml is as it was before); free some space "
        "or choose a run.dir on a larger disk, then run again"
    )
    assert (run_dir / "config.yaml").read_text() == old
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.jsonl"]


def test_out_of_disk_space_rewriting_metrics_keeps_them(small_disk: Path) -> None:
    run_dir = small_disk / "run"
    train(tiny(run_dir, "train.max_steps=2", "checkpoint.interval=1"))
    old = (run_dir / "metrics.jsonl").read_text()
    _fill(small_disk, leave_blocks=1)
    step_1 = run_dir / "checkpoints" / "step_0000001"  # resuming there drops step 2's record: a rewrite
    with pytest.raises(RunDirError) as full:
        train(tiny(run_dir, "train.max_steps=2", f"checkpoint.resume={step_1}"))
    assert str(full.value) == (
        f"out of disk space writing {run_dir / 'metrics.jsonl'} (metrics.jsonl is as it was before); free some "
        "space or choose a run.dir on a larger disk, then run again"
    )
    assert (run_dir / "metrics.jsonl").read_text() == old
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.jsonl"]
