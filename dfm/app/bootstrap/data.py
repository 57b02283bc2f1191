"""The composition root's data: the data source a config names, its batch layout, and the prepared-data tools."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from dfm.adapters.synthetic import (
    MockLatentSource,
    SyntheticVideoSource,
)
from dfm.app.bootstrap.codecs import build_image_encoder, latent_shape
from dfm.app.config import ConfigError, TrainConfig
from dfm.domain.batch import BatchLayout
from dfm.domain.specs import IMAGE_TOKENS, ModelSpec
from dfm.ports.codecs import LatentCodec, TextEncoder
from dfm.ports.data import DataSource
from dfm.ports.runtime import Topology
from dfm.ports.samples import ImageCondition


def batch_layout(cfg: TrainConfig, dp_size: int) -> BatchLayout:
    """How ``cfg``'s global batch splits over ``dp_size`` data-parallel ranks (:func:`check_batch_layout` says
    why one does not, in terms of the config keys)."""
    t = cfg.train
    return BatchLayout(global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size, world=dp_size)


def check_batch_layout(cfg: TrainConfig, dp_size: int) -> None:
    """The global batch must split into whole micro-batches on every data-parallel rank (any data source).

    Raises:
        ConfigError: Naming ``train.global_batch_size`` and ``train.micro_batch_size`` (and the data-parallel
            size when it is more than 1).
    """
    try:
        batch_layout(cfg, dp_size)
        return
    except ValueError:
        pass
    t = cfg.train
    per_step = t.micro_batch_size * dp_size
    if dp_size == 1:
        raise ConfigError(
            f"train.global_batch_size: {t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size}; set train.global_batch_size to a multiple of {t.micro_batch_size} "
            "or change train.micro_batch_size"
        )
    raise ConfigError(
        f"train.global_batch_size: {t.global_batch_size} is not divisible by train.micro_batch_size x "
        f"data-parallel size = {t.micro_batch_size} x {dp_size} = {per_step}; set train.global_batch_size to a "
        f"multiple of {per_step}, or change train.micro_batch_size or the data-parallel size "
        "(parallel.data_replicate x parallel.data_shard = processes / (parallel.tensor x parallel.context x "
        "parallel.pipeline))"
    )


def build_data_source(cfg: TrainConfig, topology: Topology, codec: LatentCodec | None, text: TextEncoder) -> DataSource:
    """This rank's data source.

    Raises:
        ConfigError: Naming the key at fault: the batch sizes (:func:`check_batch_layout`), ``data.path``.
    """
    check_batch_layout(cfg, topology.dp_size)
    d, t = cfg.data, cfg.train
    common = {
        "global_batch_size": t.global_batch_size,
        "micro_batch_size": t.micro_batch_size,
        "seed": cfg.seed,
        "rank": topology.dp_rank,
        "world": topology.dp_size,
    }
    if d.source == "synthetic":
        return SyntheticVideoSource(
            frames=d.frames,
            height=d.height,
            width=d.width,
            text_len=d.text_len,
            codec=codec,
            text_encoder=text,
            background=d.synthetic.background,
            placement=d.synthetic.placement,
            radius=d.synthetic.radius,
            image_encoder=build_image_encoder(cfg) if getattr(cfg.model, "image_to_video", False) else None,
            **common,
        )
    if d.source == "mock":
        return MockLatentSource(
            latent_shape=latent_shape(cfg, codec),
            text_len=d.text_len,
            text_dim=cfg.model.text_dim,
            **_mock_image_condition(cfg),
            **common,
        )
    return _prepared_source(cfg, common)


def _check_packing(cfg: TrainConfig) -> None:
    """Packed batches need a network call on a whole packed sequence: refuse the layouts that split it."""
    d, p = cfg.data, cfg.parallel
    if not d.packing:
        return
    if d.source != "energon":
        raise ConfigError(f"data.packing: only data.source=energon packs samples, not {d.source!r}")
    if cfg.runtime == "megatron" or p.context > 1:
        raise ConfigError(
            "data.packing: packed sequences run on runtime local or fsdp2 without context parallelism "
            f"(runtime={cfg.runtime}, parallel.context={p.context}); set data.packing=false"
        )
    if getattr(cfg.model, "image_to_video", False):
        raise ConfigError(
            "data.packing: packed batches carry no image-to-video condition (model.image_dim is set); "
            "set data.packing=false"
        )


def image_condition(spec: ModelSpec) -> ImageCondition | None:
    """What an image-to-video ``spec`` reads beside the latents, for the readers of prepared data (``None`` for a
    text-to-video model): first frame, or first and last (``pos_embed_seq_len`` set, which also fixes the image
    tokens to half of it); the frame mask's channels ``in_channels - 2 out_channels``; ``image_dim``."""
    if not getattr(spec, "image_to_video", False):
        return None
    flf = getattr(spec, "pos_embed_seq_len", None)
    return ImageCondition(
        kind="first" if flf is None else "first_last",
        temporal_stride=spec.in_channels - 2 * spec.out_channels,
        image_dim=int(getattr(spec, "image_dim", 0)),
        image_tokens=None if flf is None else flf // 2,
    )


