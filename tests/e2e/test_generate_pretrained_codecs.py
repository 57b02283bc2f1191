"""generate with pretrained codecs: prompts embedded by UMT5, latents decoded by the WAN VAE (tiny, offline)."""

from __future__ import annotations

import shutil
from pathlib import Path

import attrs
import pytest
import torch
from support.cli import cli
from support.pretrained import write_tiny_wan_model_root

from dfm.adapters.diffusers import UMT5TextEncoder, WanVAECodec
from dfm.adapters.memory import InMemoryVideoWriter
from dfm.adapters.video import read_video, to_uint8_frames
from dfm.app.config import ConfigError, resolve_config
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.training import train

PROMPT = "a red cat running on the boat"


def _overrides(run: Path, root: Path) -> list[str]:
    """Mock latents shaped for the tiny VAE (4 channels) and UMT5-wide text (32), 9 x 32 x 16 videos."""
    return [
        f"run.dir={run}",
        "data.source=mock",
        "model.in_channels=4",
        "model.out_channels=4",
        "data.frames=9",
        "data.height=32",
        "data.width=16",
        "sample.frames=9",
        "sample.height=32",
        "sample.width=16",
        "train.max_steps=2",
        "logging.level=WARNING",
        f"codecs.vae={root}",
        f"codecs.text_encoder={root / 'text_encoder'}",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("codecs")
    root = write_tiny_wan_model_root(base / "Wan-Tiny")
    run = base / "run"
    assert train(resolve_config("wan_tiny_t2v", None, _overrides(run, root))).step == 2
    return run, root


def test_the_cli_writes_an_mp4_decoded_by_the_wan_vae(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = trained
    out = tmp_path / "cat.mp4"
    result = cli("generate", "--checkpoint", str(run), "--prompt", PROMPT, "--steps", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(out), str(out.with_suffix(".png"))]
    frames, _ = read_video(out)
    assert frames.shape == (9, 32, 16, 3)  # latents (4, 3, 4, 2): 1 + 4 * 2 frames, 8x the latent size


def test_prompts_go_through_umt5_and_latents_through_the_vae(
    trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    run, root = trained
    seen: dict[str, object] = {}
    decode, encode = WanVAECodec.decode, UMT5TextEncoder.encode

    def spy_decode(self: WanVAECodec, latents: torch.Tensor) -> torch.Tensor:
        seen["latents"], seen["vae"] = latents.clone(), self.identity
        return decode(self, latents)

    def spy_encode(self: UMT5TextEncoder, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        seen["captions"], seen["text"] = list(captions), self.identity
        return encode(self, captions, max_length)

    monkeypatch.setattr(WanVAECodec, "decode", spy_decode)
    monkeypatch.setattr(UMT5TextEncoder, "encode", spy_encode)
    writer = InMemoryVideoWriter()
    generate(
        GenerateRequest(checkpoint=run, prompts=[PROMPT], out=run / "x.mp4", steps=2, progress=False), writer=writer
    )
    (video,) = writer.videos.values()
    latents = seen["latents"]
    assert isinstance(latents, torch.Tensor) and latents.shape == (1, 4, 3, 4, 2)
    assert seen["captions"] == [PROMPT] and str(seen["text"]).startswith("Wan-Tiny/text_encoder@")
    assert str(seen["vae"]).startswith("Wan-Tiny/vae@")
    assert torch.equal(video, to_uint8_frames(WanVAECodec(root).decode(latents)[0]))


def test_moved_codecs_are_named_and_can_be_replaced(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, root = trained
    moved = shutil.copytree(root, tmp_path / "Wan-Tiny")
    saved = root.rename(root.with_name("Wan-Tiny-away"))
    try:
        request = GenerateRequest(checkpoint=run, prompts=[PROMPT], out=tmp_path / "x.mp4", steps=1, progress=False)
        with pytest.raises(ValueError) as info:
            generate(request, writer=InMemoryVideoWriter())
        message = str(info.value)
        assert message.startswith(f"codecs.vae: {root} is not a WAN VAE directory")
        assert message.endswith("(--vae / --text-encoder / --tokenizer replace the codecs recorded in the checkpoint)")
        writer = InMemoryVideoWriter()
        replaced = attrs.evolve(request, vae=str(moved / "vae"), text_encoder=str(moved))
        generate(replaced, writer=writer)
        (video,) = writer.videos.values()
        assert video.shape[:3] == (9, 32, 16)
    finally:
        saved.rename(root)


def test_a_bad_codec_path_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    root = write_tiny_wan_model_root(tmp_path / "Wan-Tiny")
    overrides = _overrides(tmp_path / "run", root)
    with pytest.raises(ConfigError, match=rf"^codecs\.text_encoder: {tmp_path / 'nope'} is not a UMT5 text encoder"):
        train(resolve_config("wan_tiny_t2v", None, [*overrides, f"codecs.text_encoder={tmp_path / 'nope'}"]))
    with pytest.raises(ConfigError, match=r"^codecs\.vae: Wan-Tiny/vae@\w+ has 4 latent channels, but model\.in"):
        train(resolve_config("wan_tiny_t2v", None, [*overrides, "model.in_channels=16", "model.out_channels=16"]))
