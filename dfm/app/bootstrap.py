"""The composition root: the one place that turns a resolved config into adapters.

Services receive ports; only this module knows which adapter implements which port.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import torch
import yaml

# The technology the services and CLIs use, named here so that the composition root is the one place that
# imports adapters (an import-linter contract in pyproject.toml keeps services and CLIs off dfm.adapters).
from dfm.adapters.checkpoint import DCPCheckpointStore, is_checkpoint_dir, read_meta
from dfm.adapters.diffusers import (  # diffusers loads on use
    CONFIG_NAME,
    UMT5TextEncoder,
    WanVAECodec,
    export_wan_distributed,
    load_wan_diffusers,
    save_random_wan_vae,
)
from dfm.adapters.diffusers.clip_image import CLIPImageEncoder
from dfm.adapters.diffusers.lora import merge_adapters, read_lora_file, write_lora_file
from dfm.adapters.diffusers.wan_weights import save_wan_diffusers
from dfm.adapters.formats.samples import encode_sample
from dfm.adapters.fsdp2 import FSDP2Runtime
from dfm.adapters.local import LocalRuntime, resolve_device
from dfm.adapters.synthetic import (
    HashTextEncoder,
    IdentityPixelCodec,
    MockLatentSource,
    PatchImageEncoder,
    SyntheticVideoSource,
)
from dfm.adapters.synthetic.videos import describe as describe_clip
from dfm.adapters.synthetic.videos import render as render_clip
from dfm.adapters.torch_dist import DistEnv, all_gather_json, init_process_group
from dfm.adapters.torch_dist import destroy as destroy_process_group
from dfm.adapters.torch_dist.devices import device_type
from dfm.adapters.torch_dist.lora import adapter_key, adapter_template, from_adapter_key
from dfm.adapters.torch_dist.parallel_sampling import (
    SamplingLayout,
    choose_layout,
    sampling_ranks,
    use_local_device,
)
from dfm.adapters.tracking import (
    FanOutMetricsSink,
    JsonlMetricsSink,
    NullMetricsSink,
    TensorBoardMetricsSink,
    WandbMetricsSink,
    read_metrics,
    save_curves_png,
    write_text_atomic,
)
from dfm.adapters.video import Mp4Writer, contact_sheet, save_png, to_uint8_frames
from dfm.adapters.video.clips import BUCKET_PRESETS, ClipError, ClipOptions, is_media_file, load_clip
from dfm.adapters.video.images import load_image
from dfm.app.config import ConfigError, ParallelConfig, TrainConfig, config_to_yaml
from dfm.domain.batch import BatchLayout
from dfm.domain.specs import IMAGE_TOKENS, LatentSpec, ModelSpec, WanSpec
from dfm.ports.checkpoint import CheckpointStore
from dfm.ports.codecs import ImageEncoder, LatentCodec, TextEncoder
from dfm.ports.data import DataSource
from dfm.ports.runtime import OptimizerSettings, ParallelRuntime, Topology
from dfm.ports.tracking import MetricsSink

__all__ = [
    "BUCKET_PRESETS",
    "CONFIG_NAME",
    "ClipError",
    "ClipOptions",
    "DistEnv",
    "Mp4Writer",
    "SamplingLayout",
    "adapter_key",
    "adapter_template",
    "all_gather_json",
    "choose_layout",
    "contact_sheet",
    "describe_clip",
    "destroy_process_group",
    "encode_sample",
    "export_wan_distributed",
    "from_adapter_key",
    "init_process_group",
    "is_checkpoint_dir",
    "is_media_file",
    "load_clip",
    "load_image",
    "load_wan_diffusers",
    "merge_adapters",
    "read_lora_file",
    "read_meta",
    "read_metrics",
    "render_clip",
    "resolve_device",
    "sampling_ranks",
    "save_curves_png",
    "save_png",
    "save_random_wan_vae",
    "save_wan_diffusers",
    "to_uint8_frames",
    "use_local_device",
    "write_lora_file",
    "write_text_atomic",
]


def build_runtime(cfg: TrainConfig, device: str = "auto") -> ParallelRuntime:
    """The runtime named by ``cfg.runtime``, with the ``train.*`` knobs (and ``parallel.*`` sizes for ``fsdp2``).

    ``fsdp2`` joins (or, in a lone process, creates) the process group and builds its device mesh here,
    so the topology is known before the data source is built.
    """
    _check_packing(cfg)  # before any process group exists
    check_batch_layout(cfg, 1)  # global % micro; the data-parallel size is checked with the data source
    t = cfg.train
    knobs = {
        "device": device,
        "precision": t.precision,
        "grad_clip": t.grad_clip,
        "ema_decay": t.ema_decay,
        "activation_checkpointing": t.activation_checkpointing,
        "activation_checkpointing_every_k": t.activation_checkpointing_every_k,
        "attention_backend": t.attention_backend,
        "seed": cfg.seed,
    }
    if t.fp8 and cfg.runtime == "megatron":
        raise ConfigError(
            "train.fp8: the megatron runtime has no FP8 path (megatron's FP8 needs Transformer Engine, which dfm "
            "does not use); use runtime=fsdp2 or runtime=local, or set train.fp8=false"
        )
    if getattr(cfg.model, "image_to_video", False) and cfg.runtime == "megatron":
        raise ConfigError(
            "model.image_dim: the megatron runtime trains text-to-video models only; use runtime=fsdp2 or "
            "runtime=local for image-to-video"
        )
    if cfg.lora.enabled and cfg.runtime == "megatron":
        raise ConfigError(
            "lora.rank: the megatron runtime does not train LoRA adapters; use runtime=fsdp2 (data, tensor and "
            "context parallel) or runtime=local, or unset lora.rank for full training"
        )
    lora = cfg.lora.settings()
    if lora is not None:
        try:
            adapter_template(cfg.model, lora)  # the targets against the network, on the meta device
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if cfg.runtime == "local":
        try:
            return LocalRuntime(**knobs, fp8=t.fp8, lora=lora)
        except ValueError as exc:  # the messages name the train.* keys
            raise ConfigError(str(exc)) from None
    if cfg.runtime == "fsdp2":
        p = cfg.parallel
        sizes = {
            "data_replicate": p.data_replicate,
            "data_shard": p.data_shard,
            "context": p.context,
            "tensor": p.tensor,
            "pipeline": p.pipeline,
        }
        try:
            runtime = FSDP2Runtime(**sizes, compile=t.compile, fp8=t.fp8, lora=lora, **knobs)
            runtime.check_model(cfg.model)
        except ValueError as exc:  # the messages name the parallel.* / train.* keys
            raise ConfigError(str(exc)) from None
        return runtime
    if cfg.runtime == "megatron":
        return _megatron_runtime(cfg, knobs)
    raise ConfigError(f"runtime: {cfg.runtime!r} is unknown; use local, fsdp2 or megatron")


def check_training_config(cfg: TrainConfig) -> None:
    """Checks of a config that is about to train (not of one read back from a checkpoint to load it).

    Raises:
        ConfigError: ``parallel.*`` keys set to other values than their defaults under ``runtime=local``
            (one process: the layout would be silently ignored), one line per key.
    """
    if cfg.runtime != "local":
        return
    p, default = cfg.parallel, ParallelConfig()
    changed = [a.name for a in attrs.fields(ParallelConfig) if getattr(p, a.name) != getattr(default, a.name)]
    if changed:
        raise ConfigError(
            [
                f"parallel.{name}: is {getattr(p, name)!r}, but runtime=local runs one process and has "
                f"no parallel layout; use runtime=fsdp2 or runtime=megatron, or remove parallel.{name}"
                for name in changed
            ]
        )


def _megatron_runtime(cfg: TrainConfig, knobs: dict[str, Any]) -> ParallelRuntime:
    from dfm.adapters.megatron import MegatronRuntime, megatron_sizes  # megatron-core is an optional extra

    p, m = cfg.parallel, cfg.megatron
    sizes = {
        "tensor": p.tensor,
        "context": p.context,
        "pipeline": p.pipeline,
        "virtual_pipeline": p.virtual_pipeline,
        "data_replicate": p.data_replicate,
        "data_shard": p.data_shard,
    }
    try:  # the layout against the world first (as the runtime checks it), then the device
        megatron_sizes(DistEnv.from_env().world_size, **sizes)
        kind = device_type(knobs["device"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if kind != "cuda":
        raise ConfigError(
            "runtime: megatron needs CUDA GPUs, and none is available here; runtime=local (one process) and "
            "runtime=fsdp2 (several processes) also run on the CPU"
        )
    engine = {
        "distributed_optimizer": m.distributed_optimizer,
        "overlap_grad_reduce": m.overlap_grad_reduce,
        "overlap_param_gather": m.overlap_param_gather,
        "sequence_parallel": m.sequence_parallel,
    }
    try:
        runtime = MegatronRuntime(**sizes, **engine, compile=cfg.train.compile, **knobs)
        runtime.check_model(cfg.model)
    except ValueError as exc:  # the messages name the parallel.* / train.* / megatron.* keys
        raise ConfigError(str(exc)) from None
    return runtime


def optimizer_settings(cfg: TrainConfig) -> OptimizerSettings:
    """The optimizer section as the runtime port takes it."""
    o = cfg.optim
    return OptimizerSettings(
        lr=o.lr,
        betas=o.betas,
        weight_decay=o.weight_decay,
        eps=o.eps,
        schedule=o.schedule,
        warmup_steps=o.warmup_steps,
        min_lr_ratio=o.min_lr_ratio,
        total_steps=cfg.train.max_steps,
    )


def build_codecs(cfg: TrainConfig, *, vae_tiling: bool = False) -> tuple[LatentCodec | None, TextEncoder | None]:
    """The pixel codec and text encoder the data (and generation) use (``vae_tiling``: the WAN VAE works in
    overlapping spatial tiles, for less memory).

    ``codecs.vae`` / ``codecs.text_encoder`` select the WAN 2.1 VAE / UMT5 from local directories (their
    weights load on first use, so building them to learn the latent shape is cheap). Unset, ``synthetic``
    data use the toy codecs (pixels as latents, hashed words) and ``mock`` data have no pixel codec and
    the hashed-word encoder. ``energon`` / ``hf_datasets`` data are latents and embeddings already: the
    pixel codec is the configured VAE or ``None``, the text encoder (needed only to sample) the configured
    UMT5 or ``None``.

    Raises:
        ConfigError: Naming ``codecs.*`` for a directory that is not a WAN VAE / UMT5 or does not fit ``model``.
    """
    source = cfg.data.source
    if source not in ("synthetic", "mock", "energon", "hf_datasets"):
        raise ConfigError(f"data.source: {source!r} is unknown; use synthetic, mock, energon or hf_datasets")
    vae, text = _pretrained_vae(cfg, vae_tiling), _pretrained_text_encoder(cfg)
    if source == "synthetic":
        return vae or IdentityPixelCodec(), text or HashTextEncoder(dim=cfg.model.text_dim)
    if source == "mock":
        return vae, text or HashTextEncoder(dim=cfg.model.text_dim)
    return vae, text


def _codec_device() -> tuple[str, str]:
    """This process's device for the pretrained codecs and the text encoder's dtype there (bf16 on CUDA, as WAN)."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}", "bf16"
    return "cpu", "fp32"