def _prepared_source(cfg: TrainConfig, common: dict[str, Any]) -> DataSource:
    """``energon`` or ``hf_datasets``: samples written by ``python -m dfm.app.prepare`` (the data extra)."""
    d = cfg.data
    try:
        return open_prepared_source(
            d.source,
            Path(d.path),
            text_len=d.text_len,
            text_dim=cfg.model.text_dim,
            strict=d.strict,
            num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer,
            max_samples_per_sequence=d.max_samples_per_sequence,
            packing=d.packing,
            image_condition=image_condition(cfg.model),
            **common,
        )
    except ValueError as exc:
        raise ConfigError(f"data.path: {exc}") from None


def open_prepared_source(
    source: str,
    path: Path,
    *,
    num_workers: int = 2,
    shuffle_buffer: int = 100,
    max_samples_per_sequence: int = 100,
    packing: bool = False,
    **common: Any,
) -> DataSource:
    """A prepared data set (``energon`` shards or an ``hf_datasets`` copy) as a data source; ``common`` holds the
    batch layout (``global_batch_size``, ``micro_batch_size``, ``seed``, ``rank``, ``world``), ``text_len``,
    ``text_dim``, ``strict`` and, for an image-to-video model, ``image_condition`` (:func:`image_condition`). The
    energon options are ignored for ``hf_datasets``.

    Raises:
        ValueError: For a directory that is not such a data set, or a layout it cannot serve.
    """
    if source == "energon":
        from dfm.adapters.energon import EnergonSource

        return EnergonSource(
            path,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            max_samples_per_sequence=max_samples_per_sequence,
            packing=packing,
            **common,
        )
    from dfm.adapters.hf_datasets import HFDatasetSource

    return HFDatasetSource(path, **common)


def energon_writer() -> ModuleType:
    """The energon shard writer of ``python -m dfm.app.prepare`` (:mod:`dfm.adapters.energon.writer`; the data
    extra, imported on use): ``ShardWriter``, ``finished_shards``, ``next_shard_index``, ``remove_unfinished``,
    ``write_energon_metadata``."""
    from dfm.adapters.energon import writer

    return writer


def write_fake_dataset(root: Path, samples: int, **options: Any) -> Path:
    """Random samples as prepared energon shards (:func:`dfm.adapters.energon.write_fake_dataset`; the data extra)."""
    from dfm.adapters.energon import write_fake_dataset as write

    return write(root, samples, **options)


def webdataset_to_hf(shards: Path, out: Path) -> int:
    """Prepared shards as a Hugging Face dataset (:func:`dfm.adapters.hf_datasets.webdataset_to_hf`; the data extra)."""
    from dfm.adapters.hf_datasets import webdataset_to_hf as convert

    return convert(shards, out)


def _mock_image_condition(cfg: TrainConfig) -> dict[str, Any]:
    """``condition_channels`` and ``image_shape`` of mock data for an image-to-video model (else nothing)."""
    spec = cfg.model
    if not getattr(spec, "image_to_video", False):
        return {}
    images = 2 if spec.pos_embed_seq_len is not None else 1
    return {
        "condition_channels": spec.in_channels - spec.out_channels,
        "image_shape": (images, IMAGE_TOKENS, spec.image_dim),
    }


def check_model_fits_data(spec: ModelSpec, shape: tuple[int, int, int, int]) -> None:
    """A clear error when the latents do not fit the network."""
    c, f, h, w = shape
    if getattr(spec, "image_to_video", False):  # its input: noisy latents, frame mask, condition latents
        if c != spec.out_channels or spec.in_channels <= 2 * c:
            raise ConfigError(
                f"model: an image-to-video model of {c}-channel latents needs out_channels={c} and in_channels = "
                f"2 x {c} + the frame mask's channels (the VAE's temporal stride); got {spec.in_channels} / "
                f"{spec.out_channels}"
            )
    elif c != spec.in_channels:
        raise ConfigError(f"model.in_channels: is {spec.in_channels}, but the data's latents have {c} channels")
    pt, ph, pw = spec.patch_size
    if f % pt or h % ph or w % pw:
        raise ConfigError(f"data: latent {f}x{h}x{w} is not divisible by model.patch_size {tuple(spec.patch_size)}")
