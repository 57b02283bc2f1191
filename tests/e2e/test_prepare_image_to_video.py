"""Image-to-video data end to end: ``prepare --image-condition`` stores each clip's condition latents (the VAE's
encoding of [first frame, zeros..., (last frame)]) and image features (toy pixel blocks, or a real tiny transformers
CLIPVisionModel) -> training a tiny WAN I2V on them (local, and fsdp2 on two ranks equal to local) ->
``generate --image`` from the checkpoint writes an mp4. Models and data without a fitting condition are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from support.cli import ROOT
from support.distributed import free_port
from support.media import write_inputs
from support.pretrained import TINY_CLIP_DIM, write_tiny_clip_image_encoder, write_tiny_wan_model_root

from dfm.adapters.diffusers import WanVAECodec
from dfm.adapters.diffusers.clip_image import CLIPImageEncoder
from dfm.adapters.hf_datasets import webdataset_to_hf
from dfm.adapters.synthetic import PatchImageEncoder
from dfm.adapters.tracking import read_metrics
from dfm.adapters.video import read_video, to_uint8_frames
from dfm.adapters.video.clips import ClipOptions, load_clip
from dfm.app.cli import run_main
from dfm.app.config import ConfigError, resolve_config
from dfm.app.generate import main as generate_main
from dfm.app.prepare import main as prepare_main
from dfm.app.services.training import train
from dfm.domain.diffusion.image_condition import condition_pixels
from dfm.ports.samples import CONDITION, IMAGE, LATENTS, META, TENSORS, SampleMeta

pytest.importorskip("av")
pytest.importorskip("megatron.energon")
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
QUIET = ["logging.level=WARNING", "data.num_workers=0"]


def _samples(out: Path) -> list[tuple[SampleMeta, dict[str, torch.Tensor]]]:
    found = []
    for shard in sorted(out.glob("r*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, _, suffix = member.name.partition(".")
                members.setdefault(key, {})[suffix] = tar.extractfile(member).read()  # type: ignore[union-attr]
        found += [(SampleMeta.from_json(m[META]), load_safetensors(m[TENSORS])) for m in members.values()]
    return found


def _toy(out: Path, *extra: str) -> list[str]:
    toy = ["--vae", "toy", "--text-encoder", "toy", "--height", "16", "--width", "16", "--frames", "5"]
    return [*toy, "--out", str(out), "--dtype", "float32", "--no-progress", *extra]


@pytest.mark.parametrize("kind", ["first", "first_last"])
def test_toy_prepare_stores_the_condition_and_image_features(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "toy"
    assert prepare_main(_toy(out, "--synthetic", "2", "--image-condition", kind, "--image-encoder", "toy")) == 0
    samples = _samples(out)
    assert len(samples) == 2
    for meta, tensors in samples:
        latents, condition, image = tensors[LATENTS], tensors[CONDITION], tensors[IMAGE]  # toy VAE: latents = pixels
        last = latents[:, -1][None] if kind == "first_last" else None
        assert torch.equal(condition, condition_pixels(latents[:, 0][None], 5, last)[0])
        given = [0, 4] if kind == "first_last" else [0]
        assert torch.equal(image, PatchImageEncoder().encode(list(to_uint8_frames(latents[:, given], layout="cthw"))))
        assert (meta.condition, meta.image_encoder, meta.image_shape) == (
            kind,
            "PatchImageEncoder",
            (len(given), 16, 48),
        )
    if kind == "first":  # the tiny recipe trains on them as on synthetic clips (frame mask of stride 1)
        run = tmp_path / "run"
        data = ["data.source=energon", f"data.path={out}", "model.text_dim=64", "train.max_steps=2"]  # toy text: 64
        assert train(resolve_config("wan_tiny_i2v", None, [f"run.dir={run}", *data, *QUIET])).step == 2


def test_images_cannot_be_first_last_frame_conditioned(tmp_path: Path) -> None:
    inputs = write_inputs(tmp_path / "videos")
    argv = _toy(tmp_path / "out", "--input", str(inputs), "--image-condition", "first_last", "--image-encoder", "toy")
    assert prepare_main(argv) == 0
    skipped = {Path(s.source).name for s, _ in _samples(tmp_path / "out")}
    assert skipped == {"a.mp4", "b.mp4", "c.mov"}  # d.png, one frame, skipped as too_short


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--image-condition", "first"],
            "--image-condition first needs --image-encoder DIR (the CLIP vision model, e.g. the image_encoder/ of "
            "Wan2.1-I2V-14B-480P-Diffusers; 'toy' for the toy encoder)",
        ),
        (
            ["--image-encoder", "toy"],
            "--image-encoder goes with --image-condition first or first_last (image-to-video samples)",
        ),
        (
            ["--image-condition", "first_last", "--image-encoder", "toy", "--frames", "1"],
            "--image-condition first_last needs clips of at least 2 frames; --frames is 1",
        ),
    ],
)
def test_image_condition_options_are_checked_before_any_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert run_main(prepare_main, [*_toy(tmp_path / "out", "--synthetic", "2"), *argv]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """4 synthetic 5 x 32 x 32 clips prepared with the tiny WAN VAE, UMT5 and CLIP; their HF copy."""
    base = tmp_path_factory.mktemp("i2v_data")
    root = write_tiny_clip_image_encoder(write_tiny_wan_model_root(base / "Wan-Tiny-I2V"), seed=3)
    out = base / "shards"
    codecs = ["--vae", str(root), "--text-encoder", str(root), "--image-encoder", str(root)]
    size = ["--height", "32", "--width", "32", "--frames", "5", "--samples-per-shard", "2", "--dtype", "float32"]
    argv = ["--synthetic", "4", "--out", str(out), *codecs, *size, "--image-condition", "first", "--no-progress"]
    assert prepare_main([*argv, "--device", "cpu"]) == 0
    webdataset_to_hf(out, base / "hf")
    return {"root": root, "energon": out, "hf": base / "hf"}


def test_prepare_stores_the_wan_vae_condition_and_clip_features(prepared: dict[str, Path]) -> None:
    root = prepared["root"]
    samples = _samples(prepared["energon"])
    assert len(samples) == 4
    vae, clip = WanVAECodec(root), CLIPImageEncoder(root)
    for meta, tensors in samples:
        pixels = load_clip(Path(meta.source), ClipOptions(buckets=((32, 32),), frames=5, fps=16.0)).pixels
        with torch.no_grad():
            condition = vae.encode(condition_pixels(pixels[None, :, 0], 5))[0]
        features = clip.encode([to_uint8_frames(pixels[:, :1], layout="cthw")[0]])
        assert tensors[CONDITION].shape == tensors[LATENTS].shape == (4, 2, 4, 4)
        torch.testing.assert_close(tensors[CONDITION], condition, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tensors[IMAGE], features, rtol=1e-5, atol=1e-6)
        assert tensors[IMAGE].shape == (1, 257, TINY_CLIP_DIM) and meta.image_shape == (1, 257, TINY_CLIP_DIM)
        assert meta.condition == "first" and meta.image_encoder == clip.identity


def _config(run: Path, root: Path, source: str, data: Path, *extra: str) -> list[str]:
    return [
        f"run.dir={run}",
        "model.in_channels=12",  # noisy latents, the frame mask (temporal stride 4), the condition latents
        "model.out_channels=4",
        f"model.image_dim={TINY_CLIP_DIM}",
        "model.added_kv_proj_dim=24",
        f"data.source={source}",
        f"data.path={data}",
        "data.frames=5",
        "data.height=32",
        "data.width=32",
        "data.text_len=16",
        "sample.frames=5",
        "sample.height=32",
        "sample.width=32",
        "train.max_steps=3",
        "checkpoint.interval=3",
        f"codecs.vae={root}",
        f"codecs.text_encoder={root}",
        f"codecs.image_encoder={root}",
        *QUIET,
        *extra,
    ]


def test_train_locally_then_generate_from_an_image(prepared: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(resolve_config("wan_tiny_i2v", None, _config(run, prepared["root"], "energon", prepared["energon"])))
    assert len(read_metrics(run / "metrics.jsonl")) == 3
    first = to_uint8_frames(torch.rand(3, 1, 32, 32) * 2 - 1, layout="cthw")[0]
    Image.fromarray(first.numpy()).save(tmp_path / "first.png")
    out = tmp_path / "video.mp4"
    argv = ["--checkpoint", str(run), "--prompt", "a red ball", "--image", str(tmp_path / "first.png")]
    assert generate_main([*argv, "--steps", "2", "--out", str(out)]) == 0
    frames, _ = read_video(out)
    assert frames.shape == (5, 32, 32, 3)  # decoded by the tiny WAN VAE


def test_fsdp2_on_two_ranks_trains_as_local_does(prepared: dict[str, Path], tmp_path: Path) -> None:
    """``hf_datasets`` give every layout of a global batch the same samples, so the losses must agree."""
    local = tmp_path / "local"
    train(resolve_config("wan_tiny_i2v", None, _config(local, prepared["root"], "hf_datasets", prepared["hf"])))
    sharded = tmp_path / "fsdp2"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dfm.app.train"]
    command += ["--recipe", "wan_tiny_i2v", "runtime=fsdp2"]
    command += _config(sharded, prepared["root"], "hf_datasets", prepared["hf"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    want = [r["loss"] for r in read_metrics(local / "metrics.jsonl")]
    got = [r["loss"] for r in read_metrics(sharded / "metrics.jsonl")]
    assert len(want) == 3 and got == pytest.approx(want, rel=1e-5), (got, want)


def test_data_and_layouts_that_cannot_carry_the_condition_are_config_errors(tmp_path: Path) -> None:
    t2v = tmp_path / "t2v"
    assert prepare_main(_toy(t2v, "--synthetic", "2")) == 0
    base = [f"run.dir={tmp_path / 'run'}", "data.source=energon", f"data.path={t2v}", "model.text_dim=64", *QUIET]
    with pytest.raises(ConfigError, match=r"data.path: .*hold no image condition .*--image-condition first"):
        train(resolve_config("wan_tiny_i2v", None, base))
    with pytest.raises(ConfigError, match=r"data.packing: packed batches carry no image-to-video condition"):
        train(resolve_config("wan_tiny_i2v", None, [*base, "data.packing=true"]))
