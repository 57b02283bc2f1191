"""The whole training math as one pure function (DESIGN.md, "objective").

Given a network callable, a batch and the step's per-sample random streams, :func:`training_loss`
draws noise, ``sigma`` and the text-dropout decisions (image-to-video: also any image dropout) per
sample (DESIGN.md rule 2), lets the diffusion process (flow matching or EDM) form the network's inputs,
calls the network, lets the process form its prediction and target from the output, and returns the
weighted MSE. Runtimes only decide where
this runs and how gradients are reduced; :class:`Objective` is the same loss in two halves (before and
after the network) for an engine whose network runs in pipeline stages.

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
from dfm.domain.diffusion.conditioning import DenoiserNetwork, NetworkInputs, TrainingTerms, drop_image, drop_text
from dfm.domain.rng import SampleRNG, Stream

__all__ = [
    "DenoiserNetwork",
    "DiffusionProcess",
    "LossOutput",
    "Objective",
    "PackedDenoiserNetwork",
    "PreparedBatch",
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

    @property
    def image_dropout(self) -> float:
        """Image-to-video: probability of dropping a sample's image (:func:`drop_image`; 0: never)."""
        ...

    def draw_sigma(self, rng: SampleRNG, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Per-sample ``sigma`` ``[B]`` (float32, CPU) from each sample's ``SIGMA`` stream."""
        ...

    def network_inputs(
        self, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor, text_mask: torch.Tensor | None
    ) -> NetworkInputs:
        """What the network is given: its input, timestep and (when the process masks the padding) text mask."""
        ...

    def training_terms(
        self, output: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor
    ) -> TrainingTerms:
        """The prediction (from the network's ``output`` on :meth:`network_inputs`), the target and the weight."""
        ...


@attrs.frozen(kw_only=True, eq=False)
class LossOutput:
    """The result of one training loss evaluation.

    Attributes:
        loss: Scalar float32: the mean over samples of :attr:`per_sample`.
        per_sample: ``[B]`` float32: ``weight(sigma_b) * mean((prediction_b - target_b)^2)``.
        metrics: Detached float32 scalars: ``mse`` (unweighted, mean over samples), ``sigma_mean``,
            ``weight_mean`` and ``text_dropped`` (fraction of samples whose text was dropped); with image dropout
            (an image-to-video batch, ``image_dropout > 0``) also ``image_dropped``.
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


@attrs.frozen(kw_only=True, eq=False)
class PreparedBatch:
    """A batch's network call and what its loss needs afterwards (:meth:`Objective.prepare`).

    Attributes:
        call: The network's arguments ``(x, timestep, text, text_mask)``; ``x`` a list of per-sample latents
            for a packed batch; an image-to-video batch appends its condition channels to ``x`` and its image
            features as a fifth argument.
        x0: Clean latents (float32; a list for a packed batch).
        eps: Noise like ``x0``.
        sigma: Per-sample ``sigma`` ``[B]``.
        keep: ``[B]`` bool, ``True`` where the sample kept its text.
        keep_image: ``[B]`` bool, ``True`` where the sample kept its image; ``None`` without image dropout.
    """

    call: tuple[Any, ...]
    x0: torch.Tensor | list[torch.Tensor]
    eps: torch.Tensor | list[torch.Tensor]
    sigma: torch.Tensor
    keep: torch.Tensor
    keep_image: torch.Tensor | None = None


@attrs.frozen(kw_only=True)
class Objective:
    """The diffusion training loss of one step: ``objective(network, batch) -> LossOutput``.

    Also usable in two halves, for an engine that does not call the network in one place (megatron's pipeline
    stages): :meth:`prepare` draws the batch's noise, ``sigma`` and text dropout and forms the network's
    inputs; :meth:`loss` turns the network's output into the loss. A pipelined engine runs :meth:`prepare`
    where the network's inputs enter, its stages' blocks in between, and :meth:`loss` on the last stage only.

    Attributes:
        process: The diffusion process (e.g. ``FlowMatching`` or ``EDM``).
        rng: The step's per-sample random streams.
    """

    process: DiffusionProcess
    rng: SampleRNG

    def __call__(self, network: Any, batch: Batch | PackedBatch) -> LossOutput:
        """:meth:`prepare`, one network call, :meth:`loss`."""
        prepared = self.prepare(batch)
        return self.loss(prepared, network(*prepared.call))

    def prepare(self, batch: Batch | PackedBatch) -> PreparedBatch:
        """Draw the batch's noise, ``sigma``, text (and image) dropout (DESIGN.md rule 2); form the network call."""
        if isinstance(batch, PackedBatch):
            return _prepare_packed(batch, self.process, self.rng)
        x0, indices, process = batch.latents.float(), batch.sample_index, self.process
        eps = self.rng.randn(indices, x0.shape[1:], Stream.NOISE).to(x0.device)
        sigma = process.draw_sigma(self.rng, indices).to(x0.device)
        text, keep = drop_text(batch.text, process.text_dropout, self.rng, indices)
        inputs = process.network_inputs(x0, eps, sigma, batch.text_mask)
        call: tuple[Any, ...] = (inputs.x, inputs.timestep, text, inputs.text_mask)
        keep_image = None
        if batch.condition is not None and batch.image is not None:  # image-to-video: input, never noised
            condition, image, keep_image = drop_image(
                batch.condition, batch.image, process.image_dropout, self.rng, indices, latent_channels=x0.shape[1]
            )
            x = torch.cat([inputs.x, condition.to(inputs.x)], dim=1)
            call = (x, inputs.timestep, text, inputs.text_mask, image)
        return PreparedBatch(call=call, x0=x0, eps=eps, sigma=sigma, keep=keep, keep_image=keep_image)

    def loss(self, prepared: PreparedBatch, output: Any) -> LossOutput:
        """The loss of the network's ``output`` on ``prepared.call`` (a list of per-sample outputs when packed)."""
        p, process = prepared, self.process
        if isinstance(p.x0, list):
            rows = zip(output, p.x0, p.eps, p.sigma.split(1), strict=True)
            terms = [process.training_terms(o[None], x[None], e[None], s) for o, x, e, s in rows]
            mse = torch.cat([per_sample_mse(t.prediction, t.target) for t in terms])
            weight = torch.cat([t.weight.float().reshape(1) for t in terms])
        else:
            terms = process.training_terms(output, p.x0, p.eps, p.sigma)
            mse, weight = per_sample_mse(terms.prediction, terms.target), terms.weight.float()
        return _loss_output(mse, weight, p.sigma, p.keep, p.keep_image)


def _prepare_packed(batch: PackedBatch, process: DiffusionProcess, rng: SampleRNG) -> PreparedBatch:
    """:meth:`Objective.prepare` of a packed batch: each sample's own streams and inputs, one packed call."""
    x0 = [x.float() for x in batch.latents]
    indices = batch.sample_index
    eps = [rng.randn([i], x.shape, Stream.NOISE)[0].to(x.device) for i, x in zip(indices.tolist(), x0, strict=True)]
    sigma = process.draw_sigma(rng, indices).to(x0[0].device)
    text, keep = drop_text(batch.text, process.text_dropout, rng, indices)
    masks = [None] * len(x0) if batch.text_mask is None else batch.text_mask.split(1)
    rows = zip(x0, eps, sigma.split(1), masks, strict=True)
    inputs = [process.network_inputs(x[None], e[None], s, m) for x, e, s, m in rows]
    given = [i.text_mask for i in inputs]  # None when there is no mask or the process leaves the padding unmasked
    mask = None if given[0] is None else torch.cat(given)
    call = ([i.x[0] for i in inputs], torch.cat([i.timestep for i in inputs]), text, mask)
    return PreparedBatch(call=call, x0=x0, eps=eps, sigma=sigma, keep=keep)


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
    return Objective(process=process, rng=rng)(network, batch)


def packed_training_loss(
    network: PackedDenoiserNetwork, batch: PackedBatch, process: DiffusionProcess, rng: SampleRNG
) -> LossOutput:
    """The diffusion training loss of a packed batch: samples of any shapes, one network call.

    Sample ``b`` draws its noise (its own latent shape), ``sigma`` and text dropout from the streams of
    ``batch.sample_index[b]`` exactly as :func:`training_loss` does, and the process forms its network
    inputs and its prediction, target and weight sample by sample; the network runs once on all samples
    packed. So ``per_sample[b]`` equals ``training_loss``'s for that sample in any unpacked batch (to float
    rounding), and ``loss`` is their mean, as for an unpacked batch of the same samples.

    Args:
        network: A packed network (:class:`PackedDenoiserNetwork`).
        batch: Clean per-sample latents, padded text with its mask, global sample indices.
        process: The diffusion process (e.g. ``FlowMatching`` or ``EDM``).
        rng: The step's per-sample random streams.

    Returns:
        The loss, the per-sample losses ``[N]`` (in batch order) and detached metrics.
    """
    return Objective(process=process, rng=rng)(network, batch)


def _loss_output(
    mse: torch.Tensor,
    weight: torch.Tensor,
    sigma: torch.Tensor,
    keep: torch.Tensor,
    keep_image: torch.Tensor | None = None,
) -> LossOutput:
    """``per_sample = weight * mse``, their mean, and the detached metrics every objective reports (and
    ``image_dropped`` where images were dropped out)."""
    per_sample = weight * mse
    metrics = {
        "mse": mse.detach().mean(),
        "sigma_mean": sigma.detach().float().mean(),
        "weight_mean": weight.detach().mean(),
        "text_dropped": (~keep).float().mean(),
    }
    if keep_image is not None:
        metrics["image_dropped"] = (~keep_image).float().mean()
    return LossOutput(loss=per_sample.mean(), per_sample=per_sample, metrics=metrics)


def batch_loss(network: Any, batch: Batch | PackedBatch, process: DiffusionProcess, rng: SampleRNG) -> LossOutput:
    """:func:`packed_training_loss` for a :class:`PackedBatch`, :func:`training_loss` for a :class:`Batch`."""
    return Objective(process=process, rng=rng)(network, batch)
