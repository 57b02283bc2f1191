"""The eager fused forms of WAN's element-wise steps (complex RoPE, norm + modulation as one layer norm, the gated
residual as one addcmul, GEMM + GELU) compute what the plain formulas compute — the plain ones are what
``torch.compile`` traces, so both paths must agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.networks import tiny_network

import dfm.domain.networks.layers as layers
from dfm.domain.networks.layers import FP32LayerNorm, apply_rope, gated_residual, norm_modulate, rope_3d
from dfm.domain.networks.wan_layers import FeedForward


@pytest.fixture
def plain(monkeypatch: pytest.MonkeyPatch):
    """Run a callable with the fused forms switched off (as under ``torch.compile``)."""

    def run(fn, *args):
        with monkeypatch.context() as m:
            m.setattr(layers, "eager_fusable", lambda x: False)
            return fn(*args)

    return run


def _heads(g: torch.Generator, dtype: torch.dtype, tokens: int = 30, heads: int = 3, dim: int = 16) -> torch.Tensor:
    """``[B, H, L, D]`` as attention makes it: a transposed view of ``[B, L, H * D]``."""
    return torch.randn(2, tokens, heads * dim, generator=g).to(dtype).unflatten(2, (heads, dim)).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_complex_rope_equals_the_real_formula(plain, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x = _heads(g, dtype)
    cos, sin = rope_3d(16, (2, 3, 5))
    fused, reference = apply_rope(x, cos, sin), plain(apply_rope, x, cos, sin)
    assert fused.dtype == dtype and fused.shape == x.shape
    assert fused.stride() == x.stride()  # the layout is kept, so attention's output stays a view of [B, L, H * D]
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(fused.float(), reference.float(), rtol=tol, atol=tol)


def test_rope_of_a_tensor_not_viewable_as_complex_takes_the_real_formula(plain) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 30, 17, generator=g)[..., 1:]  # odd storage offset: no in-place complex view
    cos, sin = rope_3d(16, (2, 3, 5))
    assert not layers._complex_viewable(x.unflatten(-1, (-1, 2)))
    torch.testing.assert_close(apply_rope(x, cos, sin), plain(apply_rope, x, cos, sin), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_shared_modulation_as_one_layer_norm(plain, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    norm = FP32LayerNorm(24, 1e-6, elementwise_affine=False)
    x = torch.randn(2, 10, 24, generator=g).to(dtype)
    shift, scale = torch.randn(1, 1, 24, generator=g), torch.randn(1, 1, 24, generator=g)
    fused, reference = norm_modulate(norm, x, shift, scale), plain(norm_modulate, norm, x, shift, scale)
    assert fused.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(fused.float(), reference.float(), rtol=tol, atol=tol)
    per_sample = torch.randn(2, 1, 24, generator=g)  # a modulation per sample keeps the plain formula
    torch.testing.assert_close(
        norm_modulate(norm, x, per_sample, scale), plain(norm_modulate, norm, x, per_sample, scale)
    )


def test_norm_modulate_gradients_equal_the_plain_formula(plain) -> None:
    g = torch.Generator().manual_seed(3)
    norm = FP32LayerNorm(24, 1e-6, elementwise_affine=False)
    x0, s0, c0 = (
        torch.randn(1, 10, 24, generator=g),
        torch.randn(1, 1, 24, generator=g),
        torch.randn(1, 1, 24, generator=g),
    )

    def grads(run) -> list[torch.Tensor]:
        x, shift, scale = (t.clone().requires_grad_() for t in (x0, s0, c0))
        (run(norm_modulate, norm, x, shift, scale) ** 2).sum().backward()
        return [x.grad, shift.grad, scale.grad]

    for fused, reference in zip(grads(lambda fn, *a: fn(*a)), grads(plain), strict=True):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_residual_without_autograd_equals_the_plain_formula(plain, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 10, 24, generator=g).to(dtype), torch.randn(2, 10, 24, generator=g).to(dtype)
    gate = torch.randn(2, 1, 24, generator=g)
    with torch.no_grad():
        fused = gated_residual(x, y, gate)
    assert fused.dtype == dtype
    reference = plain(gated_residual, x, y, gate)
    tol = 1e-6 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(fused.float(), reference.float(), rtol=tol, atol=tol)


def test_wan_forward_with_fused_forms_equals_the_plain_forward(plain) -> None:
    model = tiny_network("wan").eval()
    spec, g = model.spec, torch.Generator().manual_seed(5)
    x = torch.randn(1, spec.in_channels, 3, 4, 6, generator=g)
    t, text = torch.tensor([321.0]), torch.randn(1, 7, spec.text_dim, generator=g)
    with torch.no_grad():
        fused, reference = model(x, t, text), plain(model, x, t, text)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gelu_epilogue_on_cuda_equals_linear_then_tanh_gelu() -> None:
    ffn = FeedForward(64, 256).to("cuda", torch.bfloat16)
    x = torch.randn(1, 300, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert ffn._gelu_epilogue(x, ffn.net[0].proj)
        fused = ffn(x)
        reference = ffn.net[2](F.gelu(ffn.net[0].proj(x), approximate="tanh"))
    torch.testing.assert_close(fused.float(), reference.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # compiled blocks call the same fused op (inductor falls back to it)
        compiled = torch.compile(ffn)(x)
    torch.testing.assert_close(compiled.float(), reference.float(), rtol=2e-2, atol=2e-2)
