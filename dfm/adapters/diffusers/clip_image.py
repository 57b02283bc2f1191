"""The image encoder of WAN 2.1 image-to-video (transformers ``CLIPVisionModel``, ViT-H/14) as an
:class:`~dfm.ports.codecs.ImageEncoder`.

Images are embedded as diffusers' ``WanImageToVideoPipeline.encode_image`` embeds them: ``CLIPImageProcessor``
(resize, center crop to 224, CLIP's normalisation), then the vision tower, whose penultimate hidden states
``[N, 257, 1280]`` (256 patches and the class token) are the features. Weights and processor load from local
directories: a model root holding ``image_encoder/`` (and ``image_processor/``), or the encoder directory itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dfm.adapters.diffusers.wan_vae import directory_identity, read_config, resolve_device, resolve_dtype, weight_files


def resolve_image_encoder_dirs(path: str | Path) -> tuple[Path, Path]:
    """``(encoder, processor)`` directories of ``path`` (a model root with ``image_encoder/`` or the encoder).

    The processor is ``image_processor/`` beside the encoder in a model root, else the encoder directory.

    Raises:
        ValueError: Naming the path and the expected layout.
    """
    root = Path(path).expanduser()
    encoder = root / "image_encoder" if (root / "image_encoder").is_dir() else root
    config = read_config(encoder) if encoder.is_dir() else None
    if config is None or not weight_files(encoder):
        raise ValueError(
            f"{path}: not a CLIP image encoder (expected config.json and safetensors weights of a transformers "
            "CLIPVisionModel, or a model root holding image_encoder/)"
        )
    processor = root / "image_processor" if (root / "image_processor").is_dir() else encoder
    return encoder, processor


class CLIPImageEncoder:
    """CLIP vision features of images (see the module docstring).

    Args:
        path: Model root or encoder directory.
        device: Where the encoder runs.
        dtype: ``fp32`` or ``bf16``.

    Raises:
        ValueError: A directory that is not a CLIP vision model.
    """

    def __init__(self, path: str | Path, *, device: str = "cpu", dtype: str = "fp32") -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModel

        encoder, processor = resolve_image_encoder_dirs(path)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.model: Any = CLIPVisionModel.from_pretrained(encoder, local_files_only=True, torch_dtype=self.dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self.processor: Any = CLIPImageProcessor.from_pretrained(processor, local_files_only=True)
        self.dim = int(self.model.config.hidden_size)
        self.identity = directory_identity(encoder)

    @torch.no_grad()
    def encode(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """uint8 images ``[H, W, 3]`` -> penultimate hidden states ``[N, R, dim]`` (float32, on the CPU).

        Raises:
            ValueError: An image that is not uint8 ``[H, W, 3]``.
        """
        for image in images:
            if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"images must be uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
        inputs = self.processor(images=[image.numpy() for image in images], return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden[-2].float().cpu()

    def __repr__(self) -> str:
        return f"CLIPImageEncoder({self.identity})"
