"""sample_latents: network + process + named sampler, against the samplers called by hand."""

from __future__ import annotations

import pytest
import torch

from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.samplers import sample_edm_heun, sample_flow_unipc
from dfm.domain.samplers.schedules import flow_sigmas, karras_sigmas
from dfm.domain.sampling import sample_latents


class TextShift(torch.nn.Module):
    """A network whose output depends on x, the timestep and the pooled text (enough to test the wiring)."""

    def forward(self, x, timestep, text, text_mask=None):
        pooled = text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return 0.5 * x + 1e-3 * timestep.view(-1, 1, 1, 1, 1) + pooled


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 2, 4, 4, generator=g), torch.randn(1, 5, 8, generator=g)


def test_flow_unipc_with_guidance_equals_the_hand_wired_sampler() -> None:
    noise, text = _inputs()
    net, flow = TextShift(), FlowMatching(shift=3.0)
    got = sample_latents(net, flow, noise, sampler="unipc", steps=6, guidance=4.0, text=text)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((1,), sigma * 1000.0)
        cond, uncond = net(x, t, text), net(x, t, torch.zeros_like(text))
        return uncond + 4.0 * (cond - uncond)

    want = sample_flow_unipc(velocity, noise, flow_sigmas(6, shift=3.0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_edm_heun_starts_from_sigma_max_noise_and_uses_the_preconditioned_denoiser() -> None:
    noise, text = _inputs()
    net, edm = TextShift(), EDM()
    got = sample_latents(net, edm, noise, sampler="edm_heun", steps=5, guidance=1.0, text=text)
    sigmas = karras_sigmas(5, sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, rho=edm.rho)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return edm.denoise(net, x, torch.full((1,), float(sigma)), text, None)

    torch.testing.assert_close(got, sample_edm_heun(denoise, noise * sigmas[0], sigmas), rtol=1e-5, atol=1e-6)


def test_a_sampler_of_the_other_process_is_refused() -> None:
    noise, text = _inputs()
    with pytest.raises(ValueError, match="does not fit a flow-matching model"):
        sample_latents(TextShift(), FlowMatching(), noise, sampler="edm_heun", steps=2, guidance=1.0, text=text)
    with pytest.raises(ValueError, match="does not fit an EDM model"):
        sample_latents(TextShift(), EDM(), noise, sampler="unipc", steps=2, guidance=1.0, text=text)
