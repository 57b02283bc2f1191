"""What a denoising network is conditioned on, and classifier-free-guidance text dropout.

Holds the pieces every diffusion process shares: the network call protocol ``(x, timestep, text,
text_mask) -> out``, per-sample broadcasting of ``sigma``, the network inputs a process forms for a
training batch and the (prediction, target, weight) triple it forms from the network's output (a process
never calls the network itself, so a packed or pipelined objective can call it as it needs), and the
text dropout of classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022)
drawn per sample (DESIGN.md rule 2), and its optional counterpart for an image-to-video model's image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import attrs
import torch

from dfm.domain.rng import SampleRNG, Stream


class DenoiserNetwork(Protocol):
    """A denoising network as the diffusion math sees it.

    ``network(x, timestep, text, text_mask) -> out`` with ``x`` and ``out`` of shape ``[B, C, F, H, W]``,
    ``timestep`` ``[B]``, ``text`` ``[B, S, D]`` and ``text_mask`` ``[B, S]`` bool (``True`` for real
    tokens) or ``None``. What ``timestep`` and ``out`` mean is the process's choice: under flow matching
    (WAN 2.1) ``timestep = sigma * num_train_timesteps`` (when sampling: the scheduler's time of each level)
    and ``out`` is the velocity ``eps - x0``; under EDM (DiT) ``timestep = c_noise`` and ``out`` is the raw
    network output ``F``. Whether ``text_mask`` is given at all is the process's ``mask_text_padding``
    (see :func:`network_text_mask`).
    """

    def __call__(
        self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None
    ) -> torch.Tensor: ...


@attrs.frozen(kw_only=True, eq=False)
class NetworkInputs:
    """What a diffusion process gives the network for one training batch (the text is the objective's).

    Attributes:
        x: The network's input ``[B, C, F, H, W]`` (flow matching: ``x_t``; EDM: ``c_in (x0 + sigma n)``).
        timestep: ``[B]`` (flow matching: ``sigma T``; EDM: ``c_noise``).
        text_mask: The text mask the network is given: the batch's when the process masks the padding, else ``None``.
    """

    x: torch.Tensor
    timestep: torch.Tensor
    text_mask: torch.Tensor | None


@attrs.frozen(kw_only=True, eq=False)
class TrainingTerms:
    """What a diffusion process hands to the objective for one batch.

    The objective's per-sample loss is ``weight[b] * mean((prediction[b] - target[b])^2)``.

    Attributes:
        prediction: The network's (preconditioned) prediction, ``[B, C, F, H, W]``.
        target: The regression target, ``[B, C, F, H, W]``, float32.
        weight: The per-sample loss weight, ``[B]``, float32.
    """

    prediction: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


def per_sample_view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values ``[B]`` to ``[B, 1, ..., 1]`` so they broadcast against ``like``.

    Args:
        values: One value per sample, ``[B]``.
        like: A tensor ``[B, ...]`` whose number of dimensions the result matches.

    Returns:
        ``values`` viewed as ``[B] + [1] * (like.ndim - 1)``.
    """
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def network_text_mask(text_mask: torch.Tensor | None, mask_text_padding: bool) -> torch.Tensor | None:
    """The text mask a network is given: ``text_mask`` when padding is masked, else ``None``.

    With ``mask_text_padding`` false the network attends to every one of the ``S`` text tokens, the
    zero padding included, as WAN 2.1 was trained (UMT5 embeddings zero-padded to 512 tokens, no mask in
    cross-attention) and as diffusers' ``WanPipeline`` samples it. Training and sampling both pass their
    mask through here, so a model is sampled with the text conditioning it was trained with.

    Args:
        text_mask: ``[B, S]`` bool, ``True`` for real tokens, or ``None``.
        mask_text_padding: The diffusion process's setting.

    Returns:
        ``text_mask`` or ``None``.
    """
    return text_mask if mask_text_padding else None


def drop_text(
    text: torch.Tensor, p: float, rng: SampleRNG, indices: Sequence[int] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free-guidance text dropout (Ho & Salimans, 2022), decided per sample.

    Sample ``b`` keeps its text when ``r_b >= p``, ``r_b ~ U[0, 1)`` drawn from the ``TEXT_DROPOUT``
    stream of sample ``indices[b]``; otherwise its embedding is replaced by the null text (zeros).

    The text mask is deliberately left as is for dropped samples. All tokens of the null text are
    identical (zero embeddings; after any per-token text embedder they are still identical), so
    attention over any non-empty subset of them yields the same output: keeping the mask is exact, and
    it avoids all-``False`` mask rows, for which a softmax over no keys is undefined (NaN).

    Args:
        text: Text embeddings ``[B, S, D]``.
        p: Probability of dropping a sample's text, in ``[0, 1]``.
        rng: The step's per-sample random streams.
        indices: Global sample indices ``[B]``.

    Returns:
        ``(text, keep)``: the new text ``[B, S, D]`` (same dtype and device) and ``keep`` ``[B]`` bool,
        ``True`` where the sample kept its text.
    """
    r = rng.rand(indices, (), Stream.TEXT_DROPOUT).to(text.device)
    keep = r >= p
    return torch.where(per_sample_view(keep, text), text, torch.zeros_like(text)), keep


def drop_image(
    condition: torch.Tensor,
    image: torch.Tensor,
    p: float,
    rng: SampleRNG,
    indices: Sequence[int] | torch.Tensor,
    *,
    latent_channels: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Classifier-free-guidance dropout of an image-to-video sample's image, decided per sample (optional).

    Sample ``b`` keeps its image when ``r_b >= p``, ``r_b ~ U[0, 1)`` drawn from the ``IMAGE_DROPOUT`` stream of
    sample ``indices[b]``, independently of its text dropout (so a fraction ``p_text p_image`` of the samples
    loses both). With ``p == 0`` nothing is drawn and the inputs are returned as they are: a run without image
    dropout keeps its random streams and losses bit for bit.

    A dropped sample has its image **features** (the CLIP tokens) and its **condition latents** (the VAE latents
    of ``[first frame, zeros..., (last frame)]``) replaced by zeros; its **frame mask** is kept:

    - both carry the picture: zeroing the features alone would leave the given frame (its VAE encoding) in the
      condition latents, and the sample would not be image-unconditional;
    - the mask says which frames are given (the task: the first frame, or the first and the last), not what they
      show; as :func:`drop_text` keeps the text mask, the null condition is zeros in place of the content, always
      the same input, which is what guidance contrasts with (zero latents are the mean of the normalised latent
      space, not a black frame's encoding).

    Wan 2.1's image-to-video training does not drop the image, and generation guides on the text alone (as
    ``WanImageToVideoPipeline``): the option is for fine-tuning a model that also learns the image-free
    prediction (for guidance on the image, or less reliance on it).

    Args:
        condition: The condition channels ``[B, M + C, F, h, w]``: the frame mask (``M`` channels) then the
            condition latents (:func:`~dfm.domain.diffusion.image_condition.condition_channels`).
        image: Image features ``[kB, R, D]`` (``k`` images per sample: 2 for first-last-frame models).
        p: Probability of dropping a sample's image, in ``[0, 1]``.
        rng: The step's per-sample random streams.
        indices: Global sample indices ``[B]``.
        latent_channels: ``C``, the condition latents' channels (the last ``C`` of ``condition``).

    Returns:
        ``(condition, image, keep)``: the new condition and features (same dtypes and devices) and ``keep`` ``[B]``
        bool, ``True`` where the sample kept its image; ``keep`` is ``None`` when ``p == 0`` (nothing drawn).
    """
    if p == 0:
        return condition, image, None
    keep = rng.rand(indices, (), Stream.IMAGE_DROPOUT).to(condition.device) >= p
    latents = condition[:, condition.shape[1] - latent_channels :]
    latents = torch.where(per_sample_view(keep, latents), latents, torch.zeros_like(latents))
    condition = torch.cat([condition[:, : condition.shape[1] - latent_channels], latents], dim=1)
    rows = keep.to(image.device).repeat_interleave(image.shape[0] // keep.shape[0])
    return condition, torch.where(per_sample_view(rows, image), image, torch.zeros_like(image)), keep
