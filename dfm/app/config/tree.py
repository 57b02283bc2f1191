"""The root of the config tree, :class:`TrainConfig`: one section per component."""

from __future__ import annotations

from typing import Literal

import attrs
from attrs import validators as v

from dfm.app.config.checkpoint import CheckpointConfig
from dfm.app.config.checks import choice
from dfm.app.config.codecs import CodecsConfig
from dfm.app.config.data import DataConfig
from dfm.app.config.errors import FieldError
from dfm.app.config.logs import LoggingConfig
from dfm.app.config.lora import LoraConfig
from dfm.app.config.megatron import MegatronConfig
from dfm.app.config.optim import OptimConfig
from dfm.app.config.parallel import ParallelConfig
from dfm.app.config.run import RunConfig
from dfm.app.config.sample import EDM_SAMPLERS, FLOW_SAMPLERS, SampleConfig
from dfm.app.config.tracking import TrackingConfig
from dfm.app.config.training import TrainingConfig
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.specs import DiTSpec, WanSpec

RuntimeName = Literal["local", "fsdp2", "megatron"]
ModelSection = WanSpec | DiTSpec
"""The ``model`` section: a tagged union on ``arch`` (``wan`` | ``dit``)."""
DiffusionSection = FlowMatching | EDM
"""The ``diffusion`` section: a tagged union on ``kind`` (``flow`` | ``edm``)."""

_SAMPLERS_OF_KIND = {"flow": FLOW_SAMPLERS, "edm": EDM_SAMPLERS}


@attrs.frozen(kw_only=True)
class TrainConfig:
    """Everything a training run needs; resolved from a recipe, a YAML file and CLI overrides."""

    run: RunConfig = attrs.field(factory=RunConfig)
    """Run directory and name."""
    seed: int = attrs.field(default=0, validator=v.ge(0))
    """Seed of every random stream (noise, sigma, text dropout, data order, initialization)."""
    runtime: RuntimeName = attrs.field(default="local", validator=choice(RuntimeName))
    """``local`` (one process, CPU or one GPU), ``fsdp2`` (PyTorch FSDP2/DTensor) or ``megatron`` (Megatron-core)."""
    model: ModelSection = attrs.field(factory=WanSpec)
    """The network (``arch: wan`` or ``arch: dit``); switching ``arch`` starts from that spec's defaults."""
    diffusion: DiffusionSection = attrs.field(factory=FlowMatching)
    """The diffusion process (``kind: flow`` or ``kind: edm``); switching ``kind`` starts from its defaults."""
    train: TrainingConfig = attrs.field(factory=TrainingConfig)
    """The training loop."""
    optim: OptimConfig = attrs.field(factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    checkpoint: CheckpointConfig = attrs.field(factory=CheckpointConfig)
    """Checkpoint interval, retention and resumption."""
    lora: LoraConfig = attrs.field(factory=LoraConfig)
    """LoRA fine-tuning (adapters on a frozen network); off unless ``lora.rank`` is set."""
    parallel: ParallelConfig = attrs.field(factory=ParallelConfig)
    """Parallel layout."""
    megatron: MegatronConfig = attrs.field(factory=MegatronConfig)
    """Megatron-core engine options (``runtime: megatron``)."""
    data: DataConfig = attrs.field(factory=DataConfig)
    """Training data."""
    codecs: CodecsConfig = attrs.field(factory=CodecsConfig)
    """Pretrained VAE and text encoder (local directories); unset: the embedded toy codecs."""
    sample: SampleConfig = attrs.field(factory=SampleConfig)
    """Sampling (evaluation videos and generation defaults)."""
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    """Logging."""
    tracking: TrackingConfig = attrs.field(factory=TrackingConfig)
    """Experiment trackers (TensorBoard, Weights & Biases) besides ``metrics.jsonl``."""

    def __attrs_post_init__(self) -> None:
        kind = getattr(self.diffusion, "kind", None)
        allowed = _SAMPLERS_OF_KIND.get(kind, ())
        if allowed and self.sample.sampler not in allowed:
            raise FieldError(
                ("sample", "sampler"),
                f"{self.sample.sampler!r} does not sample diffusion.kind={kind!r} models; use one of "
                + ", ".join(map(repr, allowed)),
            )
        image_dropout = getattr(self.diffusion, "image_dropout", 0.0)
        if image_dropout > 0 and not getattr(self.model, "image_to_video", False):
            raise FieldError(
                ("diffusion", "image_dropout"),
                f"{image_dropout} drops the image of image-to-video samples, but this model is text-to-video "
                "(model.image_dim is null); set diffusion.image_dropout=0, or train an image-to-video model",
            )
        if self.sample.images and not getattr(self.model, "image_to_video", False):
            raise FieldError(
                ("sample", "images"),
                "first frames of image-to-video samples, but this model is text-to-video (model.image_dim is null); "
                "remove sample.images",
            )
