"""Write prepared datasets (the :mod:`dfm.ports.samples` format) for tests: webdataset shards + energon metadata.

A sample is ``tensors.safetensors`` (``latents [C, F, H, W]``, ``text [L, D]``; image-to-video samples also
``condition [C, F, H, W]`` and ``image [n, R, D']``) and ``meta.json`` (:class:`~dfm.ports.samples.SampleMeta`).
:func:`write_prepared` writes them with the writer of ``python -m dfm.app.bench data --make-fake``
(:func:`dfm.adapters.energon.fake.write_shards`: webdataset ``.tar`` shards, energon's prepare API and the
``.nv-meta/dataset.yaml`` the ``energon prepare`` CLI would write): the layout ``python -m dfm.app.prepare``
produces. What is the tests' own is the samples: shapes and text lengths that vary, image conditions, and a hook
that corrupts some.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import torch

from dfm.adapters.energon.fake import write_shards
from dfm.adapters.energon.task_encoder import SUBFLAVOR
from dfm.adapters.formats.samples import encode_sample
from dfm.ports.samples import CONDITION_IMAGES, FORMAT_VERSION, ConditionKind, SampleMeta

__all__ = ["SUBFLAVOR", "FakeSample", "make_sample", "make_samples", "write_prepared"]


@attrs.frozen(kw_only=True)
class FakeSample:
    """One sample as written: its key, tensors and record (for comparing with what a reader yields)."""

    key: str
    latents: torch.Tensor
    text: torch.Tensor
    meta: SampleMeta
    condition: torch.Tensor | None = None
    image: torch.Tensor | None = None

    def members(self) -> dict[str, bytes]:
        """The two members (or columns) of the sample, as bytes."""
        return encode_sample(self.latents, self.text, self.meta, condition=self.condition, image=self.image)


def make_sample(
    index: int,
    latent_shape: Sequence[int],
    text_len: int,
    text_dim: int,
    *,
    seed: int = 0,
    condition: ConditionKind | None = None,
    image_shape: tuple[int, int] = (5, 12),
    temporal_stride: int = 4,
) -> FakeSample:
    """A sample with random tensors drawn from ``(seed, index)``; the caption names the index.

    ``condition`` adds random condition latents (the latents' shape) and image features ``[n, *image_shape]``
    (``n`` = 1 or 2 by the kind); ``temporal_stride`` sets the recorded pixel frames ``1 + stride (F - 1)``.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    shape = tuple(int(s) for s in latent_shape)
    c, f, h, w = shape
    images = None if condition is None else (CONDITION_IMAGES[condition], *image_shape)
    meta = SampleMeta(
        caption=f"sample {index}",
        source=f"clip_{index:05d}.mp4",
        fps=16.0,
        frames=temporal_stride * (f - 1) + 1,
        height=8 * h,
        width=8 * w,
        latent_shape=shape,
        text_len=text_len,
        vae="fake-vae",
        text_encoder="fake-text",
        latents_mean=(0.0,) * c,
        latents_std=(1.0,) * c,
        format_version=FORMAT_VERSION,
        condition=condition,
        image_encoder=None if condition is None else "fake-clip",
        image_shape=images,
    )
    return FakeSample(
        key=f"{index:06d}",
        latents=torch.randn(shape, generator=g),
        text=torch.randn((text_len, text_dim), generator=g),
        meta=meta,
        condition=None if condition is None else torch.randn(shape, generator=g),
        image=None if images is None else torch.randn(images, generator=g),
    )


def make_samples(
    n: int,
    *,
    latent_shapes: Sequence[Sequence[int]] = ((4, 2, 4, 6),),
    text_dim: int = 8,
    max_text_len: int = 6,
    seed: int = 0,
    **condition: object,
) -> list[FakeSample]:
    """``n`` samples; sample ``i`` has ``latent_shapes[i % len]`` and ``1 + i % max_text_len`` tokens (``condition``:
    :func:`make_sample`'s image-to-video options)."""
    return [
        make_sample(i, latent_shapes[i % len(latent_shapes)], 1 + i % max_text_len, text_dim, seed=seed, **condition)
        for i in range(n)
    ]


def write_prepared(
    root: Path,
    samples: Sequence[FakeSample],
    *,
    samples_per_shard: int = 8,
    corrupt: Callable[[FakeSample, dict[str, bytes]], dict[str, bytes]] | None = None,
) -> Path:
    """Write ``samples`` as prepared webdataset shards under ``root`` with dfm's own shard writer; returns ``root``.

    Args:
        root: Dataset directory (created).
        samples: What to write, in order.
        samples_per_shard: Samples per ``.tar`` shard (``shard_000000.tar``, ``shard_000001.tar``, ...).
        corrupt: Optional hook that may replace the members of a sample before it is written (to write
            bad samples).
    """
    rows = ((s.key, s.members() if corrupt is None else corrupt(s, s.members())) for s in samples)
    write_shards(root, rows, samples_per_shard=samples_per_shard, workers=1)
    return root
