"""The CLIs on checkpoints of the pickle era (layout version 1): good ones resume exactly, crafted ones run nothing.

A run of the tiny recipe is trained (layout version 2), then rewritten as layout version 1 exactly as dfm
wrote it before (``support.checkpoints.write_v1_checkpoint``). ``train --resume``, ``generate`` and
``convert export`` must use the good one and refuse crafted copies with an ``error:`` line — the marker
file their payload would create never appears.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from support.checkpoints import Payload, payload_pickle, replace_file, write_v1_checkpoint
from support.cli import cli

from dfm.adapters.checkpoint import DCPCheckpointStore, read_meta
from dfm.adapters.tracking import read_metrics
from dfm.app import bootstrap
from dfm.app.config import TrainConfig, resolve_config
from dfm.app.services.training import train

PROMPT = "a red circle moving left slowly"


def tiny(run_dir: Path, *overrides: str) -> TrainConfig:
    return resolve_config(
        "wan_tiny_t2v", None, [f"run.dir={run_dir}", "train.ema_decay=0.9", "logging.level=WARNING", *overrides]
    )


def as_v1(run_dir: Path, out: Path, *, crafted: dict[tuple[str, ...], Any] | None = None) -> Path:
    """``out``: a run directory holding ``run_dir``'s newest checkpoint rewritten in layout version 1."""
    cfg = tiny(run_dir)
    runtime = bootstrap.build_runtime(cfg)
    runtime.build_network(cfg.model)
    runtime.attach_optimizer(bootstrap.optimizer_settings(cfg))
    state = {"runtime": runtime.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    store = DCPCheckpointStore(run_dir / "checkpoints")
    info = store.latest()
    assert info is not None
    meta = store.load(info, state)
    for path, value in (crafted or {}).items():
        container: Any = state
        for part in path[:-1]:
            container = container[part]
        container[path[-1]] = value
    write_v1_checkpoint(out / "checkpoints", info.step, state, meta)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("untrusted") / "run"
    train(tiny(run_dir, "train.max_steps=2"))
    return run_dir


def test_a_version_1_run_resumes_exactly(trained: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    train(tiny(whole, "train.max_steps=4"))
    legacy = as_v1(trained, tmp_path / "legacy")
    assert read_meta(legacy / "checkpoints")["step"] == 2
    resumed = train(tiny(legacy, "train.max_steps=4"))
    assert resumed.step == 4
    want = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(whole / "metrics.jsonl")}
    got = {r["step"]: (r["loss"], r["grad_norm"]) for r in read_metrics(legacy / "metrics.jsonl")}
    assert got == {3: want[3], 4: want[4]}
    newest = DCPCheckpointStore(legacy / "checkpoints").latest()
    assert newest is not None and (newest.path / "state.json").is_file()  # the new checkpoint is version 2


def _refused_everywhere(run_dir: Path, tmp_path: Path, expected: str) -> None:
    marker = tmp_path / "pwned"
    runs = {
        "train": cli(
            "train", "--recipe", "wan_tiny_t2v", f"run.dir={run_dir}", "train.max_steps=3", "--resume", "auto"
        ),
        "generate": cli(
            "generate",
            "--checkpoint",
            str(run_dir),
            "--prompt",
            PROMPT,
            "--steps",
            "2",
            "--out",
            str(tmp_path / "x.mp4"),
        ),
        "export": cli("convert", "export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "exported")),
    }
    for name, result in runs.items():
        assert result.returncode == 2, (name, result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        assert expected in result.stderr and "error:" in result.stderr, (name, result.stderr)
    assert not marker.exists()
    assert not (tmp_path / "x.mp4").exists() and not (tmp_path / "exported").exists()


def test_a_crafted_metadata_is_refused_by_train_generate_and_export(trained: Path, tmp_path: Path) -> None:
    run_dir = as_v1(trained, tmp_path / "crafted")
    replace_file(run_dir / "checkpoints" / "step_0000002", ".metadata", payload_pickle(tmp_path / "pwned"))
    _refused_everywhere(run_dir, tmp_path, "refers to posix.system, which DCP metadata never contains")


def test_a_crafted_value_is_refused_by_train_and_never_read_by_generate(trained: Path, tmp_path: Path) -> None:
    """The schedule's step counter holds the payload: train needs it and refuses it; generate reads only weights."""
    marker = tmp_path / "pwned"
    run_dir = as_v1(trained, tmp_path / "crafted", crafted={("runtime", "scheduler", "last_epoch"): Payload(marker)})
    resumed = cli("train", "--recipe", "wan_tiny_t2v", f"run.dir={run_dir}", "train.max_steps=3", "--resume", "auto")
    assert resumed.returncode == 2, resumed.stderr
    assert "error:" in resumed.stderr and "Traceback" not in resumed.stderr
    assert "the checkpoint's value of runtime.scheduler.last_epoch is not plain data" in resumed.stderr
    done = cli(
        "generate", "--checkpoint", str(run_dir), "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / "x.mp4")
    )
    assert done.returncode == 0, done.stderr
    assert not marker.exists()


def test_a_good_version_1_checkpoint_generates_and_exports(trained: Path, tmp_path: Path) -> None:
    run_dir = as_v1(trained, tmp_path / "legacy")
    done = cli(
        "generate", "--checkpoint", str(run_dir), "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / "x.mp4")
    )
    assert done.returncode == 0, done.stderr
    same = cli(
        "generate", "--checkpoint", str(trained), "--prompt", PROMPT, "--steps", "2", "--out", str(tmp_path / "y.mp4")
    )
    assert same.returncode == 0, same.stderr
    assert (tmp_path / "x.mp4").read_bytes() == (tmp_path / "y.mp4").read_bytes()
    exported = cli("convert", "export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "exported"))
    assert exported.returncode == 0, exported.stderr
    shutil.rmtree(tmp_path / "exported")
