"""The whole training math as one pure function (DESIGN.md, "objective").

Given a network callable, a batch and the step's per-sample random streams, :func:`training_loss`
draws noise, ``sigma`` and the text-dropout decisions per sample (DESIGN.md rule 2), lets the
diffusion process (flow matching or EDM) form its prediction and target, and returns the weighted
MSE. Runtimes only decide where this runs and how gradients are reduced.

:func:`packed_training_loss` is the same math for a :class:`~dfm.domain.batch.PackedBatch`: samples of
different shapes in one packed token sequence (:mod:`dfm.domain.packing`), each with its own ``sigma``,
noise and text dropout drawn from the same streams, so its per-sample losses equal the unpacked ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import torch

from dfm.domain.batch import Batch, PackedBatch
from dfm.domain.diffusion.conditioning import DenoiserNetwork, TrainingTerms, drop_text
from dfm.domain.rng import SampleRNG, Stream

__all__ = [
    "DenoiserNetwork",
    "DiffusionProcess",
    "LossOutput",
    "PackedDenoiserNetwork",
    "packed_training_loss",
    "per_sample_mse",
    "training_loss",
]


class PackedDenoiserNetwork(Protocol):
    """A network run on a packed sequence: ``network(latents, timestep, text, text_mask) -> outputs``.

    ``latents`` and ``outputs`` are lists of per-sample ``[C, F_i, H_i, W_i]``; ``timestep`` is ``[N]``,
    ``text`` ``[N, S, D]`` and ``text_mask`` ``[N, S]`` or ``None`` (e.g. ``WanTransformer.forward_packed``,
    or the network itself, whose ``forward`` packs a list).
    """

    def __call__(
        self,
        latents: Sequence[torch.Tensor],
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
    ) -> Sequence[torch.Tensor]: ...


@runtime_checkable
class DiffusionProcess(Protocol):
    """What the objective needs from a diffusion process; :class:`FlowMatching` and :class:`EDM` are ones."""

    @property
    def text_dropout(self) -> float:
        """Probability of dropping a sample's text (classifier-free guidance)."""
        ...

    def draw_sigma(self, rng: SampleRNG, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Per-sample ``sigma`` ``[B]`` (float32, CPU) from each sample's ``SIGMA`` stream."""
        ...

    def training_terms(
        self,
        network: DenoiserNetwork,
        x0: torch.Tensor,
        eps: torch.Tensor,
        sigma: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
    ) -> TrainingTerms:
        """The network's prediction, the regression target and the per-sample weight; the network is given
        ``text_mask`` only where the process masks the text's padding (``mask_text_padding``)."""
        ...


@attrs.frozen(kw_only=True, eq=False)
class LossOutput:
    """The result of one training loss evaluation.

    Attributes:
        loss: Scalar float32: the mean over samples of :attr:`per_sample`.
        per_sample: ``[B]`` float32: ``weight(sigma_b) * mean((prediction_b - target_b)^2)``.
        metrics: Detached float32 scalars: ``mse`` (unweighted, mean over samples), ``sigma_mean``,
            ``weight_mean`` and ``text_dropped`` (fraction of samples whose text was dropped).
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    metrics: dict[str, torch.Tensor]


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements of each sample, in float32: ``[B, ...] -> [B]``.

    Raises:
        ValueError: If the network's prediction does not have the target's shape.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"the network returned shape {tuple(prediction.shape)} but the target has shape {tuple(target.shape)}; "
            "check that the model's out_channels and patch size match the latents"
        )
    return (prediction.float() - target.float()).square().flatten(1).mean(dim=1)


def training_loss(network: DenoiserNetwork, batch: Batch, process: DiffusionProcess, rng: SampleRNG) -> LossOutput:
    """The diffusion training loss of one (micro-)batch.

    Noise ``eps`` is drawn in float32 from each sample's ``NOISE`` stream with the sample's full latent
    shape (so a context-parallel rank can slice the same noise), ``sigma`` from its ``SIGMA`` stream and
    the text dropout from its ``TEXT_DROPOUT`` stream, all on CPU generators, then moved to the latents'
    device. The math runs in float32 (latents are upcast); the network receives float32 inputs, and a
    runtime training in bf16 casts inside it (autocast or its engine's mixed-precision wrapper).
    A sample's loss depends only on its data and ``(rng.seed, rng.step, sample_index)``, so any split
    of a global batch gives the same per-sample losses (DESIGN.md rule 2).

    Args:
        network: ``network(x, timestep, text, text_mask) -> [B, C, F, H, W]``.
        batch: Clean latents ``x0``, text and global sample indices.
        process: The diffusion process (e.g. ``FlowMatching`` or ``EDM``).
        rng: The step's per-sample random streams.

    Returns:
        The loss, the per-sample losses and detached metrics.
    """
    x0 = batch.latents.float()
    indices = batch.sample_index
    eps = rng.randn(indices, x0.shape[1:], Stream.NOISE).to(x0.device)
    sigma = process.draw_sigma(rng, indices).to(x0.device)
    text, keep = drop_text(batch.text, process.text_dropout, rng, indices)
    terms = process.training_terms(network, x0, eps, sigma, text, batch.text_mask)
    mse = per_sample_mse(terms.prediction, terms.target)
    weight = terms.weight.float()
    return _loss_output(mse, weight, sigma, keep)


def packed_training_loss(
    network: PackedDenoiserNetwork, batch: PackedBatch, process: DiffusionProcess, rng: SampleRNG
) -> LossOutput:
    """The diffusion training loss of a packed batch: samples of any shapes, one network call.

    Sample ``b`` draws its noise (its own latent shape), ``sigma`` and text dropout from the streams of
    ``batch.sample_index[b]`` exactly as :func:`training_loss` does, and the process forms its
    prediction, target and weight sample by sample; the network runs once on all samples packed. So
    ``per_sample[b]`` equals ``training_loss``'s for that sample in any unpacked batch (to float
    rounding), and ``loss`` is their mean, as for an unpacked batch of the same samples.

    Args:
        network: A packed network (:class:`PackedDenoiserNetwork`).
        batch: Clean per-sample latents, padded text with its mask, global sample indices.
        process: The diffusion process (e.g. ``FlowMatching`` or ``EDM``).
        rng: The step's per-sample random streams.

    Returns:
        The loss, the per-sample losses ``[N]`` (in batch order) and detached metrics.
    """
    x0 = [x.float() for x in batch.latents]
    indices = batch.sample_index
    eps = [rng.randn([i], x.shape, Stream.NOISE)[0].to(x.device) for i, x in zip(indices.tolist(), x0, strict=True)]
    sigma = process.draw_sigma(rng, indices).to(x0[0].device)
    text, keep = drop_text(batch.text, process.text_dropout, rng, indices)
    terms = _packed_terms(network, process, x0, eps, sigma, text, batch.text_mask)
    mse = torch.cat([per_sample_mse(t.prediction, t.target) for t in terms])
    weight = torch.cat([t.weight.float().reshape(1) for t in terms])
    return _loss_output(mse, weight, sigma, keep)


def _loss_output(mse: torch.Tensor, weight: torch.Tensor, sigma: torch.Tensor, keep: torch.Tensor) -> LossOutput:
    """``per_sample = weight * mse``, their mean, and the detached metrics every objective reports."""
    per_sample = weight * mse
    metrics = {
        "mse": mse.detach().mean(),
        "sigma_mean": sigma.detach().float().mean(),
        "weight_mean": weight.detach().mean(),
        "text_dropped": (~keep).float().mean(),
    }
    return LossOutput(loss=per_sample.mean(), per_sample=per_sample, metrics=metrics)


def _packed_terms(
    network: PackedDenoiserNetwork,
    process: DiffusionProcess,
    x0: list[torch.Tensor],
    eps: list[torch.Tensor],
    sigma: torch.Tensor,
    text: torch.Tensor,
    text_mask: torch.Tensor | None,
) -> list[TrainingTerms]:
    """The process's training terms of each sample (a batch of one), with one packed network call.

    A process calls its network once per batch. A first pass records each sample's network inputs
    (answering zeros, whose terms are discarded); the packed network then runs on all of them; a second
    pass replays its per-sample outputs to the process. Any :class:`DiffusionProcess` works unchanged.
    """

    def each(net: DenoiserNetwork) -> list[TrainingTerms]:
        masks = [None] * len(x0) if text_mask is None else text_mask.split(1)
        rows = zip(x0, eps, sigma.split(1), text.split(1), masks, strict=True)
        return [process.training_terms(net, x[None], e[None], s, t, m) for x, e, s, t, m in rows]

    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def record(x: torch.Tensor, timestep: torch.Tensor, txt: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        calls.append((x, timestep, txt, mask))
        return torch.zeros_like(x)

    each(record)
    assert len(calls) == len(x0), "a diffusion process must call its network exactly once per batch"
    masks = [c[3] for c in calls]  # None when there is no mask or the process leaves the padding unmasked
    assert all(m is None for m in masks) or all(m is not None for m in masks), "a text mask for some samples only"
    mask = None if masks[0] is None else torch.cat(masks)
    outputs = iter(
        network([c[0][0] for c in calls], torch.cat([c[1] for c in calls]), torch.cat([c[2] for c in calls]), mask)
    )
    return each(lambda x, timestep, txt, m: next(outputs).unsqueeze(0))


def batch_loss(network: Any, batch: Batch | PackedBatch, process: DiffusionProcess, rng: SampleRNG) -> LossOutput:
    """:func:`packed_training_loss` for a :class:`PackedBatch`, :func:`training_loss` for a :class:`Batch`."""
    if isinstance(batch, PackedBatch):
        return packed_training_loss(network, batch, process, rng)
    return training_loss(network, batch, process, rng)
