"""``SDPAAttention("auto")`` on CUDA: cuDNN first where it serves the call, another kernel where it cannot."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

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
