"""Write prepared datasets (the :mod:`dfm.ports.samples` format) for tests: webdataset shards + energon metadata.

A sample is ``tensors.safetensors`` (``latents [C, F, H, W]``, ``text [L, D]``) and ``meta.json``
(:class:`~dfm.ports.samples.SampleMeta`). :func:`write_prepared` writes them into ``.tar`` shards with
webdataset's ``TarWriter`` and then runs energon's Python prepare API (non-interactive) plus the
``.nv-meta/dataset.yaml`` that the ``energon prepare`` CLI would write (``CrudeWebdataset`` with the
``dfm_format`` subflavor): the same layout ``python -m dfm.app.prepare`` produces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import torch
import webdataset as wds
import yaml
from megatron.energon.flavors import BaseWebdatasetFactory
from safetensors.torch import save

from dfm.ports.samples import FORMAT_VERSION, LATENTS, META, TENSORS, TEXT, SampleMeta

SUBFLAVOR = "dfm_format"
"""Subflavor key declared in ``dataset.yaml``; its value is :data:`~dfm.ports.samples.FORMAT_VERSION`."""


@attrs.frozen(kw_only=True)
class FakeSample:
    """One sample as written: its key, tensors and record (for comparing with what a reader yields)."""

    key: str
    latents: torch.Tensor
    text: torch.Tensor
    meta: SampleMeta

    def members(self) -> dict[str, bytes]:
        """The two members (or columns) of the sample, as bytes."""
        tensors = save({LATENTS: self.latents.contiguous(), TEXT: self.text.contiguous()})
        return {TENSORS: tensors, META: self.meta.to_json().encode()}


def make_sample(index: int, latent_shape: Sequence[int], text_len: int, text_dim: int, *, seed: int = 0) -> FakeSample:
    """A sample with random tensors drawn from ``(seed, index)``; the caption names the index."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    shape = tuple(int(s) for s in latent_shape)
    c, f, h, w = shape
    meta = SampleMeta(
        caption=f"sample {index}",
        source=f"clip_{index:05d}.mp4",
        fps=16.0,
        frames=4 * (f - 1) + 1,
        height=8 * h,
        width=8 * w,
        latent_shape=shape,
        text_len=text_len,
        vae="fake-vae",
        text_encoder="fake-text",
        latents_mean=(0.0,) * c,
        latents_std=(1.0,) * c,
        format_version=FORMAT_VERSION,
    )
    return FakeSample(
        key=f"{index:06d}",
        latents=torch.randn(shape, generator=g),
        text=torch.randn((text_len, text_dim), generator=g),
        meta=meta,
    )


def make_samples(
    n: int,
    *,
    latent_shapes: Sequence[Sequence[int]] = ((4, 2, 4, 6),),
    text_dim: int = 8,
    max_text_len: int = 6,
    seed: int = 0,
) -> list[FakeSample]:
    """``n`` samples; sample ``i`` has ``latent_shapes[i % len]`` and ``1 + i % max_text_len`` tokens."""
    return [
        make_sample(i, latent_shapes[i % len(latent_shapes)], 1 + i % max_text_len, text_dim, seed=seed)
        for i in range(n)
    ]


def write_prepared(
    root: Path,
    samples: Sequence[FakeSample],
    *,
    samples_per_shard: int = 8,
    corrupt: Callable[[FakeSample, dict[str, bytes]], dict[str, bytes]] | None = None,
) -> Path:
    """Write ``samples`` as prepared webdataset shards under ``root``; returns ``root``.

    Args:
        root: Dataset directory (created).
        samples: What to write, in order.
        samples_per_shard: Samples per ``.tar`` shard.
        corrupt: Optional hook that may replace the members of a sample before it is written (to write
            bad samples).
    """
    root.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    for start in range(0, len(samples), samples_per_shard):
        name = f"shard_{start // samples_per_shard:05d}.tar"
        shards.append(name)
        with wds.TarWriter(str(root / name)) as sink:
            for sample in samples[start : start + samples_per_shard]:
                members = sample.members()
                if corrupt is not None:
                    members = corrupt(sample, members)
                sink.write({"__key__": sample.key, **members})
    BaseWebdatasetFactory.prepare_dataset(
        root, shards, split_parts_ratio=[("train", 1.0), ("val", 0.0), ("test", 0.0)], workers=1
    )
    dataset_yaml = {"__module__": "megatron.energon", "__class__": "CrudeWebdataset", "subflavors": {SUBFLAVOR: 1}}
    (root / ".nv-meta" / "dataset.yaml").write_text(yaml.safe_dump(dataset_yaml, sort_keys=False))
    return root