def _pretrained_vae(cfg: TrainConfig, tiling: bool = False) -> LatentCodec | None:
    if cfg.codecs.vae is None:
        return None
    try:
        vae = WanVAECodec(cfg.codecs.vae, device=_codec_device()[0], dtype="fp32", tiling=tiling)
    except ValueError as exc:
        raise ConfigError(f"codecs.vae: {exc}") from None
    i2v = getattr(cfg.model, "image_to_video", False)  # its input adds a mask and condition latents
    key, channels = ("out_channels", cfg.model.out_channels) if i2v else ("in_channels", cfg.model.in_channels)
    if vae.latent_spec.channels != channels:
        raise ConfigError(
            f"codecs.vae: {vae.identity} has {vae.latent_spec.channels} latent channels, but model.{key} is {channels}"
        )
    return vae


def build_image_encoder(cfg: TrainConfig) -> ImageEncoder | None:
    """The CLIP image encoder ``codecs.image_encoder`` names (``None`` when unset).

    Raises:
        ConfigError: Naming ``codecs.image_encoder`` for a directory that is not one, or whose width is not the
            model's ``image_dim``.
    """
    where = cfg.codecs.image_encoder
    if where is None:  # synthetic data condition on their own first frames through the toy encoder
        if getattr(cfg.model, "image_to_video", False) and cfg.data.source == "synthetic":
            return _toy_image_encoder(cfg)
        return None
    device, dtype = _codec_device()
    try:
        encoder = CLIPImageEncoder(where, device=device, dtype=dtype)
    except ValueError as exc:
        raise ConfigError(f"codecs.image_encoder: {exc}") from None
    if encoder.dim != getattr(cfg.model, "image_dim", None):
        raise ConfigError(
            f"codecs.image_encoder: {encoder.identity} gives {encoder.dim}-wide features, but model.image_dim is "
            f"{getattr(cfg.model, 'image_dim', None)}"
        )
    return encoder


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


