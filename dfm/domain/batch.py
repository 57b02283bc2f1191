"""The batch that crosses from data sources into the training objective."""

from __future__ import annotations

import attrs
import torch


@attrs.frozen(kw_only=True, eq=False)
class Batch:
    """One (micro-)batch of training samples, already in latent space.

    Attributes:
        latents: Clean latents ``x0`` of shape ``[B, C, F, H, W]``.
        text: Text embeddings of shape ``[B, S, D]`` (padded to a common ``S``).
        sample_index: Global sample indices, ``[B]`` int64. They key every random draw of a sample
            (DESIGN.md rule 2), so any parallel split of the same global batch draws the same noise.
        text_mask: Optional ``[B, S]`` bool mask, ``True`` for real tokens.
        captions: Optional captions, for logging and samples only.
        condition: Image-to-video: the channels that follow the noisy latents in the network's input, the frame
            mask and the condition latents ``[B, 4 + C, F, H, W]``
            (:func:`~dfm.domain.diffusion.image_condition.condition_channels`); never noised.
        image: Image-to-video: the image features ``[B, R, D]`` (first-last-frame: ``[2B, R, D]``).
    """

    latents: torch.Tensor
    text: torch.Tensor
    sample_index: torch.Tensor
    text_mask: torch.Tensor | None = None
    captions: tuple[str, ...] | None = None
    condition: torch.Tensor | None = None
    image: torch.Tensor | None = None

    def __attrs_post_init__(self) -> None:
        b = self.latents.shape[0]
        assert self.latents.ndim == 5, f"latents must be [B, C, F, H, W], got {tuple(self.latents.shape)}"
        assert self.text.ndim == 3 and self.text.shape[0] == b, "text must be [B, S, D]"
        assert self.sample_index.shape == (b,), "sample_index must be [B]"
        assert (self.condition is None) == (self.image is None), "condition and image come together (I2V)"
        assert self.condition is None or self.condition.shape[0] == b, "condition must be [B, C', F, H, W]"

    @property
    def size(self) -> int:
        """Number of samples ``B``."""
        return int(self.latents.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move tensors to ``device`` (and floating tensors to ``dtype`` when given)."""
        mask = None if self.text_mask is None else self.text_mask.to(device)

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return Batch(
            latents=self.latents.to(device=device, dtype=dtype or self.latents.dtype),
            text=self.text.to(device=device, dtype=dtype or self.text.dtype),
            sample_index=self.sample_index.to(device),
            text_mask=mask,
            captions=self.captions,
            condition=move(self.condition),
            image=move(self.image),
        )


@attrs.frozen(kw_only=True, eq=False)
class PackedBatch:
    """Samples of different latent shapes trained as one packed token sequence (:mod:`dfm.domain.packing`).

    Attributes:
        latents: Clean latents ``x0``, one ``[C, F_i, H_i, W_i]`` per sample (shapes may differ).
        text: Text embeddings ``[N, S, D]``, padded to a common ``S`` (see :func:`~dfm.domain.packing.pad_text`).
        sample_index: Global sample indices ``[N]`` int64, keying every random draw as in :class:`Batch`.
        text_mask: Optional ``[N, S]`` bool mask, ``True`` for real tokens (needed when texts were padded).
        captions: Optional captions, for logging and samples only.
    """

    latents: tuple[torch.Tensor, ...] = attrs.field(converter=tuple)
    text: torch.Tensor
    sample_index: torch.Tensor
    text_mask: torch.Tensor | None = None
    captions: tuple[str, ...] | None = None

    def __attrs_post_init__(self) -> None:
        n = len(self.latents)
        if n == 0:
            raise ValueError("a packed batch needs at least one sample")
        if any(x.ndim != 4 or x.shape[0] != self.latents[0].shape[0] for x in self.latents):
            raise ValueError(f"packed latents must be [C, F, H, W] each, got {[tuple(x.shape) for x in self.latents]}")
        assert self.text.ndim == 3 and self.text.shape[0] == n, "text must be [N, S, D]"
        assert self.sample_index.shape == (n,), "sample_index must be [N]"
        assert self.text_mask is None or self.text_mask.shape == self.text.shape[:2], "text_mask must be [N, S]"

    @property
    def size(self) -> int:
        """Number of samples ``N``."""
        return len(self.latents)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedBatch:
        """Move tensors to ``device`` (and floating tensors to ``dtype`` when given)."""
        return PackedBatch(
            latents=tuple(x.to(device=device, dtype=dtype or x.dtype) for x in self.latents),
            text=self.text.to(device=device, dtype=dtype or self.text.dtype),
            sample_index=self.sample_index.to(device),
            text_mask=None if self.text_mask is None else self.text_mask.to(device),
            captions=self.captions,
        )


@attrs.frozen(kw_only=True)
class BatchLayout:
    """How one optimizer step's samples split: ``G = n m W``.

    A global batch of ``G`` samples is shared by ``W`` data-parallel ranks, each running ``n`` micro-batches
    of ``m`` samples. Sample indices are global: micro-batch ``j`` of rank ``r`` at step ``k`` holds
    ``[k G + r G / W + j m, k G + r G / W + (j + 1) m)``, so any split of the same global batch sees the same
    samples (and, keyed by index, the same noise).

    Raises:
        ValueError: A size below 1, or ``G`` not a multiple of ``m W`` (naming the numbers).
    """

    global_batch_size: int
    """``G``: samples per optimizer step over every rank and micro-batch."""
    micro_batch_size: int
    """``m``: samples per forward/backward on one rank."""
    world: int = 1
    """``W``: data-parallel ranks."""

    def __attrs_post_init__(self) -> None:
        for name, value in (("global_batch_size", self.global_batch_size), ("micro_batch_size", self.micro_batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.world < 1:
            raise ValueError(f"need world >= 1, got world={self.world}")
        per_step = self.micro_batch_size * self.world
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by micro_batch_size * world = "
                f"{self.micro_batch_size} * {self.world} = {per_step}; choose a global batch that is a multiple "
                f"of {per_step}"
            )

    @property
    def micro_batches(self) -> int:
        """``n = G / (m W)``: micro-batches per rank and step."""
        return self.global_batch_size // (self.micro_batch_size * self.world)

    def check_rank(self, rank: int) -> None:
        """``ValueError`` unless ``0 <= rank < W``."""
        if not 0 <= rank < self.world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={self.world}")

    def first_index(self, step: int, rank: int = 0, micro: int = 0) -> int:
        """Global index of the first sample of micro-batch ``micro`` of ``rank`` at ``step``."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return (
            step * self.global_batch_size
            + rank * (self.global_batch_size // self.world)
            + micro * self.micro_batch_size
        )

    def sample_indices(self, step: int, rank: int = 0) -> list[list[int]]:
        """The global sample indices of each of ``rank``'s ``n`` micro-batches at ``step``."""
        self.check_rank(rank)
        m = self.micro_batch_size
        return [
            list(range(start, start + m))
            for start in (self.first_index(step, rank, j) for j in range(self.micro_batches))
        ]
