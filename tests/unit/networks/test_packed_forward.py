"""Packed sequences: samples of different shapes and text lengths in one token sequence give each
sample exactly its own unpacked forward (outputs and gradients), and the packed objective gives each
sample its unpacked loss (the same per-sample draws, DESIGN.md rule 2)."""

from __future__ import annotations

import pytest
import torch
from support.networks import tiny_network
from torch import Tensor, nn

from dfm.domain.batch import Batch, PackedBatch
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.networks.attention import SDPAAttention, segment_attention, varlen_attention
from dfm.domain.networks.dit import DiT
from dfm.domain.networks.layers import packed_positions, rope_3d
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.objective import packed_training_loss, training_loss
from dfm.domain.packing import PackedLayout, pad_text
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import WAN_TINY

Network = WanTransformer | DiT
SHAPES = [(2, 4, 6), (1, 2, 2), (3, 4, 4)]  # latent (F, H, W): 12, 1 and 12 tokens with patch (1, 2, 2)
TEXT_LENGTHS = [5, 2, 3]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _network(kind: str) -> Network:
    return tiny_network(kind)


def _samples(model: Network) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    spec, g = model.spec, _gen(2)
    latents = [torch.randn(spec.in_channels, *shape, generator=g) for shape in SHAPES]
    t = torch.rand(len(SHAPES), generator=g) * (1000 if isinstance(model, WanTransformer) else 1)
    texts = [torch.randn(s, spec.text_dim, generator=g) for s in TEXT_LENGTHS]
    return latents, t, texts


