"""generate: a trained tiny checkpoint -> mp4 per prompt + contact sheet; seeded; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.cli import cli

from dfm.adapters.memory import InMemoryVideoWriter
from dfm.adapters.video import read_video
from dfm.app.config import resolve_config
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.training import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "run"
    cfg = resolve_config(
        "wan_tiny_t2v", None, [f"run.dir={out}", "train.max_steps=2", "train.ema_decay=0.9", "logging.level=WARNING"]
    )
    train(cfg)
    return out


def _videos(run_dir: Path, **kw: object) -> dict[Path, torch.Tensor]:
    writer = InMemoryVideoWriter()
    request = GenerateRequest(
        checkpoint=run_dir, prompts=["a red circle moving left slowly"], out=run_dir / "x.mp4", progress=False, **kw
    )
    generate(request, writer=writer)
    return writer.videos


def test_the_cli_writes_one_mp4_per_prompt_and_a_contact_sheet(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples" / "demo.mp4"
    result = cli(
        "generate",
        "--checkpoint",
        str(run_dir),
        "--prompt",
        "a red circle moving left slowly",
        "--prompt",
        "a blue square moving up quickly",
        "--steps",
        "3",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    paths = [tmp_path / "samples" / "demo_00.mp4", tmp_path / "samples" / "demo_01.mp4"]
    assert result.stdout.split() == [str(p) for p in paths] + [str(out.with_suffix(".png"))]
    for path in paths:
        frames, fps = read_video(path)
        assert frames.shape == (5, 16, 16, 3) and fps == pytest.approx(16.0)
    assert out.with_suffix(".png").stat().st_size > 0


def test_the_same_seed_gives_the_same_video_and_another_seed_another(run_dir: Path) -> None:
    a, b = _videos(run_dir, seed=3, steps=3), _videos(run_dir, seed=3, steps=3)
    c = _videos(run_dir, seed=4, steps=3)
    (va,), (vb,), (vc,) = a.values(), b.values(), c.values()
    assert torch.equal(va, vb)
    assert not torch.equal(va, vc)


def test_ema_weights_are_used_unless_disabled(run_dir: Path) -> None:
    (ema,) = _videos(run_dir, steps=3).values()
    (raw,) = _videos(run_dir, steps=3, use_ema=False).values()
    assert not torch.equal(ema, raw)


def test_the_sampler_override_is_checked_against_the_model(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="--sampler edm_heun does not fit a flow-matching model"):
        _videos(run_dir, steps=3, sampler="edm_heun")


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    result = cli("generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o.mp4"))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: --checkpoint: {tmp_path / 'nope'} does not exist "
        "(expected a run, checkpoint root or checkpoint directory)"
    )


def test_a_bad_output_name_is_a_one_line_error(run_dir: Path, tmp_path: Path) -> None:
    result = cli("generate", "--checkpoint", str(run_dir), "--prompt", "x", "--out", str(tmp_path / "o.gif"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --out must name an .mp4 file, got {tmp_path / 'o.gif'}"


def test_mock_latent_training_runs_with_vae_shaped_latents_but_cannot_decode(tmp_path: Path) -> None:
    cfg = resolve_config(
        "wan_tiny_t2v",
        None,
        [
            f"run.dir={tmp_path}",
            "data.source=mock",
            "model.in_channels=16",
            "model.out_channels=16",
            "data.frames=9",
            "data.height=32",
            "data.width=32",
            "train.max_steps=1",
            "logging.level=WARNING",
        ],
    )
    assert train(cfg).step == 1  # latents (16, 3, 4, 4): the WAN VAE's shape for 9 x 32 x 32 videos
    with pytest.raises(ValueError, match="trained on mock latents"):
        _videos(tmp_path, steps=2)
