"""Classifier-free guidance: one batched forward per step, equal to two separate passes."""

from __future__ import annotations

import pytest
import torch

from dfm.domain.samplers import flow_sigmas, guided, sample_flow_euler, sample_flow_unipc

B, C, S, D = 2, 4, 6, 8
X_SHAPE = (B, C, 3, 4, 4)


class TextConditionedToy:
    """A nonlinear, text-dependent stand-in network that respects the mask; counts forwards and batch sizes."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(D, C, generator=g, dtype=torch.float64)
        self.batches: list[int] = []

    def __call__(
        self, x: torch.Tensor, sigma: float | torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor:
        self.batches.append(x.shape[0])
        mask = torch.ones(text.shape[:2], dtype=torch.bool) if text_mask is None else text_mask.bool()
        pooled = (text * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # [B, D]
        scale = torch.tanh(pooled.double() @ self.w)[:, :, None, None, None]  # [B, C, 1, 1, 1]
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1, 1)
        return (torch.sin(x.double() * (1 + scale)) + sigma * scale).to(x.dtype)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(X_SHAPE, generator=g, dtype=torch.float64)
    text = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    null = torch.randn(1, S, D, generator=g, dtype=torch.float64)
    return x, text, null


def test_guided_is_one_batched_forward_equal_to_two_passes() -> None:
    model = TextConditionedToy()
    x, text, null = _inputs()
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 4:] = False
    null_mask = torch.ones(1, S, dtype=torch.bool)
    denoise = guided(model, text=text, text_mask=mask, null_text=null, null_text_mask=null_mask, scale=5.0)
    out = denoise(x, 0.7)
    assert model.batches == [2 * B]
    cond = model(x, 0.7, text, mask)
    uncond = model(x, 0.7, null.expand(B, -1, -1), null_mask.expand(B, -1))
    torch.testing.assert_close(out, uncond + 5.0 * (cond - uncond), rtol=1e-12, atol=1e-12)


def test_one_forward_per_sampler_step() -> None:
    model = TextConditionedToy()
    x, text, null = _inputs()
    sigmas = flow_sigmas(7, shift=3.0)
    denoise = guided(model, text=text, null_text=null, scale=4.0)
    sample_flow_euler(denoise, x, sigmas)
    assert model.batches == [2 * B] * 7
    model.batches.clear()
    sample_flow_unipc(denoise, x, sigmas)
    assert model.batches == [2 * B] * 7


def test_scale_one_runs_the_conditional_pass_only() -> None:
    model = TextConditionedToy()
    x, text, _ = _inputs()
    out = guided(model, text=text, scale=1.0)(x, 0.4)  # no null text needed
    assert model.batches == [B]
    torch.testing.assert_close(out, model(x, 0.4, text, None))


def test_scale_zero_runs_the_unconditional_pass_only() -> None:
    model = TextConditionedToy()
    x, text, null = _inputs()
    out = guided(model, text=text, null_text=null, scale=0.0)(x, 0.4)
    assert model.batches == [B]
    torch.testing.assert_close(out, model(x, 0.4, null.expand(B, -1, -1), None))


def test_shorter_negative_prompt_is_padded_with_masked_zeros() -> None:
    model = TextConditionedToy()
    x, text, _ = _inputs()
    negative = torch.randn(1, 3, D, dtype=torch.float64)
    out = guided(model, text=text, null_text=negative, scale=3.0)(x, 0.5)
    cond = model(x, 0.5, text, None)
    uncond = model(x, 0.5, negative.expand(B, -1, -1), None)
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), rtol=1e-12, atol=1e-12)


def test_per_sample_sigma_is_doubled_with_the_batch() -> None:
    model = TextConditionedToy()
    x, text, null = _inputs()
    sigma = torch.tensor([0.2, 0.9], dtype=torch.float64)
    out = guided(model, text=text, null_text=null, scale=2.0)(x, sigma)
    cond, uncond = model(x, sigma, text, None), model(x, sigma, null.expand(B, -1, -1), None)
    torch.testing.assert_close(out, uncond + 2.0 * (cond - uncond), rtol=1e-12, atol=1e-12)


def test_missing_or_misshapen_null_text_is_an_error() -> None:
    model = TextConditionedToy()
    _, text, _ = _inputs()
    with pytest.raises(ValueError, match="null_text"):
        guided(model, text=text, scale=5.0)
    with pytest.raises(ValueError, match="null_text must be"):
        guided(model, text=text, null_text=torch.zeros(1, S, D + 1), scale=5.0)
