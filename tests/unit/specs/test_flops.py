"""The analytic FLOP count of DESIGN.md against torch's FlopCounterMode on real tiny networks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.dit import DiT
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import DiTSpec, WanSpec, forward_flops, num_tokens, training_flops

WAN = WanSpec(
    num_attention_heads=4,
    attention_head_dim=16,
    ffn_dim=256,
    num_layers=2,
    text_dim=48,
    freq_dim=32,
    in_channels=4,
    out_channels=4,
)
DIT = DiTSpec(
    num_attention_heads=4,
    attention_head_dim=18,
    ffn_dim=288,
    num_layers=2,
    text_dim=48,
    freq_dim=32,
    in_channels=4,
    out_channels=4,
)
LATENT = (4, 3, 8, 12)  # C, F, H, W -> L = 3 * 4 * 6 = 72 tokens
TEXT_LEN = 20


def _count(model: torch.nn.Module, *, backward: bool) -> int:
    torch.manual_seed(0)
    c, f, h, w = LATENT
    x = torch.randn(2, c, f, h, w)
    t = torch.rand(2)
    text = torch.randn(2, TEXT_LEN, 48)
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, text)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops() // 2  # per sample


@pytest.mark.parametrize("net_cls,spec", [(WanTransformer, WAN), (DiT, DIT)], ids=["wan", "dit"])
def test_analytic_flops_match_flop_counter(net_cls: type, spec: WanSpec | DiTSpec) -> None:
    model = net_cls(spec, attention=SDPAAttention("math"))
    L = num_tokens(spec, *LATENT[1:])
    assert L == 72
    measured_fwd = _count(model, backward=False)
    analytic_fwd = forward_flops(spec, L, TEXT_LEN)
    assert abs(analytic_fwd - measured_fwd) / measured_fwd < 0.05, (analytic_fwd, measured_fwd)
    measured_train = _count(model, backward=True)
    analytic_train = training_flops(spec, L, TEXT_LEN)
    assert abs(analytic_train - measured_train) / measured_train < 0.05, (analytic_train, measured_train)


def test_wan_1_3b_flops_at_the_benchmark_shape() -> None:
    """81 x 480 x 832 -> 21 x 60 x 104 latent -> 32,760 tokens; ~3x forward FLOPs per sample."""
    from dfm.domain.specs import WAN_1_3B, LatentSpec

    c, f, h, w = LatentSpec().latent_shape(81, 480, 832)
    assert (c, f, h, w) == (16, 21, 60, 104)
    L = num_tokens(WAN_1_3B, f, h, w)
    assert L == 32760
    per_layer = 12 * L * 1536**2 + 4 * L * 1536 * 8960 + 4 * 512 * 1536**2 + 4 * L**2 * 1536 + 4 * L * 512 * 1536
    assert forward_flops(WAN_1_3B, L, 512) == pytest.approx(30 * per_layer, rel=0.01)
