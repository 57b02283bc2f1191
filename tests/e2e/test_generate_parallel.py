"""``torchrun -m dfm.app.generate`` on 2 and 4 CPU ranks (gloo) makes the one-process videos; only rank 0 writes.

Text-to-video on a tiny trained WAN, and image-to-video (``--image``) on a tiny random WAN I2V exported with its
codecs (VAE, UMT5, CLIP), each in CFG 2, context 2 and CFG 2 x context 2.

Every launch runs ``generate_rank.py``: the ``dfm.app.generate`` module as ``python -m`` runs it, with the
sampled latents recorded and each rank's ``--out`` moved into its own ``rank<R>/`` directory.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from support.cli import ROOT
from support.distributed import free_port, pose_as_rank
from support.pretrained import export_tiny_wan_i2v, write_tiny_clip_image_encoder, write_tiny_wan_model_root

from dfm.adapters.video import read_video
from dfm.app import generate as generate_cli
from dfm.app.cli import run_main
from dfm.app.config import resolve_config
from dfm.app.services import generation
from dfm.app.services.training import train

WORKER = Path(__file__).resolve().parent / "generate_rank.py"
PROMPTS = ("a red circle moving left slowly", "a blue square moving up quickly")
LAYOUTS = {  # name: processes, options (the tiny WAN: 2 heads, 5 x 8 x 8 = 320 tokens; guidance 5)
    "cfg2": (2, ["--cfg-parallel"]),
    "context2": (2, ["--context-parallel", "2"]),
    "cfg2_context2": (4, []),  # automatic
}
NAMES = ("v_00.mp4", "v_01.mp4", "v.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen_parallel") / "run"
    cfg = resolve_config(
        "wan_tiny_t2v", None, [f"run.dir={out}", "train.max_steps=2", "train.ema_decay=0.9", "logging.level=WARNING"]
    )
    train(cfg)
    return out


def _generate(checkpoint: Path, where: Path, world: int, options: list[str]) -> subprocess.CompletedProcess[str]:
    """Launch ``world`` ranks (one process: no torchrun) generating the two prompts into ``where``."""
    args = ["--checkpoint", str(checkpoint), "--steps", "3", "--seed", "5", "--out", str(where / "v.mp4"), *options]
    args += [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]
    launcher = [sys.executable]
    if world > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(world)]
        launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    where.mkdir(parents=True)
    command = [*launcher, str(WORKER), str(where), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def one_process(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = tmp_path_factory.mktemp("one_process")
    result = _generate(run_dir, where / "out", 1, [])
    assert result.returncode == 0, result.stderr[-4000:]
    return where / "out"


@pytest.mark.parametrize("name", LAYOUTS)
def test_parallel_generation_makes_the_one_process_videos(
    run_dir: Path, one_process: Path, tmp_path: Path, name: str
) -> None:
    world, options = LAYOUTS[name]
    result = _generate(run_dir, tmp_path / "out", world, options)
    _check_like_one_process(result, tmp_path / "out", one_process, world, name, (5, 16, 16, 3))


@pytest.fixture(scope="module")
def i2v(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random WAN image-to-video model (exported with its codecs) and a first frame."""
    tmp = tmp_path_factory.mktemp("gen_parallel_i2v")
    root = write_tiny_clip_image_encoder(write_tiny_wan_model_root(tmp / "models", seed=0), seed=3)
    image = tmp / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(image)
    return export_tiny_wan_i2v(root, tmp / "i2v"), image


