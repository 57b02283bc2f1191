"""``diffusion.mask_text_padding``: whether the network's cross-attention ignores the text's zero padding.

On (dfm's default): the batch's text mask reaches the network, so the padding length does not matter. Off
(WAN 2.1, the WAN recipes): the network gets no mask and attends to every token of the zero-padded text, in
training (plain and packed batches) as in sampling (tests/unit/sampling/test_wan_pipeline_parity.py).
"""

from __future__ import annotations

import attrs
import pytest
import torch
from support.networks import tiny_network

from dfm.domain.batch import Batch, PackedBatch
from dfm.domain.diffusion.conditioning import network_text_mask
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.objective import DiffusionProcess, packed_training_loss, training_loss
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import WAN_TINY

LENGTHS = [3, 6]  # real tokens of the two samples
RNG = SampleRNG(seed=4, step=2)


class MaskRecorder:
    """Records the text mask of every call; predicts zeros."""

    def __init__(self) -> None:
        self.masks: list[torch.Tensor | None] = []

    def __call__(self, x, timestep, text, text_mask):
        self.masks.append(text_mask)
        return torch.zeros_like(x) if isinstance(x, torch.Tensor) else [torch.zeros_like(v) for v in x]


def _batch(text_len: int, seed: int = 0) -> Batch:
    """Two samples whose texts are zero-padded to ``text_len`` tokens (the same real tokens at any length)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, WAN_TINY.in_channels, 2, 4, 4, generator=g)
    real = torch.randn(2, max(LENGTHS), WAN_TINY.text_dim, generator=g)
    mask = torch.arange(text_len)[None, :] < torch.tensor(LENGTHS)[:, None]
    text = torch.zeros(2, text_len, WAN_TINY.text_dim)
    text[:, : max(LENGTHS)] = real
    text = text * mask[..., None]
    return Batch(latents=latents, text=text, sample_index=torch.tensor([5, 9]), text_mask=mask)


def _packed(batch: Batch) -> PackedBatch:
    return PackedBatch(
        latents=list(batch.latents), text=batch.text, sample_index=batch.sample_index, text_mask=batch.text_mask
    )


def _flow(mask: bool) -> FlowMatching:
    return FlowMatching(text_dropout=0.0, mask_text_padding=mask)


def test_network_text_mask_passes_the_mask_only_when_padding_is_masked() -> None:
    mask = torch.tensor([[True, False]])
    assert network_text_mask(mask, True) is mask
    assert network_text_mask(mask, False) is None
    assert network_text_mask(None, True) is None


@pytest.mark.parametrize("process", [_flow(True), EDM(text_dropout=0.0)], ids=["flow", "edm"])
def test_the_default_gives_the_network_the_batchs_mask(process: DiffusionProcess) -> None:
    batch = _batch(8)
    assert process.mask_text_padding is True  # type: ignore[attr-defined]
    plain, packed = MaskRecorder(), MaskRecorder()
    training_loss(plain, batch, process, RNG)
    packed_training_loss(packed, _packed(batch), process, RNG)
    assert len(plain.masks) == len(packed.masks) == 1
    assert torch.equal(plain.masks[0], batch.text_mask) and torch.equal(packed.masks[0], batch.text_mask)


@pytest.mark.parametrize("process", [_flow(False), EDM(text_dropout=0.0, mask_text_padding=False)], ids=["flow", "edm"])
def test_unmasked_padding_gives_the_network_no_mask(process: DiffusionProcess) -> None:
    plain, packed = MaskRecorder(), MaskRecorder()
    training_loss(plain, _batch(8), process, RNG)
    packed_training_loss(packed, _packed(_batch(8)), process, RNG)
    assert plain.masks == packed.masks == [None]


def test_masked_losses_do_not_depend_on_the_padding_and_unmasked_ones_do() -> None:
    """A real tiny WAN: with the mask, 8 or 32 text tokens give the same losses; without it, the padding is
    attended (WAN 2.1): the losses are those of the unmasked network and change with the padding length."""
    model = tiny_network("wan")
    short, long = _batch(8), _batch(32)
    with torch.no_grad():
        masked = [training_loss(model, b, _flow(True), RNG).per_sample for b in (short, long)]
        unmasked = [training_loss(model, b, _flow(False), RNG).per_sample for b in (short, long)]
        no_mask_given = training_loss(model, attrs.evolve(short, text_mask=None), _flow(True), RNG)
        packed = packed_training_loss(model, _packed(short), _flow(False), RNG).per_sample
    torch.testing.assert_close(masked[0], masked[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(unmasked[0], no_mask_given.per_sample, rtol=0, atol=0)
    torch.testing.assert_close(packed, unmasked[0], rtol=1e-5, atol=1e-7)
    # float rounding moves these losses by <= 6e-8 relative; the padding by 5e-5 (attended vs masked) and
    # 2.5e-5 (8 vs 32 attended tokens) with this tiny random network
    assert ((unmasked[0] - masked[0]).abs() > 1e-5 * masked[0]).all()
    assert ((unmasked[1] - unmasked[0]).abs() > 1e-5 * unmasked[0]).all()
