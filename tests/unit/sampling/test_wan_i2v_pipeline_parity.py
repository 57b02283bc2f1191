"""dfm's image-to-video sampling against diffusers' ``WanImageToVideoPipeline`` itself.

The same tiny WAN I2V weights, VAE and CLIP image encoder (written offline), the same first (and last) frame,
noise and prompt embeddings: the condition latents and frame mask (:mod:`dfm.domain.diffusion.image_condition`),
the CLIP features (:class:`~dfm.adapters.diffusers.clip_image.CLIPImageEncoder`) and ``sample_latents`` over
:class:`~dfm.domain.diffusion.image_condition.ImageConditioned` give the pipeline's latents, with guidance.
"""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from PIL import Image
from support.errors import max_rel
from support.pretrained import TINY_CLIP_DIM, TINY_VAE_Z_DIM, write_tiny_clip_image_encoder, write_tiny_wan_vae
from transformers import CLIPImageProcessor, CLIPVisionModel

from dfm.adapters.diffusers import WanVAECodec
from dfm.adapters.diffusers.clip_image import CLIPImageEncoder
from dfm.adapters.diffusers.wan_weights import spec_to_config
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.diffusion.image_condition import ImageConditioned, condition_channels, condition_pixels, frame_mask
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.sampling import sample_latents
from dfm.domain.specs import WAN_TINY

TEXT_LEN = 512  # WanAttnProcessor takes the last 512 context rows as the text
FRAMES, HEIGHT, WIDTH = 9, 32, 48
Z = TINY_VAE_Z_DIM
SPEC = attrs.evolve(
    WAN_TINY, in_channels=2 * Z + 4, out_channels=Z, image_dim=TINY_CLIP_DIM, added_kv_proj_dim=WAN_TINY.hidden_size
)
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("i2v")
    vae_dir = write_tiny_wan_vae(root / "vae", seed=3)
    write_tiny_clip_image_encoder(root, seed=4)
    ours = WanTransformer(SPEC, generator=torch.Generator().manual_seed(5)).eval()
    with torch.no_grad():  # every path carries signal (the init zeroes the output projection)
        ours.proj_out.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(6))
    config = {k: v for k, v in spec_to_config(SPEC).items() if not k.startswith("_")}
    theirs = WanTransformer3DModel(**config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return {"root": root, "vae_dir": vae_dir, "ours": ours, "theirs": theirs}


def _frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)


def _pixels(frame: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> ``[1, 3, H, W]`` in [-1, 1], as diffusers' video processor normalises."""
    return torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255 * 2 - 1


@pytest.mark.parametrize("guidance", [1.0, 5.0], ids=["no-cfg", "cfg5"])
def test_latents_equal_wan_image_to_video_pipelines(models: dict, guidance: float) -> None:
    g = torch.Generator().manual_seed(0)
    latent_frames = (FRAMES - 1) // 4 + 1
    noise = torch.randn(1, Z, latent_frames, HEIGHT // 8, WIDTH // 8, generator=g)
    text = torch.randn(1, TEXT_LEN, SPEC.text_dim, generator=g)
    negative = torch.randn(1, TEXT_LEN, SPEC.text_dim, generator=g)
    frame = _frame(1)
    root = models["root"]
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=AutoencoderKLWan.from_pretrained(models["vae_dir"]),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
        image_processor=CLIPImageProcessor.from_pretrained(root / "image_processor"),
        image_encoder=CLIPVisionModel.from_pretrained(root / "image_encoder"),
        transformer=models["theirs"],
    )
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(
            image=Image.fromarray(frame),
            prompt_embeds=text,
            negative_prompt_embeds=negative if guidance > 1 else None,
            height=HEIGHT,
            width=WIDTH,
            num_frames=FRAMES,
            num_inference_steps=4,
            guidance_scale=guidance,
            latents=noise.clone(),
            output_type="latent",
        ).frames

    codec = WanVAECodec(models["vae_dir"])
    features = CLIPImageEncoder(root).encode([torch.from_numpy(frame)])
    assert features.shape == (1, 257, TINY_CLIP_DIM)
    latents = codec.encode(condition_pixels(_pixels(frame), FRAMES))
    condition = condition_channels(frame_mask(1, FRAMES, latents.shape[-2:], 4), latents)
    model = ImageConditioned(models["ours"], condition, features)
    with torch.no_grad():
        got = sample_latents(
            model,
            FlowMatching(shift=3.0, mask_text_padding=False),
            noise.clone(),
            sampler="unipc",
            steps=4,
            guidance=guidance,
            text=text,
            null_text=negative,
        )
    assert got.shape == want.shape == noise.shape
    assert max_rel(got, want) <= TOL, max_rel(got, want)
    assert max_rel(noise, want) > 0.1


def test_the_frame_mask_and_condition_video_are_the_pipelines() -> None:
    first, last = torch.ones(2, 3, 4, 4), -torch.ones(2, 3, 4, 4)
    video = condition_pixels(first, 9, last)
    assert video.shape == (2, 3, 9, 4, 4) and video[:, :, 0].eq(1).all() and video[:, :, -1].eq(-1).all()
    assert video[:, :, 1:-1].eq(0).all()
    mask = frame_mask(2, 9, (2, 3), 4)
    assert mask.shape == (2, 4, 3, 2, 3) and mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()
    both = frame_mask(1, 9, (2, 3), 4, last=True)  # pixel frame 8 is the last of latent frame 2's four
    assert both[0, :, 2, 0, 0].tolist() == [0, 0, 0, 1] and both[:, :, 1].eq(0).all()
    with pytest.raises(ValueError, match="a last frame needs"):
        condition_pixels(first, 9, torch.ones(1, 3, 4, 4))
