"""The ``checkpoint`` section: when to save, how many to keep, where to resume from."""

from __future__ import annotations

import attrs

from dfm.app.config.checks import non_empty, optional, positive


@attrs.frozen(kw_only=True)
class CheckpointConfig:
    """Checkpoints go to ``<run.dir>/checkpoints/step_XXXXXXX/`` with a ``latest`` pointer."""

    interval: int = attrs.field(default=1000, validator=positive)
    """Steps between checkpoints (the last step is always saved)."""
    keep_last: int | None = attrs.field(default=3, validator=optional(positive))
    """Keep this many most recent checkpoints; ``null`` keeps all."""
    resume: str = attrs.field(default="auto", validator=non_empty)
    """``auto``: resume from the run directory's latest checkpoint if any; ``never``: start fresh; else a
    checkpoint directory, or a run directory (its newest intact checkpoint), to start from. ``seed`` and
    ``train.global_batch_size`` must be the checkpoint's; other changed settings are logged and used."""
    init_from: str | None = attrs.field(default=None, validator=optional(non_empty))
    """A diffusers ``WanTransformer3DModel`` directory (``config.json`` + safetensors) to start a fresh run
    from (finetuning); its architecture must equal ``model``. Ignored when the run resumes a checkpoint."""
