"""Throughput figures from the micro-batches that ran: bucketed shapes, packed batches, the job's ranks."""

from __future__ import annotations

import pytest
import torch

from dfm.adapters.memory import InMemoryCheckpointStore, InMemoryDataSource, InMemoryMetricsSink
from dfm.app.config import resolve_config
from dfm.app.services import throughput
from dfm.app.services.throughput import Work, batch_work, job_work, rates
from dfm.app.services.training import train
from dfm.domain.batch import Batch, PackedBatch
from dfm.domain.specs import WAN_TINY, num_tokens, training_flops
from dfm.ports.runtime import Topology


def _batch(index: int, f: int, h: int, w: int, channels: int = 4, text_len: int = 8) -> Batch:
    g = torch.Generator().manual_seed(index)
    return Batch(
        latents=torch.randn(1, channels, f, h, w, generator=g),
        text=torch.randn(1, text_len, 32, generator=g),
        sample_index=torch.tensor([index]),
    )


def test_batch_work_of_bucketed_and_packed_batches() -> None:
    bucketed = [_batch(0, 3, 8, 12), _batch(1, 5, 4, 6)]  # L = 72 and 30
    packed = PackedBatch(
        latents=(torch.zeros(4, 3, 8, 12), torch.zeros(4, 5, 4, 6)),
        text=torch.zeros(2, 8, 32),
        sample_index=torch.arange(2),
    )
    per_sample = training_flops(WAN_TINY, 72, 8) + training_flops(WAN_TINY, 30, 8)
    assert batch_work(WAN_TINY, bucketed) == Work(samples=2, video_tokens=102, flops=pytest.approx(per_sample))
    assert batch_work(WAN_TINY, [packed]) == Work(samples=2, video_tokens=102, flops=pytest.approx(per_sample))
    assert batch_work(WAN_TINY, [packed]).flops < training_flops(WAN_TINY, 102, 8)  # not quadratic in the pack


def test_job_work_counts_each_data_parallel_rank_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 ranks: dp 2 x tp 2; the tensor-parallel peers of a data-parallel rank ran the same batches.
    gathered = [
        {"dp_rank": 0, "samples": 2, "video_tokens": 144, "flops": 10.0},
        {"dp_rank": 0, "samples": 2, "video_tokens": 144, "flops": 10.0},
        {"dp_rank": 1, "samples": 2, "video_tokens": 60, "flops": 4.0},
        {"dp_rank": 1, "samples": 2, "video_tokens": 60, "flops": 4.0},
    ]
    monkeypatch.setattr(throughput, "all_gather_json", lambda value: [dict(item) for item in gathered])
    topo = Topology(world_size=4, rank=0, dp_size=2, dp_rank=0, tp_size=2)
    assert job_work(Work(samples=2, video_tokens=144, flops=10.0), topo) == Work(
        samples=4, video_tokens=204, flops=14.0
    )


def test_job_work_of_one_process_is_its_own() -> None:
    local = Work(samples=3, video_tokens=90, flops=1.5e12)
    assert job_work(local, Topology()) == local
    assert rates(local, 2.0, world_size=1) == {"samples_per_s": 1.5, "tokens_per_s": 45.0, "model_tflops": 0.75}


def test_training_metrics_come_from_the_bucketed_batches_that_ran(tmp_path) -> None:
    cfg = resolve_config(
        "wan_tiny_t2v",
        None,
        [f"run.dir={tmp_path}", "train.max_steps=2", "train.log_interval=2", "logging.level=WARNING"],
    )
    shapes = [(5, 16, 16), (3, 8, 12)] * 2  # two buckets: L = 320 and 72
    batches = [_batch(i, *shape, channels=cfg.model.in_channels) for i, shape in enumerate(shapes)]
    sink = InMemoryMetricsSink()
    train(cfg, data=InMemoryDataSource(batches), store=InMemoryCheckpointStore(), sink=sink)
    ((step, metrics),) = sink.records
    assert step == 2
    tokens = [num_tokens(cfg.model, *shape) for shape in shapes]
    assert tokens == [320, 72, 320, 72]
    assert metrics["tokens_per_s"] / metrics["samples_per_s"] == pytest.approx(sum(tokens) / 4)
    flops = sum(training_flops(cfg.model, n, 8) for n in tokens)
    assert metrics["model_tflops"] * 1e12 / metrics["samples_per_s"] == pytest.approx(flops / 4)
