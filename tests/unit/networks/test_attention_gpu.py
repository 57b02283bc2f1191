"""``SDPAAttention("auto")`` on CUDA: cuDNN first where it serves the call, another kernel where it cannot."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dfm.adapters.kernels import activate_flash_attention_4
from dfm.domain.networks.attention import SDPAAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _kernels(fn) -> list[str]:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name.lower() for e in prof.events() if e.device_type.name == "CUDA"]


def _qkv(length: int = 512) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(torch.randn(1, 4, length, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="cuDNN SDPA: Hopper or newer"
)
def test_auto_runs_cudnn_on_hopper_and_matches_the_math_kernel() -> None:
    q, k, v = _qkv()
    names = _kernels(lambda: SDPAAttention("auto")(q, k, v))
    # cuDNN's own kernels are named like "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_..."; torch's own
    # order would run its flash-attention kernel instead ("pytorch_flash::flash_fwd_kernel...")
    assert any("cudnn" in n for n in names), names
    assert not any("flash" in n and "cudnn" not in n for n in names), names
    expected = SDPAAttention("math")(q.float(), k.float(), v.float())
    got = SDPAAttention("auto")(q, k, v).float()
    assert (got - expected).abs().max().item() < 2e-2


def test_auto_falls_back_where_cudnn_cannot_serve_the_call() -> None:
    q, k, v = (t.float() for t in _qkv(64))  # fp32: cuDNN attention takes half precision only
    mask = torch.rand(1, 1, 64, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)) > 0.3
    got = SDPAAttention("auto")(q, k, v, mask)
    expected = SDPAAttention("math")(q, k, v, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10), reason="FA4: SM90/SM100"
)
def test_fa4_runs_flash_attention_4_in_eager_and_compiled_code() -> None:
    pytest.importorskip("flash_attn.cute", reason="needs the flash-attn-4 package")
    activate_flash_attention_4()
    # WAN's [B, L, H, D] views, the batch's stride 0 as compiled graphs give it (torch then allocates FA4's output
    # with that stride, which FA4 itself refuses)
    q, k, v = (
        torch.empty_strided((1, 1024, 4, 128), (0, 512, 128, 1), device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    for dense, t in zip(_qkv(1024), (q, k, v), strict=True):
        t.copy_(dense.transpose(1, 2))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    kernel = SDPAAttention("fa4")
    names = _kernels(lambda: kernel(q, k, v))
    assert not any("cudnn" in n or "pytorch_flash" in n for n in names), names
    expected = SDPAAttention("math")(q.float(), k.float(), v.float())
    assert (kernel(q, k, v).float() - expected).abs().max().item() < 2e-2
    compiled = torch.compile(lambda a, b, c: kernel(a, b, c) * 2.0, fullgraph=True)
    assert (compiled(q, k, v).float() / 2.0 - expected).abs().max().item() < 2e-2
    q.requires_grad_(True)
    grad = torch.autograd.grad(kernel(q, k, v).float().square().sum(), q)[0]
    q32 = q.detach().float().requires_grad_(True)
    grad_ref = torch.autograd.grad(SDPAAttention("math")(q32, k.float(), v.float()).square().sum(), q32)[0]
    assert (grad.float() - grad_ref).norm() / grad_ref.norm() < 2e-2
