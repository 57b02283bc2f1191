"""What a parallel runtime relies on: WAN and DiT run as stages (embed, blocks, project, unpatchify) that
reproduce ``forward`` bit for bit, and WAN's attention takes its head count from the tensor width, so a
tensor-parallel column shard simply holds fewer heads."""

from __future__ import annotations

import pytest
import torch
from support.networks import tiny_network
from torch import Tensor, nn

from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.dit import DiT
from dfm.domain.networks.layers import rope_3d
from dfm.domain.networks.wan import WanAttention, WanTransformer

Network = WanTransformer | DiT


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _network(kind: str) -> Network:
    return tiny_network(kind)


def _inputs(model: Network, with_mask: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    spec, g = model.spec, _gen(2)
    x = torch.randn(2, spec.in_channels, 3, 4, 6, generator=g)
    t = torch.rand(2, generator=g) * (1000 if isinstance(model, WanTransformer) else 1)
    text = torch.randn(2, 5, spec.text_dim, generator=g)
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5]) if with_mask else None
    return x, t, text, mask


def _by_stages(model: Network, x: Tensor, t: Tensor, text: Tensor, mask: Tensor | None) -> Tensor:
    """Drive the network as a runtime would: embed, each block by hand, project, unpatchify."""
    inputs = model.embed(x, t, text, mask)
    tokens = inputs.tokens
    for block in model.blocks:  # a pipeline/sequence-parallel runtime's own loop
        if isinstance(model, WanTransformer):
            tokens = block(tokens, inputs.context, inputs.modulation, inputs.rope, inputs.mask)
        else:
            tokens = block(tokens, inputs.temb, inputs.context, inputs.rope, inputs.mask)
    return model.unpatchify(model.project(tokens, inputs.temb), inputs.grid)


def _grads(model: nn.Module, out: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_driving_the_stages_equals_forward_with_gradients(kind: str, with_mask: bool) -> None:
    model = _network(kind)
    args = _inputs(model, with_mask)
    out = model(*args)
    grads = _grads(model, out)
    staged = _by_stages(model, *args)
    staged_grads = _grads(model, staged)
    assert torch.equal(staged, out) and out.shape == args[0].shape
    assert grads.keys() == staged_grads.keys() == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(staged_grads[n], grads[n]) for n in grads)


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_run_blocks_and_head_are_the_stages(kind: str) -> None:
    model = _network(kind)
    x, t, text, mask = _inputs(model, with_mask=True)
    with torch.no_grad():
        inputs = model.embed(x, t, text, mask)
        tokens = model.run_blocks(inputs.tokens, inputs)
        patches = model.project(tokens, inputs.temb)
        out = model.unpatchify(patches, inputs.grid)
        assert torch.equal(out, model(x, t, text, mask))
        assert patches.shape == (*tokens.shape[:2], model.spec.out_channels * 4)  # patch (1, 2, 2)
        if isinstance(model, WanTransformer):
            assert torch.equal(model.head(tokens, inputs.temb, inputs.grid), out)
        # project works token by token, so a sequence shard may project before the gather
        chunks = [model.project(part, inputs.temb) for part in tokens.chunk(3, dim=1)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), patches, rtol=1e-6, atol=1e-6)


def test_wan_head_split_takes_heads_from_the_width() -> None:
    attn = WanAttention(dim=24, heads=4, eps=1e-6, kernel=SDPAAttention("math"))
    assert attn.head_dim == 6
    assert attn._heads(torch.randn(2, 5, 24)).shape == (2, 4, 5, 6)
    assert attn._heads(torch.randn(2, 5, 12)).shape == (2, 2, 5, 6)  # a column shard over tp=2: half the heads


def _shard(full: WanAttention, rank: int, tp: int) -> WanAttention:
    """Rank ``rank``'s tensor-parallel piece of ``full``: q/k/v column shards, ``to_out`` row shard without bias."""
    dim = full.to_q.in_features
    width, rows = dim // tp, slice(rank * dim // tp, (rank + 1) * dim // tp)
    part = WanAttention(dim, dim // full.head_dim, 1e-6, full.kernel)
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v"):
            src, lin = getattr(full, name), nn.Linear(dim, width)
            lin.weight.copy_(src.weight[rows])
            lin.bias.copy_(src.bias[rows])
            setattr(part, name, lin)
        out = nn.Linear(width, dim, bias=False)
        out.weight.copy_(full.to_out[0].weight[:, rows])
        part.to_out[0] = out
    part.norm_q, part.norm_k = nn.Identity(), nn.Identity()  # the cross-head norm is the runtime's job
    return part


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_wan_attention_column_shards_hold_whole_heads(cross: bool) -> None:
    """Summing the row-parallel partial outputs of tp=2 head shards (plus the bias once) gives the full output."""
    torch.manual_seed(0)
    full = WanAttention(dim=24, heads=4, eps=1e-6, kernel=SDPAAttention("math"))
    full.norm_q, full.norm_k = nn.Identity(), nn.Identity()
    g = _gen(3)
    x, context = torch.randn(2, 12, 24, generator=g), torch.randn(2, 5, 24, generator=g)
    kwargs = (
        {"context": context, "mask": torch.tensor([[True] * 3 + [False] * 2, [True] * 5])[:, None, None, :]}
        if cross
        else {"rope": rope_3d(full.head_dim, (2, 2, 3))}
    )
    with torch.no_grad():
        want = full(x, **kwargs)
        got = sum(_shard(full, r, 2)(x, **kwargs) for r in range(2)) + full.to_out[0].bias
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_plan_decides_weight_decay_whatever_prefix_an_engine_adds() -> None:
    plan = WanTransformer.parallel_plan
    table, matrix, bias = torch.zeros(1, 6, 4), torch.zeros(4, 4), torch.zeros(4)
    for prefix in ("", "module.network.", "_orig_mod."):
        assert not plan.decays(f"{prefix}blocks.0.scale_shift_table", table)
        assert not plan.decays(f"{prefix}scale_shift_table", table)
        assert plan.decays(f"{prefix}blocks.0.attn1.to_q.weight", matrix)
        assert not plan.decays(f"{prefix}blocks.0.attn1.to_q.bias", bias)
    assert plan.decays("blocks.0.not_a_scale_shift_table", table)  # the glob matches whole name parts only
    assert DiT.parallel_plan.decays("blocks.0.modulation.weight", matrix)
