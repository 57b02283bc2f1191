"""The training objective: closed forms, per-sample determinism (DESIGN.md rule 2), CFG dropout, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfm.domain.batch import Batch
from dfm.domain.diffusion.conditioning import drop_text
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching, interpolate
from dfm.domain.objective import DiffusionProcess, LossOutput, training_loss
from dfm.domain.rng import SampleRNG, Stream

C, S, D = 3, 5, 8
PROCESSES: dict[str, DiffusionProcess] = {
    "flow": FlowMatching(density="logit_normal", shift=3.0, loss_weighting="shift", text_dropout=0.3),
    "edm": EDM(text_dropout=0.3),
}


class ChannelLinear(nn.Module):
    """A tiny conditional network: a linear map over channels plus time and pooled-text biases."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = nn.Parameter(torch.eye(C) + 0.1 * torch.randn(C, C, generator=g))
        self.text_proj = nn.Parameter(0.1 * torch.randn(D, C, generator=g))
        self.time_scale = nn.Parameter(torch.tensor(0.01))

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        mask = torch.ones(text.shape[:2], dtype=torch.bool) if text_mask is None else text_mask
        text = text.to(self.mix.dtype)  # like a real network, cast inputs to the parameters' dtype
        pooled = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        bias = pooled @ self.text_proj + self.time_scale * timestep[:, None]
        return torch.einsum("oc,bcfhw->bofhw", self.mix, x) + bias[:, :, None, None, None]


