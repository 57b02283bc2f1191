"""WAN 2.1 image-to-video conditioning, as diffusers' ``WanImageToVideoPipeline`` builds it.

The network reads ``36 = 16 + 4 + 16`` channels: the noisy latents ``x``, a frame mask ``m`` and the condition
latents ``c``. ``c`` is the VAE encoding of the video ``[first frame, zeros..., (last frame)]``; ``m`` marks the
given frames with ones in pixel-frame resolution (``1 + 4 (F - 1)`` frames, the first one repeated 4 times as
the causal VAE's first latent frame covers one pixel frame) folded into 4 channels per latent frame. The image
features (CLIP ViT-H/14's penultimate hidden states of the first frame, or of both) reach the network apart.
Neither is noised; classifier-free guidance changes only the text.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def condition_pixels(first: Tensor, frames: int, last: Tensor | None = None) -> Tensor:
    """The video the VAE encodes into condition latents: ``first`` ``[B, 3, H, W]`` then zeros (then ``last``).

    Returns:
        ``[B, 3, frames, H, W]``, in the range of the frames (``[-1, 1]``).

    Raises:
        ValueError: Fewer than two frames with a ``last`` frame, or frames of other shapes.
    """
    if last is not None and (last.shape != first.shape or frames < 2):
        raise ValueError(f"a last frame needs frames >= 2 and the first frame's shape {tuple(first.shape)}")
    given = [first.unsqueeze(2)] + ([last.unsqueeze(2)] if last is not None else [])
    zeros = first.new_zeros(first.shape[0], first.shape[1], frames - len(given), *first.shape[2:])
    return torch.cat([given[0], zeros, *given[1:]], dim=2)


def frame_mask(
    batch: int, frames: int, latent_size: tuple[int, int], temporal_stride: int, *, last: bool = False
) -> Tensor:
    """The mask channels ``[B, temporal_stride, F, h, w]``: ones at the given pixel frames, folded per latent frame.

    ``frames`` pixel frames (``1 + temporal_stride (F - 1)``); the first (and with ``last`` the last) is given.
    """
    h, w = latent_size
    mask = torch.zeros(batch, 1, frames, h, w)
    mask[:, :, 0] = 1
    if last:
        mask[:, :, frames - 1] = 1
    first = mask[:, :, :1].repeat_interleave(temporal_stride, dim=2)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)
    return mask.view(batch, -1, temporal_stride, h, w).transpose(1, 2)


def condition_channels(mask: Tensor, latents: Tensor) -> Tensor:
    """``[mask, condition latents]`` along channels: what follows the noisy latents in the network's input."""
    return torch.cat([mask.to(latents), latents], dim=1)


class ImageConditioned(nn.Module):
    """A WAN image-to-video network with its image condition bound: ``(x, t, text, mask) -> network(...)``.

    It takes what a text-to-video network takes, so samplers and guidance use it unchanged: the condition
    channels are appended to ``x`` and the image features passed beside the text; both are repeated over the
    batch when ``x`` holds several copies of the conditioned samples (the doubled batch of guidance, or several
    prompts of one image).

    Args:
        network: The image-to-video network (``forward(x, t, text, text_mask, image=...)``).
        condition: ``[B, 4 + C, F, h, w]`` (:func:`condition_channels`).
        image: Image features ``[B, R, d]`` (first-last-frame: ``[2B, R, d]``).
    """

    def __init__(self, network: nn.Module, condition: Tensor, image: Tensor) -> None:
        super().__init__()
        self.network, self.condition, self.image = network, condition, image

    def forward(self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """The network's output for ``x`` ``[nB, C, F, h, w]`` with the condition of each of its ``B`` samples."""
        copies, rest = divmod(x.shape[0], self.condition.shape[0])
        if rest:
            raise ValueError(f"a batch of {x.shape[0]} is not a multiple of the {self.condition.shape[0]} conditions")
        condition = self.condition.to(x).repeat(copies, 1, 1, 1, 1)
        image = self.image.repeat(copies, 1, 1)
        return self.network(torch.cat([x, condition], dim=1), timestep, text, text_mask, image=image)
