"""The ``tracking`` section: where metrics go besides ``<run.dir>/metrics.jsonl``."""

from __future__ import annotations

import attrs

from dfm.app.config.checks import non_empty, optional


def _tags(value: object) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(str(t) for t in value)  # type: ignore[union-attr]


@attrs.frozen(kw_only=True)
class TrackingConfig:
    """Experiment trackers fed by the main rank at every log interval (the ``tracking`` extra installs both)."""

    tensorboard: bool = False
    """Write TensorBoard event files to ``<run.dir>/tensorboard``."""
    wandb: bool = False
    """Log to Weights & Biases: the scalars at each log interval and the videos of ``sample.every_n_steps``; a
    resumed run continues the same W&B run (its id is kept in ``<run.dir>/wandb_run_id``). ``WANDB_MODE=offline``
    logs without network (upload later with ``wandb sync <run.dir>/wandb/offline-run-*``)."""
    project: str = attrs.field(default="dfm", validator=non_empty)
    """W&B project."""
    name: str | None = attrs.field(default=None, validator=optional(non_empty))
    """W&B run name; ``null``: ``run.name``, else the last component of ``run.dir``."""
    tags: tuple[str, ...] = attrs.field(default=(), converter=_tags)
    """W&B tags."""
    entity: str | None = attrs.field(default=None, validator=optional(non_empty))
    """W&B entity (user or team); ``null``: the logged-in account's default."""
