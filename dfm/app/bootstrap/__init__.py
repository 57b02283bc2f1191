"""The composition root: the one place that turns a resolved config into adapters.

Services receive ports; only this package knows which adapter implements which port: runtimes, checkpoints and
metrics here, the codecs in :mod:`dfm.app.bootstrap.codecs`, the data in :mod:`dfm.app.bootstrap.data`, all
re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch
import yaml

# The technology the services and CLIs use, named here so that the composition root is the one place that
# imports adapters (an import-linter contract in pyproject.toml keeps services and CLIs off dfm.adapters).
from dfm.adapters.checkpoint import DCPCheckpointStore, is_checkpoint_dir, read_meta
from dfm.adapters.diffusers import (  # diffusers loads on use
    CONFIG_NAME,
    export_wan_distributed,
    load_wan_diffusers,
    save_random_wan_vae,
)
from dfm.adapters.diffusers.lora import merge_adapters, read_lora_file, write_lora_file
from dfm.adapters.diffusers.wan_weights import save_wan_diffusers
from dfm.adapters.formats.samples import encode_sample
from dfm.adapters.fsdp2 import FSDP2Runtime
from dfm.adapters.kernels import activate_flash_attention_4
from dfm.adapters.local import LocalRuntime, resolve_device
from dfm.adapters.synthetic.videos import VideoSpec
from dfm.adapters.synthetic.videos import describe as describe_clip
from dfm.adapters.synthetic.videos import first_frame as first_clip_frame
from dfm.adapters.synthetic.videos import render as render_clip
from dfm.adapters.torch_dist import DistEnv, all_gather_json, init_process_group
from dfm.adapters.torch_dist import destroy as destroy_process_group
from dfm.adapters.torch_dist.devices import device_type
from dfm.adapters.torch_dist.lora import adapter_key, adapter_template, from_adapter_key
from dfm.adapters.torch_dist.parallel_sampling import (
    SamplingLayout,
    SamplingRanks,
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
from dfm.app.bootstrap.codecs import (
    build_codecs,
    build_image_encoder,
    latent_shape,
    latent_spec,
    prepare_codecs,
    prepare_image_encoder,
)
from dfm.app.bootstrap.data import (
    _check_packing,
    batch_layout,
    build_data_source,
    check_batch_layout,
    check_model_fits_data,
    energon_writer,
    image_condition,
    open_prepared_source,
    webdataset_to_hf,
    write_fake_dataset,
)
from dfm.app.config import ConfigError, ParallelConfig, TrainConfig, config_to_yaml
from dfm.domain.specs import WanSpec
from dfm.ports.checkpoint import CheckpointStore
from dfm.ports.runtime import OptimizerSettings, ParallelRuntime
from dfm.ports.tracking import MetricsSink

__all__ = [
    "BUCKET_PRESETS",
    "CONFIG_NAME",
    "ClipError",
    "ClipOptions",
    "DistEnv",
    "Mp4Writer",
    "SamplingLayout",
    "SamplingRanks",
    "VideoSpec",
    "adapter_key",
    "adapter_template",
    "all_gather_json",
    "batch_layout",
    "build_codecs",
    "build_data_source",
    "build_image_encoder",
    "check_batch_layout",
    "check_model_fits_data",
    "choose_layout",
    "contact_sheet",
    "describe_clip",
    "destroy_process_group",
    "encode_sample",
    "energon_writer",
    "export_wan_distributed",
    "first_clip_frame",
    "from_adapter_key",
    "image_condition",
    "init_process_group",
    "is_checkpoint_dir",
    "is_media_file",
    "latent_shape",
    "latent_spec",
    "load_clip",
    "load_image",
    "load_wan_diffusers",
    "merge_adapters",
    "open_prepared_source",
    "prepare_codecs",
    "prepare_image_encoder",
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
    "use_attention_backend",
    "use_local_device",
    "webdataset_to_hf",
    "write_fake_dataset",
    "write_lora_file",
    "write_text_atomic",
]


def use_attention_backend(name: str, option: str = "train.attention_backend") -> None:
    """Make ``name`` (a ``train.attention_backend`` / ``--attention`` value) buildable in this process.

    ``fa4`` activates FlashAttention-4 behind torch's flash backend (:mod:`dfm.adapters.kernels`); the others are
    torch's own and need nothing.

    Raises:
        ConfigError: ``fa4`` without the ``flash-attn-4`` package or a torch that can host it (named ``option``).
    """
    if name == "fa4":
        try:
            activate_flash_attention_4()
        except ValueError as err:
            raise ConfigError(f"{option}: {err}") from err


def build_runtime(cfg: TrainConfig, device: str = "auto") -> ParallelRuntime:
    """The runtime named by ``cfg.runtime``, with the ``train.*`` knobs (and ``parallel.*`` sizes for ``fsdp2``).

    ``fsdp2`` joins (or, in a lone process, creates) the process group and builds its device mesh here,
    so the topology is known before the data source is built.
    """
    _check_packing(cfg)  # before any process group exists
    check_batch_layout(cfg, 1)  # global % micro; the data-parallel size is checked with the data source
    t = cfg.train
    use_attention_backend(t.attention_backend)
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
