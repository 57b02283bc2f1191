"""The whole real-data path, offline: mp4/png files + captions -> prepare (tiny WAN VAE + UMT5) -> energon
shards -> training with the local runtime -> exact resume mid-epoch -> generate through the VAE.

The videos, the corrupt file and the uncaptioned one are ``support.media``'s (their report is checked in
``test_prepare.py``); the codecs are tiny seeded ``save_pretrained`` directories (``support.pretrained``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.cli import cli
from support.media import write_inputs
from support.pretrained import write_tiny_wan_model_root

from dfm.adapters.tracking import read_metrics
from dfm.adapters.video import read_video
from dfm.app.config import resolve_config
from dfm.app.services.training import train

pytest.importorskip("av")
pytest.importorskip("megatron.energon")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pipeline")
    root = write_tiny_wan_model_root(base / "Wan-Tiny")
    inputs = write_inputs(base / "videos")
    out = base / "shards"
    result = cli(
        "prepare",
        *("--input", str(inputs), "--out", str(out), "--vae", str(root), "--text-encoder", str(root)),
        *("--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--samples-per-shard", "2"),
        *("--dtype", "float32", "--device", "cpu", "--no-progress"),
    )
    assert result.returncode == 0, result.stderr
    return root, out


def _config(run: Path, root: Path, shards: Path, steps: int) -> list[str]:
    return [
        f"run.dir={run}",
        "data.source=energon",
        f"data.path={shards}",
        "data.num_workers=0",
        "data.frames=5",
        "data.height=32",
        "data.width=32",
        "data.text_len=16",
        "model.in_channels=4",
        "model.out_channels=4",
        "sample.frames=5",
        "sample.height=32",
        "sample.width=32",
        "train.global_batch_size=1",
        f"train.max_steps={steps}",
        "checkpoint.interval=2",
        "logging.level=WARNING",
        f"codecs.vae={root}",
        f"codecs.text_encoder={root}",
    ]


def test_train_resume_and_generate_on_prepared_data(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    root, shards = prepared
    whole = tmp_path / "whole"
    assert train(resolve_config("wan_tiny_t2v", None, _config(whole, root, shards, 3))).step == 3
    parted = tmp_path / "parted"
    assert train(resolve_config("wan_tiny_t2v", None, _config(parted, root, shards, 2))).step == 2
    # the same run continued from its step-2 checkpoint: the loader resumes mid-epoch (4 samples, batch 1)
    assert train(resolve_config("wan_tiny_t2v", None, _config(parted, root, shards, 3))).step == 3
    want = {r["step"]: r["loss"] for r in read_metrics(whole / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(parted / "metrics.jsonl")}
    assert got == want and len(want) == 3, (got, want)

    out = tmp_path / "red.mp4"
    result = cli("generate", "--checkpoint", str(parted), "--prompt", "a red car", "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    frames, _ = read_video(out)
    assert frames.shape == (5, 32, 32, 3)  # decoded by the tiny WAN VAE from 4 x 2 x 4 x 4 latents
