"""Image dropout of image-to-video training (``diffusion.image_dropout``): off by default with the random streams and
losses of before bit for bit; on, the image features and condition latents of the drawn samples are zeros (the frame
mask kept), decided per sample from their own stream (DESIGN.md rule 2)."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import torch
from torch import nn

from dfm.domain.batch import Batch
from dfm.domain.diffusion.conditioning import drop_image, drop_text
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.objective import DiffusionProcess, training_loss
from dfm.domain.rng import SampleRNG, Stream
from dfm.domain.specs import WAN_TINY

C, M, S, D, R, E = 3, 2, 5, 8, 4, 6
"""Latent channels, mask channels, text tokens and width, image rows and width."""
PROCESSES: dict[str, DiffusionProcess] = {
    "flow": FlowMatching(shift=3.0, text_dropout=0.3),
    "edm": EDM(text_dropout=0.3),
}
GOLDEN = {  # per-sample losses of batch() with ImageNet at SampleRNG(seed=5, step=7), before image dropout existed
    "flow": [
        "0x1.1a37dc0000000p+6",
        "0x1.7fc0360000000p+5",
        "0x1.d2e3ce0000000p+5",
        "0x1.2363680000000p+5",
        "0x1.61ffde0000000p+6",
        "0x1.785f5a0000000p+4",
    ],
    "edm": [
        "0x1.8e56ec0000000p+1",
        "0x1.25d0c60000000p+2",
        "0x1.00d3000000000p+2",
        "0x1.8f04b80000000p+1",
        "0x1.0922fc0000000p+2",
        "0x1.9a9ef40000000p+1",
    ],
}


class ImageNet(nn.Module):
    """A tiny image-to-video network: channels mixed linearly, plus time, pooled-text and pooled-image biases."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.mix = nn.Parameter(0.3 * torch.randn(C, 2 * C + M, generator=g))
        self.text_proj = nn.Parameter(0.1 * torch.randn(D, C, generator=g))
        self.image_proj = nn.Parameter(0.1 * torch.randn(E, C, generator=g))

    def forward(
        self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: Any, image: torch.Tensor
    ) -> torch.Tensor:
        bias = text.mean(1) @ self.text_proj + image.mean(1) @ self.image_proj + 0.01 * timestep[:, None]
        return torch.einsum("oc,bcfhw->bofhw", self.mix, x) + bias[:, :, None, None, None]


