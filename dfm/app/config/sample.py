"""The ``sample`` section: how videos are generated during and after training."""

from __future__ import annotations

from typing import Literal

import attrs
from attrs import validators as v

from dfm.app.config.checks import choice, optional, positive
from dfm.app.config.errors import FieldError

SamplerName = Literal["unipc", "flow_euler", "edm_euler", "edm_heun"]
FLOW_SAMPLERS: tuple[str, ...] = ("unipc", "flow_euler")
"""Samplers for flow-matching models (``diffusion.kind: flow``)."""
EDM_SAMPLERS: tuple[str, ...] = ("edm_euler", "edm_heun")
"""Samplers for EDM models (``diffusion.kind: edm``)."""


@attrs.frozen(kw_only=True)
class SampleConfig:
    """Sampler, number of steps, classifier-free guidance and the size of generated videos."""

    sampler: SamplerName = attrs.field(default="unipc", validator=choice(SamplerName))
    """``unipc`` / ``flow_euler`` for flow models, ``edm_euler`` / ``edm_heun`` (2nd order) for EDM."""
    steps: int = attrs.field(default=50, validator=positive)
    """Solver steps."""
    guidance: float = attrs.field(default=5.0, validator=v.ge(0.0))
    """Classifier-free guidance scale (1 = conditional only, 0 = unconditional only)."""
    shift: float | None = attrs.field(default=None, validator=optional(v.gt(0.0)))
    """Time shift of the flow sampling schedule; ``null`` uses ``diffusion.shift`` (flow models only)."""
    frames: int = attrs.field(default=17, validator=positive)
    """Frames per generated video."""
    height: int = attrs.field(default=64, validator=positive)
    """Height of generated videos in pixels."""
    width: int = attrs.field(default=64, validator=positive)
    """Width of generated videos in pixels."""
    every_n_steps: int | None = attrs.field(default=None, validator=optional(positive))
    """While training: sample :attr:`prompts` every this many steps and at the end, into ``<run.dir>/samples/``
    (``step_XXXXXXX*.mp4`` and a contact sheet ``step_XXXXXXX.png``), with the EMA weights when kept; ``null``:
    never. The training losses are the same bit for bit with or without it."""
    prompts: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """Captions sampled during training; empty: the first three captions of the ``synthetic`` data (other data
    sources need prompts)."""
    images: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """Image-to-video models: the first frame of each prompt's sample during training (image files, scaled and
    centre-cropped to the video's size as ``generate --image`` does), one per prompt or one for every prompt;
    empty with ``synthetic`` data and no :attr:`prompts`: the first frames of the clips those captions describe.
    Text-to-video models take none."""
    seed: int = attrs.field(default=0, validator=v.ge(0))
    """Seed of the noise of the samples taken during training (prompt ``i`` uses ``seed + i``)."""

    def __attrs_post_init__(self) -> None:
        if self.prompts and len(self.images) not in (0, 1, len(self.prompts)):
            raise FieldError(
                "images",
                f"{len(self.images)} images for {len(self.prompts)} prompts: give one image per prompt, or one for "
                "all of them",
            )