class Recorder:
    """Records the network's inputs and returns zeros."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(
        self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        self.calls.append((x, timestep, text, text_mask))
        return torch.zeros_like(x)


def make_batch(b: int = 6, start: int = 100, dtype: torch.dtype = torch.float32) -> Batch:
    g = torch.Generator().manual_seed(1)
    text_mask = torch.arange(S)[None, :] < torch.randint(1, S + 1, (b, 1), generator=g)
    return Batch(
        latents=torch.randn(b, C, 2, 4, 4, generator=g).to(dtype),
        text=torch.randn(b, S, D, generator=g).to(dtype) + 1.0,
        sample_index=torch.arange(start, start + b),
        text_mask=text_mask,
    )


def split(batch: Batch, parts: list[torch.Tensor]) -> list[Batch]:
    assert batch.text_mask is not None
    return [
        Batch(
            latents=batch.latents[p],
            text=batch.text[p],
            sample_index=batch.sample_index[p],
            text_mask=batch.text_mask[p],
        )
        for p in parts
    ]


def test_processes_satisfy_the_protocol() -> None:
    assert isinstance(FlowMatching(), DiffusionProcess)
    assert isinstance(EDM(), DiffusionProcess)


def test_flow_loss_closed_form_with_a_zero_network() -> None:
    fm, batch, rng = (
        FlowMatching(loss_weighting="shift", shift=2.0, text_dropout=0.0),
        make_batch(),
        SampleRNG(seed=0, step=4),
    )
    recorder = Recorder()
    out = training_loss(recorder, batch, fm, rng)
    eps = rng.randn(batch.sample_index, batch.latents.shape[1:], Stream.NOISE)
    sigma = fm.draw_sigma(rng, batch.sample_index)
    x, t, text, mask = recorder.calls[0]
    torch.testing.assert_close(x, interpolate(batch.latents, eps, sigma))  # full-shape per-sample NOISE stream
    torch.testing.assert_close(t, sigma * 1000)
    assert torch.equal(text, batch.text) and mask is batch.text_mask
    expected = (1 + 2.0 * sigma) * (eps - batch.latents).square().flatten(1).mean(1)
    torch.testing.assert_close(out.per_sample, expected)
    torch.testing.assert_close(out.loss, expected.mean())
    torch.testing.assert_close(out.metrics["mse"], (eps - batch.latents).square().mean())
    torch.testing.assert_close(out.metrics["sigma_mean"], sigma.mean())
    assert out.metrics["text_dropped"].item() == 0.0


def test_edm_loss_closed_form_with_a_zero_network() -> None:
    edm, batch, rng = EDM(sigma_data=0.5, text_dropout=0.0), make_batch(), SampleRNG(seed=2, step=1)
    recorder = Recorder()
    out = training_loss(recorder, batch, edm, rng)
    n = rng.randn(batch.sample_index, batch.latents.shape[1:], Stream.NOISE)
    sigma = edm.draw_sigma(rng, batch.sample_index)
    s = sigma.view(-1, 1, 1, 1, 1)
    x = batch.latents + s * n
    torch.testing.assert_close(recorder.calls[0][0], x / (s**2 + 0.25).sqrt())
    torch.testing.assert_close(recorder.calls[0][1], sigma.log() / 4)
    denoised = 0.25 / (s**2 + 0.25) * x  # D = c_skip x with F = 0
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(out.per_sample, lam * (denoised - batch.latents).square().flatten(1).mean(1))


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_same_key_same_loss_other_step_other_loss(name: str) -> None:
    process, batch, net = PROCESSES[name], make_batch(), ChannelLinear()
    a = training_loss(net, batch, process, SampleRNG(seed=5, step=7))
    b = training_loss(net, batch, process, SampleRNG(seed=5, step=7))
    c = training_loss(net, batch, process, SampleRNG(seed=5, step=8))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.per_sample, b.per_sample)
    assert not torch.equal(a.per_sample, c.per_sample)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_any_split_of_the_batch_gives_the_same_per_sample_losses(name: str) -> None:
    process, batch, net, rng = PROCESSES[name], make_batch(b=8), ChannelLinear(), SampleRNG(seed=5, step=7)
    whole = training_loss(net, batch, process, rng).per_sample
    halves = [
        training_loss(net, part, process, rng).per_sample
        for part in split(batch, [torch.arange(4), torch.arange(4, 8)])
    ]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-6, atol=0)
    perm = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    permuted = training_loss(net, split(batch, [perm])[0], process, rng).per_sample
    torch.testing.assert_close(permuted, whole[perm], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_gradient_flows_to_every_parameter(name: str) -> None:
    net = ChannelLinear()
    out = training_loss(net, make_batch(), PROCESSES[name], SampleRNG(seed=0, step=0))
    assert out.loss.ndim == 0 and out.loss.dtype == torch.float32 and out.per_sample.shape == (6,)
    out.loss.backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0, pname
    assert all(not m.requires_grad for m in out.metrics.values())


def test_bf16_latents_give_a_float32_loss() -> None:
    out = training_loss(ChannelLinear(), make_batch(dtype=torch.bfloat16), PROCESSES["flow"], SampleRNG(seed=0, step=0))
    assert isinstance(out, LossOutput) and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)


def test_wrong_network_output_shape_is_an_actionable_error() -> None:
    bad = lambda x, t, text, mask: x[:, :1]
    with pytest.raises(ValueError, match="out_channels"):
        training_loss(bad, make_batch(), FlowMatching(), SampleRNG(seed=0, step=0))


def test_cfg_dropout_rate_matches_the_configuration() -> None:
    p, n = 0.3, 4000
    text = torch.randn(n, 2, 3) + 5.0
    new_text, keep = drop_text(text, p, SampleRNG(seed=9, step=2), torch.arange(n))
    dropped = (~keep).double().mean().item()
    assert abs(dropped - p) < 3 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(new_text[keep], text[keep])
    assert bool((new_text[~keep] == 0).all())


def test_cfg_dropout_edge_probabilities_and_objective_wiring() -> None:
    text, rng, idx = torch.ones(50, 2, 3), SampleRNG(seed=1, step=1), torch.arange(50)
    assert bool(drop_text(text, 0.0, rng, idx)[1].all())
    assert not bool(drop_text(text, 1.0, rng, idx)[1].any())
    batch, recorder = make_batch(b=40), Recorder()
    out = training_loss(recorder, batch, FlowMatching(text_dropout=0.5), rng)
    seen_text, seen_mask = recorder.calls[0][2], recorder.calls[0][3]
    dropped = seen_text.flatten(1).abs().sum(1) == 0
    assert 0 < int(dropped.sum()) < 40
    assert out.metrics["text_dropped"].item() == pytest.approx(dropped.double().mean().item())
    assert seen_mask is batch.text_mask  # the mask is kept for dropped samples (see drop_text)
    _, keep = drop_text(batch.text, 0.5, rng, batch.sample_index)
    assert torch.equal(keep, ~dropped)