def _toy_image_encoder(cfg: TrainConfig) -> ImageEncoder:
    encoder = PatchImageEncoder()
    if encoder.dim != cfg.model.image_dim:
        raise ConfigError(
            f"model.image_dim: synthetic image-to-video data give {encoder.dim}-wide image features (4 x 4 RGB "
            f"pixel blocks), but model.image_dim is {cfg.model.image_dim}"
        )
    return encoder


def _pretrained_text_encoder(cfg: TrainConfig) -> TextEncoder | None:
    c = cfg.codecs
    if c.text_encoder is None:
        return None
    device, dtype = _codec_device()
    try:
        text = UMT5TextEncoder(c.text_encoder, tokenizer=c.tokenizer, device=device, dtype=dtype)
    except ValueError as exc:
        bad_tokenizer = c.tokenizer is not None and "tokenizer directory" in str(exc)
        key = "codecs.tokenizer" if bad_tokenizer else "codecs.text_encoder"
        raise ConfigError(f"{key}: {exc}") from None
    if text.dim != cfg.model.text_dim:
        raise ConfigError(
            f"codecs.text_encoder: {text.identity} embeds {text.dim}-wide vectors, "
            f"but model.text_dim is {cfg.model.text_dim}"
        )
    return text


def latent_spec(cfg: TrainConfig, codec: LatentCodec | None) -> LatentSpec:
    """The data's latent space: the codec's, or for ``mock`` data a WAN-VAE-like one with the model's channels."""
    if codec is not None:
        return codec.latent_spec
    i2v = getattr(cfg.model, "image_to_video", False)  # its input adds the condition channels to the latents
    return LatentSpec(channels=cfg.model.out_channels if i2v else cfg.model.in_channels)