def _weighted_sum(outs: list[Tensor]) -> Tensor:
    return sum((o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)


def _grads(model: nn.Module, loss: Tensor) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_packed_forward_equals_each_samples_own_forward(kind: str) -> None:
    model = _network(kind)
    latents, t, texts = _samples(model)
    text, mask = pad_text(texts)
    packed = model.forward_packed(latents, t, text, mask)
    alone = [model(x[None], t[i : i + 1], texts[i][None])[0] for i, x in enumerate(latents)]
    assert [o.shape for o in packed] == [o.shape for o in alone]
    for p, a in zip(packed, alone, strict=True):
        torch.testing.assert_close(p, a, rtol=1e-5, atol=1e-5)
    grads_packed = _grads(model, _weighted_sum(packed))
    grads_alone = _grads(model, _weighted_sum(alone))
    assert grads_packed.keys() == grads_alone.keys()
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grad, grads_alone[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_list_input_runs_packed_and_inputs_grad_matches(kind: str) -> None:
    """``network(list, ...)`` packs (so wrappers hooking ``__call__`` see packed calls); input grads agree."""
    model = _network(kind)
    latents, t, texts = _samples(model)
    text, mask = pad_text(texts)
    xs = [x.clone().requires_grad_() for x in latents]
    out = model(xs, t, text, mask)
    assert isinstance(out, list)
    _weighted_sum(out).backward()
    for i, x in enumerate(latents):
        y = x.clone().requires_grad_()
        _weighted_sum([model(y[None], t[i : i + 1], texts[i][None])[0]]).backward()
        torch.testing.assert_close(xs[i].grad, y.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_a_sample_without_text_gets_no_text_when_packed(kind: str) -> None:
    model = _network(kind)
    latents, t, texts = _samples(model)
    text, mask = pad_text(texts)
    mask[1] = False
    packed = model.forward_packed(latents, t, text, mask)
    alone = model(latents[1][None], t[1:2], text[1:2], mask[1:2])[0]
    torch.testing.assert_close(packed[1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0], model(latents[0][None], t[:1], texts[0][None])[0], rtol=1e-5, atol=1e-5)


def test_packed_positions_are_each_samples_own() -> None:
    layout = PackedLayout(grids=[(1, 2, 3), (2, 1, 1)])
    mask = torch.tensor([[True, False], [True, True]])
    pos = packed_positions(layout, 12, mask, 2, torch.device("cpu"))
    cos0, _ = rope_3d(12, (1, 2, 3))
    cos1, sin1 = rope_3d(12, (2, 1, 1))
    torch.testing.assert_close(pos.rope[0], torch.cat([cos0, cos1]), rtol=0, atol=0)
    torch.testing.assert_close(pos.rope[1][6:], sin1, rtol=0, atol=0)
    assert pos.segments == (6, 2)
    expected_cross = torch.tensor([[True, False, False, False]] * 6 + [[False, False, True, True]] * 2)
    assert torch.equal(pos.text_mask[0, 0], expected_cross)
    assert pos.cu_seqlens.tolist() == [0, 6, 8] and pos.cu_seqlens.dtype == torch.int32
    assert pos.cu_seqlens_text.tolist() == [0, 2, 4]


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_packed_loss_equals_unpacked_per_sample_losses(kind: str) -> None:
    model = _network(kind)
    latents, _, texts = _samples(model)
    process = FlowMatching(text_dropout=0.5) if kind == "wan" else EDM(text_dropout=0.5)
    rng = SampleRNG(seed=7, step=3)
    indices = torch.tensor([11, 4, 9])
    text, mask = pad_text(texts)
    batch = PackedBatch(latents=latents, text=text, sample_index=indices, text_mask=mask)
    packed = packed_training_loss(model, batch, process, rng)
    grads_packed = _grads(model, packed.loss)
    alone = [
        training_loss(model, Batch(latents=x[None], text=texts[i][None], sample_index=indices[i : i + 1]), process, rng)
        for i, x in enumerate(latents)
    ]
    per_sample = torch.cat([a.per_sample for a in alone])
    torch.testing.assert_close(packed.per_sample, per_sample, rtol=1e-5, atol=1e-6)
    grads_alone = _grads(model, per_sample.mean())
    for name, grad in grads_packed.items():
        torch.testing.assert_close(grad, grads_alone[name], rtol=1e-4, atol=1e-5, msg=name)
    for key in ("sigma_mean", "weight_mean", "text_dropped"):
        torch.testing.assert_close(packed.metrics[key], torch.stack([a.metrics[key] for a in alone]).mean())


def test_packed_loss_equals_a_same_shape_unpacked_batch() -> None:
    """Two samples of one shape: the packed per-sample losses equal one unpacked batch of both (any split)."""
    model = _network("wan")
    g = _gen(5)
    x = torch.randn(2, WAN_TINY.in_channels, 2, 4, 4, generator=g)
    text = torch.randn(2, 4, WAN_TINY.text_dim, generator=g)
    indices = torch.tensor([3, 8])
    process, rng = FlowMatching(text_dropout=0.0), SampleRNG(seed=1, step=0)
    unpacked = training_loss(model, Batch(latents=x, text=text, sample_index=indices), process, rng)
    packed = packed_training_loss(
        model.forward_packed, PackedBatch(latents=list(x), text=text, sample_index=indices), process, rng
    )
    torch.testing.assert_close(packed.per_sample, unpacked.per_sample, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(packed.loss, unpacked.loss, rtol=1e-5, atol=1e-6)


def test_segment_attention_equals_the_block_mask_and_the_varlen_reference() -> None:
    """Self-attention per segment (what the networks run) is the block-diagonal mask over the whole sequence
    and what a varlen kernel fed ``cu_seqlens`` computes; the text mask is the varlen cross-attention."""
    layout = PackedLayout(grids=[(1, 2, 3), (2, 1, 1), (1, 1, 4)])
    pos = packed_positions(layout, 12, None, 3, torch.device("cpu"))
    g = _gen(9)
    q, k, v = (torch.randn(1, 2, layout.total_tokens, 12, generator=g) for _ in range(3))
    ids = layout.segment_ids(torch.device("cpu"))
    block = (ids[:, None] == ids[None, :])[None, None]
    segmented = segment_attention(q, k, v, pos.segments, SDPAAttention())
    dense = SDPAAttention()(q, k, v, block)  # other kernels, other sums: 5e-7 apart on values of order 1
    torch.testing.assert_close(segmented, dense, rtol=1e-5, atol=1e-5)
    reference = varlen_attention(q, k, v, pos.cu_seqlens, pos.cu_seqlens)
    torch.testing.assert_close(segmented, reference, rtol=0, atol=0)  # the same kernel calls on the same rows
    kt, vt = (torch.randn(1, 2, 9, 12, generator=g) for _ in range(2))
    cross = SDPAAttention()(q, kt, vt, pos.text_mask)
    reference = varlen_attention(q, kt, vt, pos.cu_seqlens, pos.cu_seqlens_text)
    torch.testing.assert_close(cross, reference, rtol=1e-5, atol=1e-5)