class Recorder:
    """Records the network's inputs and returns zeros."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def __call__(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, mask: Any, image: torch.Tensor):
        self.calls.append((x, text, image))
        return torch.zeros_like(x[:, :C])


def batch(b: int = 6, start: int = 100) -> Batch:
    """Latents ``[b, C, 2, 4, 4]``; condition: a mask of ones at the first frame, then random condition latents."""
    g = torch.Generator().manual_seed(3)
    condition = torch.cat([torch.zeros(b, M, 2, 4, 4), torch.randn(b, C, 2, 4, 4, generator=g)], 1)
    condition[:, :, 0] = torch.where(torch.arange(M + C)[None, :, None, None] < M, 1.0, condition[:, :, 0])
    return Batch(
        latents=torch.randn(b, C, 2, 4, 4, generator=g),
        text=torch.randn(b, S, D, generator=g) + 1,
        sample_index=torch.arange(start, start + b),
        condition=condition,
        image=torch.randn(b, R, E, generator=g),
    )


@pytest.mark.parametrize("name", sorted(PROCESSES))
def test_without_image_dropout_the_losses_are_those_of_before(name: str) -> None:
    process = PROCESSES[name]
    assert process.image_dropout == 0.0  # the default
    out = training_loss(ImageNet(), batch(), process, SampleRNG(seed=5, step=7))
    golden = torch.tensor([float.fromhex(v) for v in GOLDEN[name]], dtype=torch.float64)
    # a changed random stream moves a loss by far more than the 1e-6 left for another CPU's kernels
    torch.testing.assert_close(out.per_sample.double(), golden, rtol=1e-6, atol=0)
    assert "image_dropped" not in out.metrics


def test_no_image_dropout_stream_is_drawn_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[Stream] = []
    generator = SampleRNG.generator

    def recording(self: SampleRNG, index: int, stream: Stream) -> torch.Generator:
        drawn.append(stream)
        return generator(self, index, stream)

    monkeypatch.setattr(SampleRNG, "generator", recording)
    runs = {}
    for p in (0.0, 0.5):
        drawn.clear()
        recorder = Recorder()
        training_loss(recorder, batch(), FlowMatching(image_dropout=p), SampleRNG(seed=5, step=7))
        runs[p] = (set(drawn), recorder.calls[0])
    assert runs[0.0][0] == {Stream.SIGMA, Stream.NOISE, Stream.TEXT_DROPOUT}
    assert runs[0.5][0] == {Stream.SIGMA, Stream.NOISE, Stream.TEXT_DROPOUT, Stream.IMAGE_DROPOUT}
    (x0, text0, _), (x1, text1, _) = runs[0.0][1], runs[0.5][1]
    assert torch.equal(x0[:, : C + M], x1[:, : C + M]) and torch.equal(text0, text1)  # the other draws unchanged


def test_image_dropout_one_zeros_the_features_and_condition_latents_that_reach_the_network() -> None:
    spec = attrs.evolve(WAN_TINY, in_channels=12, image_dim=E, added_kv_proj_dim=WAN_TINY.hidden_size)
    network = WanTransformer(spec, generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    network.register_forward_pre_hook(lambda m, args: seen.update(x=args[0], image=args[4]))
    network.condition_embedder.image_embedder.register_forward_pre_hook(lambda m, args: seen.update(embedded=args[0]))
    g = torch.Generator().manual_seed(4)
    mask = torch.zeros(2, 4, 2, 4, 4)
    mask[:, :, 0] = 1
    given = Batch(
        latents=torch.randn(2, 4, 2, 4, 4, generator=g),
        text=torch.randn(2, S, WAN_TINY.text_dim, generator=g),
        sample_index=torch.arange(2),
        condition=torch.cat([mask, torch.randn(2, 4, 2, 4, 4, generator=g)], 1),
        image=torch.randn(2, R, E, generator=g),
    )
    out = training_loss(network, given, FlowMatching(image_dropout=1.0), SampleRNG(seed=0, step=0))
    assert torch.equal(seen["x"][:, 4:8], mask)  # the frame mask is kept
    assert not seen["x"][:, 8:].any() and not seen["image"].any() and not seen["embedded"].any()
    assert out.metrics["image_dropped"].item() == 1.0 and torch.isfinite(out.loss)


def test_a_seeded_rate_drops_the_samples_their_streams_draw() -> None:
    given, rng, p = batch(b=16), SampleRNG(seed=2, step=3), 0.4
    recorder = Recorder()
    out = training_loss(recorder, given, FlowMatching(text_dropout=0.4, image_dropout=p), rng)
    x, text, image = recorder.calls[0]
    dropped = rng.rand(given.sample_index, (), Stream.IMAGE_DROPOUT) < p
    assert 0 < int(dropped.sum()) < 16
    assert torch.equal(x[:, C : C + M], given.condition[:, :M])  # every mask kept
    assert not x[dropped, C + M :].any() and torch.equal(x[~dropped, C:], given.condition[~dropped])
    assert not image[dropped].any() and torch.equal(image[~dropped], given.image[~dropped])
    assert out.metrics["image_dropped"].item() == pytest.approx(dropped.float().mean().item())
    _, keep_text = drop_text(given.text, 0.4, rng, given.sample_index)
    assert not torch.equal(keep_text, ~dropped)  # drawn independently of the text dropout
    assert torch.equal(text.flatten(1).abs().sum(1) == 0, ~keep_text)


def test_first_last_frame_features_drop_with_their_sample() -> None:
    given, rng = batch(b=8), SampleRNG(seed=1, step=1)
    pairs = torch.randn(16, R, E, generator=torch.Generator().manual_seed(5))  # [first, last] of each sample
    condition, image, keep = drop_image(given.condition, pairs, 0.5, rng, given.sample_index, latent_channels=C)
    assert keep is not None and 0 < int(keep.sum()) < 8
    rows = keep.repeat_interleave(2)
    assert not image[~rows].any() and torch.equal(image[rows], pairs[rows])
    assert torch.equal(condition[:, :M], given.condition[:, :M]) and not condition[~keep, M:].any()
    kept = drop_image(given.condition, pairs, 0.0, rng, given.sample_index, latent_channels=C)
    assert kept[0] is given.condition and kept[1] is pairs and kept[2] is None  # p = 0: untouched, nothing drawn


def test_any_split_of_the_batch_drops_and_loses_alike() -> None:
    given, net, rng = batch(b=8), ImageNet(), SampleRNG(seed=5, step=7)
    process = FlowMatching(text_dropout=0.3, image_dropout=0.5)
    whole = training_loss(net, given, process, rng).per_sample
    halves = []
    for part in (slice(0, 4), slice(4, 8)):
        sub = Batch(
            latents=given.latents[part],
            text=given.text[part],
            sample_index=given.sample_index[part],
            condition=given.condition[part],
            image=given.image[part],
        )
        halves.append(training_loss(net, sub, process, rng).per_sample)
    torch.testing.assert_close(torch.cat(halves), whole, rtol=1e-6, atol=0)
