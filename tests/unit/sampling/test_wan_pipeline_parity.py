"""dfm's flow sampling against diffusers' ``WanPipeline`` itself (issue 12, "faithful to the reference").

The same tiny WAN weights (dfm's ``WanTransformer`` and diffusers' ``WanTransformer3DModel`` share one state
dict), the same initial noise and the same prompt embeddings, zero-padded to the text length as
``WanPipeline._get_t5_prompt_embeds`` leaves them: with ``mask_text_padding`` off (how WAN 2.1 was trained)
``sample_latents`` gives the pipeline's latents (``output_type="latent"``, so no VAE or text encoder is
needed), with UniPC and flow Euler, with and without classifier-free guidance against a negative prompt.
"""

from __future__ import annotations

import attrs
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from support.errors import max_rel
from support.networks import tiny_network

from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.sampling import sample_latents
from dfm.domain.specs import WAN_TINY, WanSpec

TEXT_LEN = 16
LATENT = (4, 3, 4, 6)  # [C, F, H, W]: 9 frames of 32 x 48 pixels for the pipeline
TOL = 1e-5


def _transformers() -> tuple[WanTransformer, WanTransformer3DModel]:
    ours = tiny_network("wan").eval()
    config = {f.name: getattr(WAN_TINY, f.name) for f in attrs.fields(WanSpec) if f.name != "arch"}
    theirs = WanTransformer3DModel(**config).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _prompt_embeds(lengths: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of ``len(lengths)`` prompts, zero after each one's real tokens, and their mask."""
    text = torch.randn(len(lengths), TEXT_LEN, WAN_TINY.text_dim, generator=g)
    mask = torch.arange(TEXT_LEN)[None, :] < torch.tensor(lengths)[:, None]
    return text * mask[..., None], mask


def _scheduler(sampler: str, shift: float) -> UniPCMultistepScheduler | FlowMatchEulerDiscreteScheduler:
    if sampler == "unipc":  # WAN 2.1's sampler, as its diffusers repositories configure it
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def _pipeline_latents(theirs: WanTransformer3DModel, sampler: str, shift: float, steps: int, **kw) -> torch.Tensor:
    pipe = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=_scheduler(sampler, shift), transformer=theirs
    )
    pipe.set_progress_bar_config(disable=True)
    _, frames, height, width = LATENT
    with torch.no_grad():
        out = pipe(
            num_inference_steps=steps,
            num_frames=4 * (frames - 1) + 1,
            height=8 * height,
            width=8 * width,
            output_type="latent",
            **kw,
        )
    return out.frames


CASES = [
    pytest.param("unipc", 1.0, 3.0, [5], id="unipc-no-cfg"),
    pytest.param("unipc", 5.0, 3.0, [5], id="unipc-cfg5"),
    pytest.param("unipc", 5.0, 5.0, [5, 11], id="unipc-cfg5-shift5-two-prompts"),
    pytest.param("flow_euler", 1.0, 3.0, [5], id="euler-no-cfg"),
    pytest.param("flow_euler", 5.0, 5.0, [5, 11], id="euler-cfg5-two-prompts"),
]


@pytest.mark.parametrize(("sampler", "guidance", "shift", "lengths"), CASES)
def test_latents_equal_wan_pipelines(sampler: str, guidance: float, shift: float, lengths: list[int]) -> None:
    ours, theirs = _transformers()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(len(lengths), *LATENT, generator=g)
    text, mask = _prompt_embeds(lengths, g)
    negative, negative_mask = _prompt_embeds([3] * len(lengths), g)  # a negative prompt of 3 tokens
    steps = 10
    want = _pipeline_latents(
        theirs,
        sampler,
        shift,
        steps,
        prompt_embeds=text,
        negative_prompt_embeds=negative if guidance > 1 else None,
        latents=noise.clone(),
        guidance_scale=guidance,
    )
    with torch.no_grad():
        got = sample_latents(
            ours,
            FlowMatching(shift=shift, mask_text_padding=False),
            noise.clone(),
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            text=text,
            text_mask=mask,
            null_text=negative,
            null_text_mask=negative_mask,
        )
    assert got.shape == want.shape == noise.shape
    assert max_rel(got, want) <= TOL
    assert max_rel(noise, want) > 0.1  # the sampler did move the noise


def test_masking_the_padding_is_another_model_and_equals_the_trimmed_text() -> None:
    """mask_text_padding on: the padding is ignored, so the latents are those of the unpadded prompt; they
    are not WanPipeline's, which attends to the zero padding."""
    ours, theirs = _transformers()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, *LATENT, generator=g)
    text, mask = _prompt_embeds([2], g)  # 14 padding tokens
    kw = {"sampler": "unipc", "steps": 6, "guidance": 1.0}
    with torch.no_grad():
        masked = sample_latents(ours, FlowMatching(shift=3.0), noise, text=text, text_mask=mask, **kw)
        trimmed = sample_latents(ours, FlowMatching(shift=3.0, mask_text_padding=False), noise, text=text[:, :2], **kw)
        attended = sample_latents(ours, FlowMatching(shift=3.0, mask_text_padding=False), noise, text=text, **kw)
    want = _pipeline_latents(theirs, "unipc", 3.0, 6, prompt_embeds=text, latents=noise.clone(), guidance_scale=1.0)
    assert max_rel(masked, trimmed) <= TOL
    assert max_rel(attended, want) <= TOL
    assert max_rel(masked, want) > 50 * TOL  # 9.6e-4 with this tiny random network
