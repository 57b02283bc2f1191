"""sample_latents: network + process + named sampler, against the samplers called by hand."""

from __future__ import annotations

import pytest
import torch

from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.samplers import sample_edm_heun, sample_flow_unipc
from dfm.domain.samplers.schedules import flow_euler_timesteps, flow_sigmas, flow_timesteps, karras_sigmas
from dfm.domain.sampling import sample_latents, scheduler_time


class TextShift(torch.nn.Module):
    """A network whose output depends on x, the timestep and the pooled text (enough to test the wiring)."""

    def forward(self, x, timestep, text, text_mask=None):
        pooled = text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return 0.5 * x + 1e-3 * timestep.view(-1, 1, 1, 1, 1) + pooled


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 2, 4, 4, generator=g), torch.randn(1, 5, 8, generator=g)


def test_flow_unipc_with_guidance_equals_the_hand_wired_sampler() -> None:
    """The network runs at UniPC's integer times floor(sigma_i T) (diffusers' timesteps), not at sigma_i T."""
    noise, text = _inputs()
    net, flow = TextShift(), FlowMatching(shift=3.0)
    got = sample_latents(net, flow, noise, sampler="unipc", steps=6, guidance=4.0, text=text)
    sigmas, times = flow_sigmas(6, shift=3.0), flow_timesteps(6, shift=3.0)
    time_of = dict(zip(sigmas.tolist(), times.tolist(), strict=False))

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.full((1,), float(time_of[sigma]))
        cond, uncond = net(x, t, text), net(x, t, torch.zeros_like(text))
        return uncond + 4.0 * (cond - uncond)

    want = sample_flow_unipc(velocity, noise, sigmas)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class TimeRecorder(torch.nn.Module):
    """Records the time input of every call; predicts a fixed velocity."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[torch.Tensor] = []

    def forward(self, x, timestep, text, text_mask=None):
        self.times.append(timestep.clone())
        return 0.1 * x


@pytest.mark.parametrize(
    ("sampler", "expected"),
    [("unipc", flow_timesteps(7, shift=5.0).float()), ("flow_euler", flow_euler_timesteps(7, shift=5.0))],
)
def test_the_network_sees_its_schedulers_times(sampler: str, expected: torch.Tensor) -> None:
    """UniPC: int64 floor(sigma T) from the float64 levels; flow Euler: float32 sigma T (diffusers' set_timesteps)."""
    noise, text = _inputs()
    net = TimeRecorder()
    sample_latents(net, FlowMatching(shift=1.0), noise, sampler=sampler, steps=7, guidance=2.0, text=text, shift=5.0)
    assert [t.shape for t in net.times] == [(2,)] * 7  # conditional and unconditional pass in one batch
    assert torch.equal(torch.stack([t[0] for t in net.times]), expected)
    assert all(torch.equal(t[0], t[1]) for t in net.times)


def test_unipc_times_are_truncated_from_the_float64_levels() -> None:
    """shift 1, 9 steps: sigma_i T = 1000 - 111 i exactly; in float64 some fall just below the integer and
    truncate one lower than float32(sigma_i) T would, which is why the times come from a table."""
    sigmas, times = flow_sigmas(9), flow_timesteps(9)
    naive = (sigmas[:-1] * 1000).to(torch.int64)
    assert not torch.equal(naive, times)
    time_of = scheduler_time(sigmas, times)
    assert [time_of(s) for s in sigmas[:-1].tolist()] == times.tolist()
    assert torch.equal(time_of(sigmas[[3, 1]]), times[[3, 1]])


def test_scheduler_time_refuses_levels_off_the_schedule_and_a_wrong_length() -> None:
    sigmas, times = flow_sigmas(4, shift=3.0), flow_timesteps(4, shift=3.0)
    with pytest.raises(ValueError, match=r"^sigma=0\.5 is not a level of the sampling schedule \[0\.99"):
        scheduler_time(sigmas, times)(0.5)
    with pytest.raises(ValueError, match=r"^need one timestep per step: 4, got shape \(5,\)$"):
        scheduler_time(sigmas, torch.zeros(5))


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
