"""A corrupted newest checkpoint is handled one way, whatever the damage: skipped with a warning naming it.

A run keeps checkpoints at steps 2 and 4; step 4 is then truncated, stripped of its manifest, or has one
byte changed (same size: only the sha256 check sees it). ``train --resume auto`` and ``generate RUN_DIR``
both warn naming step 4 and why, and use step 2; a checkpoint named explicitly is refused with an error
that names the intact one; when none is usable, resuming is an error (not a silent fresh start).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.cli import cli

from dfm.adapters.tracking import read_metrics
from dfm.app.config import resolve_config
from dfm.app.services.training import train

PROMPT = "a red circle moving left slowly"
DATA = "tensors/shard-00001-model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("corrupted") / "run"
    overrides = [f"run.dir={run_dir}", "train.max_steps=4", "checkpoint.interval=2", "logging.level=WARNING"]
    train(resolve_config("wan_tiny_t2v", None, overrides))
    return run_dir


def damage(step_dir: Path, how: str) -> str:
    """Damages a checkpoint; returns the words its warning must contain."""
    data = step_dir / DATA
    if how == "truncated":
        data.write_bytes(data.read_bytes()[:-10])
        return "the manifest says"
    if how == "no manifest":
        (step_dir / "manifest.json").unlink()
        return "has no manifest.json"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(blob)
    return "same size: bytes were changed"


def copy_of(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def resume(run_dir: Path, *args: str) -> object:
    return cli("train", "--recipe", "wan_tiny_t2v", f"run.dir={run_dir}", "checkpoint.interval=2", *args)


@pytest.mark.parametrize("how", ["truncated", "no manifest", "flipped byte"])
def test_resume_auto_skips_a_corrupted_newest_checkpoint_and_says_so(trained: Path, tmp_path: Path, how: str) -> None:
    run_dir = copy_of(trained, tmp_path)
    words = damage(run_dir / "checkpoints" / "step_0000004", how)
    done = resume(run_dir, "train.max_steps=5")
    assert done.returncode == 0, done.stderr
    assert "checkpoint unusable, trying an older one" in done.stderr and words in done.stderr
    assert "using an older checkpoint: newer ones are unusable" in done.stderr
    assert "step_0000004" in done.stderr
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]  # continued from step 2: the records after it were replaced


def test_generate_skips_a_corrupted_newest_checkpoint_and_names_the_one_it_used(trained: Path, tmp_path: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    words = damage(run_dir / "checkpoints" / "step_0000004", "flipped byte")
    out = tmp_path / "x.mp4"
    done = cli("generate", "--checkpoint", str(run_dir), "--prompt", PROMPT, "--steps", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert words in done.stderr and "using an older checkpoint" in done.stderr
    assert '"event": "loaded checkpoint"' in done.stderr and "step_0000002" in done.stderr
    assert out.is_file()


def test_a_named_corrupted_checkpoint_is_refused_naming_an_intact_one(trained: Path, tmp_path: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    newest = run_dir / "checkpoints" / "step_0000004"
    damage(newest, "flipped byte")
    done = resume(run_dir, "train.max_steps=5", "--resume", str(newest))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    intact = run_dir / "checkpoints" / "step_0000002"
    assert f"the checkpoint {intact} is intact: name it instead, or use auto" in done.stderr


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(trained: Path, tmp_path: Path) -> None:
    run_dir = copy_of(trained, tmp_path)
    damage(run_dir / "checkpoints" / "step_0000004", "truncated")
    damage(run_dir / "checkpoints" / "step_0000002", "flipped byte")
    before = (run_dir / "metrics.jsonl").read_text()
    done = resume(run_dir, "train.max_steps=5")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "error: no usable checkpoint: step_0000004:" in done.stderr and "step_0000002:" in done.stderr
    assert "start over with --resume never" in done.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before
