"""Training curves of a run as one PNG: loss, gradient norm, learning rate and throughput against steps (matplotlib).

The figure has four panels read from ``metrics.jsonl`` (:func:`~dfm.adapters.tracking.jsonl.read_metrics`): the
loss (log scale when it stays positive), the gradient norm before clipping, the learning rate, and the throughput
(model TFLOP/s per device when the run logged it, else samples/s). A record without a value for a panel (a
skipped step's NaN, a key an older run did not log) leaves a gap. matplotlib is the optional extra ``plot``,
imported when a figure is drawn (its non-interactive ``Agg`` backend: no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PANELS = (("loss", "loss"), ("grad_norm", "gradient norm"), ("lr", "learning rate"))
THROUGHPUT = (("model_tflops", "model TFLOP/s per device"), ("samples_per_s", "samples/s"))


def curve(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the records that hold a finite value for it, in step order."""
    points = sorted(
        (int(r["step"]), float(r[key]))
        for r in records
        if "step" in r and isinstance(r.get(key), int | float) and math.isfinite(float(r[key]))
    )
    return [s for s, _ in points], [v for _, v in points]


def curves(records: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """The panels' series by title: loss, gradient norm, learning rate and the throughput the run logged."""
    out = {title: curve(records, key) for key, title in PANELS}
    for key, title in THROUGHPUT:
        steps, values = curve(records, key)
        if steps:
            out[title] = (steps, values)
            break
    return out


def save_curves_png(records: Sequence[Mapping[str, Any]], out: Path, *, title: str = "") -> Path:
    """Draw :func:`curves` as a 2 x 2 figure into the PNG ``out``; returns ``out``.

    Raises:
        ValueError: If no record holds a loss.
        ModuleNotFoundError: Without matplotlib (the ``plot`` extra).
    """
    series = curves(records)
    if not series["loss"][0]:
        raise ValueError("the metrics hold no finite loss to plot (has the run logged a step yet?)")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (name, (steps, values)) in zip(axes.flat, series.items(), strict=False):
        ax.plot(steps, values, linewidth=1.2)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name == "loss" and min(values) > 0:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
