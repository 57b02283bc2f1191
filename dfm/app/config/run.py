"""The ``run`` section: where a run writes its files."""

from __future__ import annotations

import attrs

from dfm.app.config.checks import non_empty, optional


@attrs.frozen(kw_only=True)
class RunConfig:
    """Run directory and name."""

    dir: str = attrs.field(default="runs/default", validator=non_empty)
    """Run directory: holds ``config.yaml``, ``metrics.jsonl``, ``checkpoints/`` and ``samples/``."""
    name: str | None = attrs.field(default=None, validator=optional(non_empty))
    """Run name shown by trackers; ``null`` uses the last component of ``dir``."""
