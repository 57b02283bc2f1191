"""Tokens and FLOPs of the batches that ran: from each batch's own latent shapes and text length."""

from __future__ import annotations

import pytest
import torch

from dfm.domain.batch import Batch, PackedBatch
from dfm.domain.specs import (
    WAN_TINY,
    batch_training_flops,
    batch_video_tokens,
    sample_lengths,
    training_flops,
)

H, FFN, LAYERS = 24, 48, 2  # WAN_TINY: 2 heads x 12, ffn 48, 2 layers, patch (1, 2, 2), 4 channels, text width 32


def closed_form(L: int, S: int) -> float:
    """WAN_TINY training FLOPs of one sample, written out: 3 x (blocks + patch embedding, text projection, head)."""
    block = 12 * L * H * H + 4 * L * H * FFN + 4 * S * H * H + 4 * L * L * H + 4 * L * S * H
    embed = 2 * L * 4 * 4 * H + 2 * S * 32 * H + 2 * S * H * H
    head = 2 * L * H * 4 * 4
    return 3.0 * (LAYERS * block + embed + head)


def _batch(n: int, f: int, h: int, w: int, text_len: int) -> Batch:
    return Batch(latents=torch.zeros(n, 4, f, h, w), text=torch.zeros(n, text_len, 32), sample_index=torch.arange(n))


def test_bucketed_batches_sum_their_own_shapes() -> None:
    big, small = _batch(2, 3, 8, 12, text_len=7), _batch(3, 5, 4, 6, text_len=9)  # L = 3*4*6 = 72 and 5*2*3 = 30
    assert sample_lengths(WAN_TINY, big) == [(72, 7)] * 2
    assert sample_lengths(WAN_TINY, small) == [(30, 9)] * 3
    assert batch_video_tokens(WAN_TINY, big) + batch_video_tokens(WAN_TINY, small) == 2 * 72 + 3 * 30
    got = batch_training_flops(WAN_TINY, big) + batch_training_flops(WAN_TINY, small)
    assert got == pytest.approx(2 * closed_form(72, 7) + 3 * closed_form(30, 9), rel=1e-12)
    assert training_flops(WAN_TINY, 72, 7) == pytest.approx(closed_form(72, 7), rel=1e-12)


def test_packed_batch_counts_attention_per_sample_not_over_the_packed_length() -> None:
    latents = (torch.zeros(4, 3, 8, 12), torch.zeros(4, 5, 4, 6), torch.zeros(4, 1, 2, 2))  # L = 72, 30, 1
    packed = PackedBatch(latents=latents, text=torch.zeros(3, 7, 32), sample_index=torch.arange(3))
    assert sample_lengths(WAN_TINY, packed) == [(72, 7), (30, 7), (1, 7)]
    assert batch_video_tokens(WAN_TINY, packed) == 103
    got = batch_training_flops(WAN_TINY, packed)
    assert got == pytest.approx(closed_form(72, 7) + closed_form(30, 7) + closed_form(1, 7), rel=1e-12)
    # One sample of the packed length would add the cross-sample attention products 4 h (L^2 - sum L_i^2) per
    # layer, and count the text's own terms once instead of once per sample.
    cross = 4 * H * (103**2 - (72**2 + 30**2 + 1**2)) * LAYERS
    text_once = 2 * (LAYERS * 4 * 7 * H * H + 2 * 7 * 32 * H + 2 * 7 * H * H)
    assert closed_form(103, 7) - got == pytest.approx(3.0 * (cross - text_once), rel=1e-12)


def test_a_latent_the_patch_does_not_divide_is_refused() -> None:
    with pytest.raises(ValueError, match="not divisible by patch"):
        sample_lengths(WAN_TINY, _batch(1, 3, 7, 12, text_len=4))
