"""Throughput figures from the micro-batches that ran (the training service and ``bench train`` share them).

Samples, video tokens and model FLOPs are counted from each micro-batch's own latent shapes and text
length (:func:`dfm.domain.specs.sample_lengths`), not from the config's ``data.frames/height/width``:
bucketed data (micro-batches of different shapes) and packed data (samples of different lengths in one
sequence, attention FLOPs quadratic per sample) are counted as they ran. The job's totals take each
data-parallel rank's count once (tensor-, context- and pipeline-parallel peers ran the same batches).
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from dfm.app.bootstrap import all_gather_json
from dfm.domain.batch import Batch, PackedBatch
from dfm.domain.specs import ModelSpec, batch_training_flops, batch_video_tokens
from dfm.ports.runtime import Topology


@attrs.frozen(kw_only=True)
class Work:
    """What some micro-batches held: samples, video tokens and analytic training FLOPs (recompute not counted)."""

    samples: int = 0
    """Samples."""
    video_tokens: int = 0
    """Video tokens, ``sum_i L_i`` over the samples."""
    flops: float = 0.0
    """Training FLOPs, the sum of every sample's at its own ``(L_i, S)`` (:func:`dfm.domain.specs.training_flops`)."""

    def __add__(self, other: Work) -> Work:
        return Work(
            samples=self.samples + other.samples,
            video_tokens=self.video_tokens + other.video_tokens,
            flops=self.flops + other.flops,
        )


def batch_work(spec: ModelSpec, batches: Iterable[Batch | PackedBatch]) -> Work:
    """The :class:`Work` of ``batches`` (e.g. one rank's micro-batches of one step), from their shapes."""
    total = Work()
    for batch in batches:
        total += Work(
            samples=batch.size,
            video_tokens=batch_video_tokens(spec, batch),
            flops=batch_training_flops(spec, batch),
        )
    return total


def job_work(local: Work, topology: Topology) -> Work:
    """The whole job's :class:`Work`: every data-parallel rank's ``local`` once. Collective (all ranks call it)."""
    gathered = all_gather_json({"dp_rank": topology.dp_rank, **attrs.asdict(local)})
    by_dp_rank = {int(item.pop("dp_rank")): item for item in gathered}
    total = Work()
    for item in by_dp_rank.values():
        total += Work(**item)
    return total


def rates(work: Work, seconds: float, world_size: int) -> dict[str, float]:
    """``samples_per_s``, ``tokens_per_s`` (video tokens) and ``model_tflops`` per device of the job's ``work``."""
    seconds = max(seconds, 1e-9)
    return {
        "samples_per_s": work.samples / seconds,
        "tokens_per_s": work.video_tokens / seconds,
        "model_tflops": work.flops / seconds / world_size / 1e12,
    }