def latent_shape(cfg: TrainConfig, codec: LatentCodec | None) -> tuple[int, int, int, int]:
    """``(C, F, H, W)`` of the training latents."""
    d = cfg.data
    try:
        return latent_spec(cfg, codec).latent_shape(d.frames, d.height, d.width)
    except ValueError as exc:
        raise ConfigError(f"data: {exc} (data.frames/height/width do not fit the codec)") from None


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
    ``text_dim`` and ``strict``. The energon options are ignored for ``hf_datasets``.

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


def prepare_codecs(
    vae: str | None, text_encoder: str | None, *, tokenizer: str | None, device: str, dtype: str
) -> tuple[LatentCodec, TextEncoder]:
    """The codecs ``python -m dfm.app.prepare`` encodes with: the WAN VAE / UMT5 of local directories, or the toy
    codecs (pixels as latents, hashed words) where a directory is ``None``.

    Raises:
        ValueError: For a directory that is not a WAN VAE / UMT5 (or its tokenizer).
    """
    codec: LatentCodec = IdentityPixelCodec() if vae is None else WanVAECodec(vae, device=device, dtype=dtype)
    if text_encoder is None:
        return codec, HashTextEncoder()
    return codec, UMT5TextEncoder(text_encoder, tokenizer=tokenizer, device=device, dtype=dtype)


