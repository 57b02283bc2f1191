"""Write prepared data sets of random samples (benchmarks), in the format ``python -m dfm.app.prepare`` writes.

:func:`write_shards` puts samples (member name -> bytes) into webdataset ``.tar`` shards with
webdataset's ``TarWriter``, indexes them with energon's prepare API (all samples in the ``train`` split)
and writes the ``.nv-meta/dataset.yaml`` the ``energon prepare`` CLI would write: a ``CrudeWebdataset``
with the ``dfm_format`` subflavor. :func:`write_fake_dataset` fills it with random latents and text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
import yaml
from megatron.energon.flavors import BaseWebdatasetFactory

from dfm.adapters.energon.task_encoder import SUBFLAVOR
from dfm.adapters.formats.samples import encode_sample
from dfm.ports.samples import CONDITION_IMAGES, FORMAT_VERSION, ConditionKind, SampleMeta

WAN_480P_LATENTS = (16, 21, 60, 104)
"""Latents ``[C, F, H, W]`` of an 81-frame 480 x 832 clip through the WAN 2.1 VAE (stride 4 x 8 x 8)."""
WAN_TEXT = (512, 4096)
"""UMT5-XXL embeddings ``[L, D]`` of WAN 2.1 at the full 512 tokens."""
CLIP_FEATURES = (257, 1280)
"""CLIP ViT-H/14 penultimate features ``[R, D]`` of one image (WAN 2.1 I2V's image encoder)."""


def write_shards(
    root: Path, samples: Iterable[tuple[str, Mapping[str, bytes]]], *, samples_per_shard: int = 64, workers: int = 2
) -> list[str]:
    """Write ``(key, members)`` samples as prepared shards under ``root``; returns the shard names."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    root.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    sink: wds.TarWriter | None = None
    try:
        for i, (key, members) in enumerate(samples):
            if i % samples_per_shard == 0:
                if sink is not None:
                    sink.close()
                shards.append(f"shard_{len(shards):06d}.tar")
                sink = wds.TarWriter(str(root / shards[-1]))
            assert sink is not None
            sink.write({"__key__": key, **members})
    finally:
        if sink is not None:
            sink.close()
    if not shards:
        raise ValueError("no samples to write")
    BaseWebdatasetFactory.prepare_dataset(
        root,
        shards,
        split_parts_ratio=[("train", 1.0), ("val", 0.0), ("test", 0.0)],
        workers=max(1, min(workers, len(shards))),
    )
    declared = {
        "__module__": "megatron.energon",
        "__class__": "CrudeWebdataset",
        "subflavors": {SUBFLAVOR: FORMAT_VERSION},
    }
    (root / ".nv-meta" / "dataset.yaml").write_text(yaml.safe_dump(declared, sort_keys=False))
    return shards


def fake_members(
    index: int,
    latent_shape: Sequence[int],
    text_shape: Sequence[int],
    *,
    seed: int,
    dtype: torch.dtype,
    image_condition: ConditionKind | None = None,
    image_shape: Sequence[int] = CLIP_FEATURES,
) -> dict[str, bytes]:
    """The two members of random sample ``index`` (values from ``(seed, index)``); with ``image_condition``, an
    image-to-video sample (random condition latents of the latents' shape, random image features ``[n, R, D]``
    for ``image_shape`` ``(R, D)``)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    c, f, h, w = (int(s) for s in latent_shape)
    latents = torch.randn((c, f, h, w), generator=g).to(dtype)
    text = torch.randn(tuple(int(s) for s in text_shape), generator=g).to(dtype)
    i2v: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    if image_condition is not None:
        images = (CONDITION_IMAGES[image_condition], *(int(s) for s in image_shape))
        i2v = {"condition": image_condition, "image_encoder": "fake", "image_shape": images}
        tensors = {
            "condition": torch.randn((c, f, h, w), generator=g).to(dtype),
            "image": torch.randn(images, generator=g).to(dtype),
        }
    meta = SampleMeta(
        caption=f"random sample {index}",
        source=f"fake/{index:08d}",
        fps=16.0,
        frames=4 * (f - 1) + 1,
        height=8 * h,
        width=8 * w,
        latent_shape=(c, f, h, w),
        text_len=int(text_shape[0]),
        vae="fake",
        text_encoder="fake",
        latents_mean=(0.0,) * c,
        latents_std=(1.0,) * c,
        **i2v,
    )
    return encode_sample(latents, text, meta, **tensors)


def write_fake_dataset(
    root: str | Path,
    samples: int,
    *,
    latent_shape: Sequence[int] = WAN_480P_LATENTS,
    text_shape: Sequence[int] = WAN_TEXT,
    seed: int = 0,
    dtype: str = "float32",
    samples_per_shard: int = 64,
    image_condition: ConditionKind | None = None,
    image_shape: Sequence[int] = CLIP_FEATURES,
) -> Path:
    """Write ``samples`` random samples as a prepared data set under ``root`` (default: 480p WAN latents).

    Args:
        root: Output directory.
        samples: How many samples.
        latent_shape: ``[C, F, H, W]`` of every sample.
        text_shape: ``[L, D]`` of every sample's text embeddings.
        seed: Values of sample ``i`` are drawn from ``(seed, i)``.
        dtype: ``float32`` or ``bfloat16``.
        samples_per_shard: Samples per ``.tar`` shard.
        image_condition: ``first`` or ``first_last``: image-to-video samples, as ``prepare --image-condition``
            writes them (random condition latents and image features).
        image_shape: ``[R, D]`` of each conditioning image's features (default: CLIP ViT-H/14's 257 x 1280).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    root = Path(root)
    rows = (
        (
            f"{i:08d}",
            fake_members(
                i,
                latent_shape,
                text_shape,
                seed=seed,
                dtype=torch_dtype,
                image_condition=image_condition,
                image_shape=image_shape,
            ),
        )
        for i in range(samples)
    )
    write_shards(root, rows, samples_per_shard=samples_per_shard)
    return root
