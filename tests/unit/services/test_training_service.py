"""The training service on in-memory adapters: no files, same numbers as the file-backed run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfm.adapters.memory import InMemoryCheckpointStore, InMemoryMetricsSink
from dfm.adapters.tracking import read_metrics
from dfm.app.config import config_from_yaml, resolve_config
from dfm.app.services import training
from dfm.app.services.training import train


def test_in_memory_run_writes_nothing_and_matches_the_file_backed_run(tmp_path: Path) -> None:
    overrides = ["train.max_steps=3", "checkpoint.interval=2", "logging.level=WARNING"]
    mem_dir, file_dir = tmp_path / "mem", tmp_path / "files"
    store, sink = InMemoryCheckpointStore(), InMemoryMetricsSink()
    result = train(resolve_config("wan_tiny_t2v", None, [f"run.dir={mem_dir}", *overrides]), store=store, sink=sink)
    assert not mem_dir.exists()
    assert result.step == 3 and [c.step for c in store.list()] == [2, 3]
    train(resolve_config("wan_tiny_t2v", None, [f"run.dir={file_dir}", *overrides]))
    on_disk = read_metrics(file_dir / "metrics.jsonl")
    assert [m["loss"] for _, m in sink.records] == [r["loss"] for r in on_disk]
    for key in ("step", "loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "model_tflops", "max_memory_gib"):
        assert key in on_disk[-1]
    saved = config_from_yaml((file_dir / "config.yaml").read_text())
    assert saved.train.max_steps == 3


def test_in_memory_resume_continues_exactly(tmp_path: Path) -> None:
    def cfg(steps: int):
        return resolve_config(
            "dit_tiny_edm",
            None,
            [f"run.dir={tmp_path}", f"train.max_steps={steps}", "checkpoint.interval=2", "logging.level=WARNING"],
        )

    whole_sink, part_sink, store = InMemoryMetricsSink(), InMemoryMetricsSink(), InMemoryCheckpointStore()
    train(cfg(4), store=InMemoryCheckpointStore(), sink=whole_sink)
    train(cfg(2), store=store, sink=part_sink)
    train(cfg(4), store=store, sink=part_sink)
    losses = [m["loss"] for _, m in part_sink.records]
    assert [s for s, _ in part_sink.records] == [1, 2, 3, 4]
    assert losses == [m["loss"] for _, m in whole_sink.records]
    assert torch.isfinite(torch.tensor(losses)).all()


def test_in_memory_data_source_drives_training_and_resumes(tmp_path: Path) -> None:
    from dfm.adapters.memory import InMemoryDataSource
    from dfm.domain.batch import Batch

    g = torch.Generator().manual_seed(0)
    batches = [
        Batch(
            latents=torch.randn(1, 3, 5, 16, 16, generator=g),
            text=torch.randn(1, 8, 32, generator=g),
            sample_index=torch.tensor([i]),
        )
        for i in range(3)
    ]

    def cfg(steps: int):
        return resolve_config(
            "wan_tiny_t2v",
            None,
            [f"run.dir={tmp_path}", f"train.max_steps={steps}", "checkpoint.interval=1", "logging.level=WARNING"],
        )

    whole, part, store = InMemoryMetricsSink(), InMemoryMetricsSink(), InMemoryCheckpointStore()
    train(cfg(3), data=InMemoryDataSource(batches), store=InMemoryCheckpointStore(), sink=whole)
    train(cfg(1), data=InMemoryDataSource(batches), store=store, sink=part)
    resumed_source = InMemoryDataSource(batches)
    train(cfg(3), data=resumed_source, store=store, sink=part)
    assert resumed_source.position == 6  # 2 micro-batches per step, 3 steps
    assert [m["loss"] for _, m in part.records] == [m["loss"] for _, m in whole.records]


def test_init_from_starts_a_fresh_run_from_diffusers_weights(tmp_path: Path) -> None:
    import pytest

    from dfm.adapters.diffusers import save_wan_diffusers
    from dfm.app import bootstrap
    from dfm.app.config import ConfigError
    from dfm.domain.networks.wan import WanTransformer

    base = resolve_config("wan_tiny_t2v", None, [])
    weights = WanTransformer(base.model, generator=torch.Generator().manual_seed(7)).state_dict()
    save_wan_diffusers(weights, base.model, tmp_path / "pretrained")
    overrides = ["train.max_steps=1", "optim.lr=1e-12", "logging.level=WARNING", f"run.dir={tmp_path / 'run'}"]
    cfg = resolve_config("wan_tiny_t2v", None, [*overrides, f"checkpoint.init_from={tmp_path / 'pretrained'}"])
    runtime = bootstrap.build_runtime(cfg)
    train(cfg, runtime=runtime, store=InMemoryCheckpointStore(), sink=InMemoryMetricsSink())
    trained = runtime.state_dict()["model"]
    fresh = WanTransformer(base.model, generator=torch.Generator().manual_seed(base.seed)).state_dict()
    assert any(not torch.allclose(fresh[k], weights[k]) for k in weights)  # the seed's init differs
    for k, v in weights.items():
        torch.testing.assert_close(trained[k], v, rtol=0, atol=1e-8)  # lr 1e-12: one step moves nothing

    wrong = resolve_config(
        "wan_tiny_t2v", None, ["model.num_layers=1", f"checkpoint.init_from={tmp_path / 'pretrained'}"]
    )
    with pytest.raises(ConfigError, match=r"^checkpoint.init_from: .* holds another architecture: num_layers=2"):
        bootstrap.initial_weights(wrong)
    missing = resolve_config("wan_tiny_t2v", None, [f"checkpoint.init_from={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match=r"^checkpoint.init_from: "):
        bootstrap.initial_weights(missing)


class _RankedSource:
    def __init__(self, state: dict) -> None:
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def test_checkpoint_data_state_keeps_every_data_parallel_ranks_position(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaders with a state per data-parallel rank (energon) are saved as one list; shared states once."""
    patch = monkeypatch
    per_rank = [  # 4 global ranks: data-parallel rank 1 and 0, each twice (its tensor-parallel pair)
        {"source": "energon", "rank": 1, "next_step": 5},
        {"source": "energon", "rank": 1, "next_step": 5},
        {"source": "energon", "rank": 0, "next_step": 4},
        {"source": "energon", "rank": 0, "next_step": 4},
    ]
    patch.setattr(training, "all_gather_json", lambda state: per_rank)
    saved = training._data_state(_RankedSource(per_rank[0]))
    assert saved == {"source": "energon", "ranks": [per_rank[2], per_rank[0]]}
    shared = {"source": "synthetic", "next_step": 3}
    patch.setattr(training, "all_gather_json", lambda state: [shared, dict(shared)])
    assert training._data_state(_RankedSource(shared)) == shared