def build_checkpoint_store(cfg: TrainConfig) -> CheckpointStore:
    """Checkpoints under ``RUN_DIR/checkpoints``."""
    return checkpoint_store_at(Path(cfg.run.dir) / "checkpoints", cfg.runtime, keep_last=cfg.checkpoint.keep_last)


def checkpoint_store_at(root: Path, runtime: str = "local", *, keep_last: int | None = None) -> CheckpointStore:
    """The checkpoint store of ``root`` for ``runtime``'s state (torch DCP; megatron's dist_checkpointing for
    ``megatron``). Any runtime's checkpoints are listed, and their weights loaded, by the default one."""
    io = None
    if runtime == "megatron":
        from dfm.adapters.megatron import DistCheckpointIO

        io = DistCheckpointIO()
    return DCPCheckpointStore(root, keep_last=keep_last, io=io)


def build_metrics_sink(cfg: TrainConfig, resume_step: int | None, *, is_main: bool = True) -> MetricsSink:
    """``RUN_DIR/metrics.jsonl`` (records after ``resume_step`` from an interrupted run are dropped), plus the
    trackers ``tracking.*`` turns on (TensorBoard, W&B).

    Only the main rank writes it; the other ranks of a distributed run get a sink that keeps nothing.
    """
    if not is_main:
        return NullMetricsSink()
    run_dir, t = Path(cfg.run.dir), cfg.tracking
    sinks: list[MetricsSink] = [JsonlMetricsSink(run_dir / "metrics.jsonl", resume_step=resume_step)]
    try:
        if t.tensorboard:
            sinks.append(TensorBoardMetricsSink(run_dir / "tensorboard"))
        if t.wandb:
            name = t.name or cfg.run.name or run_dir.resolve().name
            config = yaml.safe_load(config_to_yaml(cfg))
            sinks.append(
                WandbMetricsSink(run_dir, project=t.project, name=name, tags=t.tags, entity=t.entity, config=config)
            )
    except ImportError as exc:
        FanOutMetricsSink(sinks).close()
        raise ConfigError(f"tracking: {exc}") from None
    return sinks[0] if len(sinks) == 1 else FanOutMetricsSink(sinks)


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


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The weights ``checkpoint.init_from`` names, checked against ``model``; ``None`` when unset.

    Raises:
        ConfigError: the directory is missing or unreadable, or holds another architecture.
    """
    where = cfg.checkpoint.init_from
    if where is None:
        return None
    if not isinstance(cfg.model, WanSpec):
        raise ConfigError("checkpoint.init_from: only WAN models load diffusers weights (model.arch is not wan)")
    try:
        spec, state = load_wan_diffusers(where)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint.init_from: {exc}") from None
    if spec != cfg.model:
        diff = [
            f"{k}={getattr(spec, k)!r} (model.{k}={getattr(cfg.model, k)!r})"
            for k in attrs.fields_dict(WanSpec)
            if getattr(spec, k) != getattr(cfg.model, k)
        ]
        raise ConfigError(f"checkpoint.init_from: {where} holds another architecture: {', '.join(diff)}")
    return state