@pytest.fixture(scope="module")
def i2v_one_process(i2v: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    checkpoint, image = i2v
    where = tmp_path_factory.mktemp("i2v_one_process")
    result = _generate(checkpoint, where / "out", 1, ["--image", str(image)])
    assert result.returncode == 0, result.stderr[-4000:]
    return where / "out"


@pytest.mark.parametrize("name", LAYOUTS)
def test_parallel_image_to_video_makes_the_one_process_videos(
    i2v: tuple[Path, Path], i2v_one_process: Path, tmp_path: Path, name: str
) -> None:
    """The condition channels join the noisy latents before the tokens are split (context parallel), the image
    features travel with their samples (CFG parallel), every rank's cross-attention reads all image tokens."""
    (checkpoint, image), (world, options) = i2v, LAYOUTS[name]  # 18 tokens (3 x 2 x 3) over 2 heads
    result = _generate(checkpoint, tmp_path / "out", world, [*options, "--image", str(image)])
    _check_like_one_process(result, tmp_path / "out", i2v_one_process, world, name, (9, 32, 48, 3))


def _check_like_one_process(
    result: subprocess.CompletedProcess[str],
    out: Path,
    one_process: Path,
    world: int,
    name: str,
    shape: tuple[int, ...],
) -> None:
    """Rank 0 alone wrote the videos and the sheet; every rank sampled the one-process latents (<= 1e-5)."""
    assert result.returncode == 0, result.stderr[-4000:]
    written = out / "rank0"
    assert result.stdout.split() == [str(written / n) for n in NAMES]  # rank 0 names its files; the others nothing
    assert sorted(p.name for p in written.iterdir()) == sorted(NAMES)
    assert not [r for r in range(1, world) if (out / f"rank{r}").exists()], "a rank > 0 wrote files"
    want = load_file(one_process / "rank0.safetensors")
    for rank in range(world):
        got = load_file(out / f"rank{rank}.safetensors")
        assert sorted(got) == sorted(want) == ["video0", "video1"]
        for key in want:
            rel = float((got[key] - want[key]).norm() / want[key].norm())
            assert rel <= 1e-5, (name, rank, key, rel)
    for video in NAMES[:2]:
        (frames, fps), (reference, _) = read_video(written / video), read_video(one_process / "rank0" / video)
        assert frames.shape == reference.shape == shape and fps == pytest.approx(16.0)
        assert (frames.int() - reference.int()).abs().max() <= 2, (name, video)  # h264 of near-equal frames


ONE_PROCESS = (
    "--context-parallel 2 needs a multiple of 2 processes, but 1 process was launched (no torchrun); launch "
    "`torchrun --nproc-per-node 2 -m dfm.app.generate ...` (twice that many with CFG parallel), or use no "
    "--context-parallel"
)


@pytest.mark.parametrize(
    ("world", "options", "message"),
    [
        (1, ["--context-parallel", "2"], ONE_PROCESS),
        (4, ["--context-parallel", "4"], "splits the model's 2 attention heads (Ulysses), but 2 is not divisible by 4"),
        (2, ["--cfg-parallel", "--guidance", "1"], "--guidance 1 runs one pass per step (conditional only)"),
        (3, ["--cfg-parallel"], "--cfg-parallel splits the processes into pairs, but 3 processes were launched"),
        (2, ["--context-parallel", "0"], "--context-parallel must be an integer >= 1, got 0"),
    ],
)
def test_impossible_layouts_are_one_line_errors_before_the_weights_load(
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    world: int,
    options: list[str],
    message: str,
) -> None:
    if world > 1:
        pose_as_rank(monkeypatch, world)  # the torchrun environment of rank 0; no process group is joined

    def trip_wire(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the layout was refused")

    monkeypatch.setattr(generation, "load_for_inference", trip_wire)
    argv = ["--checkpoint", str(run_dir), "--prompt", "x", "--out", str(tmp_path / "o.mp4"), *options]
    assert run_main(generate_cli.main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], errors
    assert errors[0] == f"error: {ONE_PROCESS}" or world > 1
    assert not list(tmp_path.iterdir()) and not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("options", "layout"), [(["--cfg-parallel"], (2, 1)), (["--context-parallel", "2"], (1, 2))], ids=("cfg2", "cp2")
)
def test_bench_generate_under_torchrun_reports_the_layout(
    tmp_path: Path, options: list[str], layout: tuple[int, int]
) -> None:
    """``torchrun -m dfm.app.bench generate`` (the multi-GPU generation figures' command): the ranks share each
    forward as ``generate`` lays them out, rank 0 alone prints, and a step cache that never reuses (threshold 0)
    under context parallelism (its statistics summed over the ranks) leaves the dense latents exactly."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    launcher += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    argv = ["-m", "dfm.app.bench", "generate", "--recipe", "wan_tiny_t2v", "--steps", "3", "--guidance", "5"]
    argv += ["--cache", "first_block:0", *options]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*launcher, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    dense, cached = (json.loads(line) for line in result.stdout.splitlines())  # rank 0's two rows, no other
    for row in (dense, cached):
        assert (row["world"], row["cfg_parallel"], row["context"], row["cfg"]) == (2, *layout, "batched")
        assert row["steps"] == 3 and row["denoise_s"] > 0
    assert (cached["setting"], cached["calls"], cached["calls_reused"]) == ("first_block:0", 3, 0)
    assert cached["latents_rel_l2"] == 0.0 and cached["frames_psnr_db"] == math.inf
