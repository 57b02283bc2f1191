"""The stage protocol: WAN and DiT declare it, and a ``StageCarry`` survives its trip between pipeline stages."""

from __future__ import annotations

import pytest
import torch
from support.networks import tiny_network

from dfm.domain.networks.layers import token_positions
from dfm.domain.networks.stages import StageCarry, StagedNetwork


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_a_carry_packs_and_unpacks_into_the_blocks_inputs(kind: str) -> None:
    network = tiny_network(kind)
    assert isinstance(network, StagedNetwork)
    spec, g = network.spec, torch.Generator().manual_seed(0)
    x = torch.randn(2, spec.in_channels, 2, 8, 8, generator=g)
    text, mask = torch.randn(2, 5, spec.text_dim, generator=g), torch.arange(5)[None] < torch.tensor([[3], [5]])
    with torch.no_grad():
        inputs = network.embed(x, torch.tensor([10.0, 500.0]), text, mask)
        tokens = network.run_blocks(inputs.tokens, inputs)
    packed = StageCarry.of(network, tokens, inputs).pack()
    carry = StageCarry.unpack(network, packed, tokens.shape[1], text_len=5)
    rebuilt = carry.inputs(network, token_positions(x.shape, spec.patch_size, spec.attention_head_dim, mask, x.device))
    assert type(rebuilt) is type(inputs) and torch.equal(carry.tokens, tokens)
    for name, value in inputs._asdict().items():
        if name == "tokens":
            continue
        got = getattr(rebuilt, name)
        if isinstance(value, torch.Tensor):
            assert torch.equal(got, value), name
        elif name == "rope":
            assert all(torch.equal(a, b) for a, b in zip(got, value, strict=True))
        else:
            assert got == value, name
    with pytest.raises(ValueError, match=r"a pipeline stage received \d+ rows, expected"):
        StageCarry.unpack(network, packed, tokens.shape[1], text_len=4)
