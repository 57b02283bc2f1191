"""The fsdp2 runtime in one process without a launcher: a process group of one, driven by the training CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from dfm.adapters.torch_dist import destroy
from dfm.adapters.tracking import read_metrics
from dfm.app.bootstrap import build_runtime
from dfm.app.config import ConfigError, resolve_config
from dfm.app.train import main as train_main

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:Slicing a flattened dim from root mesh:UserWarning"),
]


@pytest.fixture
def group_of_one(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No torchrun environment; the process group the runtime creates is destroyed afterwards."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    yield
    destroy()


def test_train_cli_runs_fsdp2_as_a_world_of_one(tmp_path: Path, group_of_one: None) -> None:
    """``--runtime fsdp2`` trains, logs and checkpoints like ``local``, with the same losses."""
    common = ["--recipe", "wan_tiny_t2v", "train.max_steps=3", "checkpoint.interval=2", "logging.level=WARNING"]
    assert train_main([*common, "--runtime", "fsdp2", f"run.dir={tmp_path / 'fsdp2'}"]) == 0
    assert not dist.is_initialized()  # the service closed the runtime it built, and its group of one
    assert train_main([*common, f"run.dir={tmp_path / 'local'}"]) == 0
    fsdp2, local = (
        read_metrics(tmp_path / "fsdp2" / "metrics.jsonl"),
        read_metrics(tmp_path / "local" / "metrics.jsonl"),
    )
    assert [r["step"] for r in fsdp2] == [1, 2, 3]
    for a, b in zip(fsdp2, local, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * abs(b["grad_norm"])
    steps = sorted(p.name for p in (tmp_path / "fsdp2" / "checkpoints").glob("step_*"))
    assert steps == ["step_0000002", "step_0000003"]


def test_layout_that_needs_more_processes_is_a_config_error(group_of_one: None) -> None:
    cfg = resolve_config("wan_tiny_t2v", None, ["runtime=fsdp2", "parallel.tensor=2"])
    with pytest.raises(ConfigError, match=r"cannot infer parallel.data_shard: the world size 1 is not divisible by"):
        build_runtime(cfg, device="cpu")
    assert not dist.is_initialized()
