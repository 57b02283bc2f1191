"""``generate --image`` (and ``--last-image``) on a tiny WAN 2.1 image-to-video model exported to diffusers with its
codecs (WAN VAE, UMT5, CLIP image encoder written offline): the videos, what the image changes, and the errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.pretrained import export_tiny_wan_i2v, write_tiny_clip_image_encoder, write_tiny_wan_model_root

from dfm.adapters.diffusers import WanVAECodec
from dfm.adapters.diffusers.clip_image import CLIPImageEncoder
from dfm.adapters.memory import InMemoryVideoWriter
from dfm.adapters.video.images import load_image
from dfm.app.services.generation import GenerateRequest, generate
from dfm.domain.diffusion.image_condition import condition_channels, condition_pixels, frame_mask
from dfm.domain.networks.wan import WanTransformer

PROMPT = "a red car on a street"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("i2v")
    root = write_tiny_wan_model_root(tmp / "models", seed=0)
    write_tiny_clip_image_encoder(root, seed=3)
    images = {}
    for name, seed, size in (("a", 0, (48, 32)), ("b", 1, (48, 32)), ("wide", 2, (96, 40))):
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        images[name] = tmp / f"{name}.png"
        Image.fromarray(pixels).save(images[name])
    return {
        "root": root,
        "i2v": export_tiny_wan_i2v(root, tmp / "i2v"),
        "flf": export_tiny_wan_i2v(root, tmp / "flf", "model.pos_embed_seq_len=514"),
        **images,
    }


def _video(checkpoint: Path, tmp: Path, **kw) -> torch.Tensor:
    writer = InMemoryVideoWriter()
    generate(GenerateRequest(checkpoint=checkpoint, prompts=[PROMPT], out=tmp / "v.mp4", steps=3, **kw), writer=writer)
    return next(iter(writer.videos.values())).float()


def test_the_first_frame_conditions_the_video(setup: dict[str, Path], tmp_path: Path) -> None:
    a = _video(setup["i2v"], tmp_path, image=setup["a"])
    assert a.shape == (9, 32, 48, 3)
    assert torch.equal(a, _video(setup["i2v"], tmp_path, image=setup["a"]))  # same image and seed: same video
    assert not torch.equal(a, _video(setup["i2v"], tmp_path, image=setup["b"]))
    wide = _video(setup["i2v"], tmp_path, image=setup["wide"])  # 96 x 40: scaled and centre-cropped to 48 x 32
    assert wide.shape == a.shape


def test_the_network_reads_the_pipelines_condition_and_clip_features(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What reaches the network is WanImageToVideoPipeline's input: noisy latents, the frame mask and the VAE
    latents of [first frame, zeros...] along channels, and CLIP's penultimate features of the first frame."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    forward = WanTransformer.forward

    def spy(self, x, timestep, text, text_mask=None, image=None):
        seen.append((x.detach().clone(), image.detach().clone()))
        return forward(self, x, timestep, text, text_mask, image)

    monkeypatch.setattr(WanTransformer, "forward", spy)
    _video(setup["i2v"], tmp_path, image=setup["a"])
    frame = load_image(setup["a"], 32, 48)
    latents = WanVAECodec(setup["root"]).encode(condition_pixels(frame.permute(2, 0, 1)[None].float() / 255 * 2 - 1, 9))
    condition = condition_channels(frame_mask(1, 9, (4, 6), 4), latents)
    features = CLIPImageEncoder(setup["root"]).encode([frame])
    assert len(seen) == 6  # 3 steps x (conditional, unconditional)
    for x, image in seen:
        assert x.shape == (1, 12, 3, 4, 6) and torch.equal(x[:, 4:], condition) and torch.equal(image, features)


def test_first_and_last_frame(setup: dict[str, Path], tmp_path: Path) -> None:
    both = _video(setup["flf"], tmp_path, image=setup["a"], last_image=setup["b"])
    swapped = _video(setup["flf"], tmp_path, image=setup["b"], last_image=setup["a"])
    assert both.shape == (9, 32, 48, 3) and not torch.equal(both, swapped)


def test_images_that_do_not_fit_the_model_are_refused(setup: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is an image-to-video model: pass --image FIRST_FRAME"):
        _video(setup["i2v"], tmp_path)
    with pytest.raises(ValueError, match="is not a first-last-frame model: it takes no --last-image"):
        _video(setup["i2v"], tmp_path, image=setup["a"], last_image=setup["b"])
    with pytest.raises(ValueError, match="is a first-last-frame model: it needs --last-image"):
        _video(setup["flf"], tmp_path, image=setup["a"])
    with pytest.raises(ValueError, match=r"--image: .*nothing\.png does not exist"):
        _video(setup["i2v"], tmp_path, image=tmp_path / "nothing.png")
