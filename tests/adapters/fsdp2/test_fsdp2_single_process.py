"""The fsdp2 runtime in one process without a launcher: a process group of one, driven by the training CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support.distributed import load_worker
from support.tolerances import assert_adam_trained_alike
from torch.distributed.tensor import DTensor

from dfm.adapters.fsdp2 import FSDP2Runtime
from dfm.adapters.local import LocalRuntime, lr_factor
from dfm.adapters.torch_dist import destroy
from dfm.adapters.tracking import read_metrics
from dfm.app.bootstrap import build_runtime
from dfm.app.config import ConfigError, resolve_config
from dfm.app.train import main as train_main
from dfm.ports.runtime import OptimizerSettings

worker = load_worker(Path(__file__).resolve().parent / "fsdp2_worker.py", "fsdp2_worker_shared")

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


FIRST = OptimizerSettings(lr=1e-2, weight_decay=0.01, schedule="cosine", warmup_steps=1, total_steps=6)
RETUNED = OptimizerSettings(
    lr=3e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.1, schedule="cosine", warmup_steps=1, total_steps=6
)
"""What a user changes in ``optim.*`` before resuming the :data:`FIRST` run."""


def _steps(runtime: LocalRuntime | FSDP2Runtime, steps: range) -> list[float]:
    micro = worker.micro_batches
    return [runtime.train_step(micro(worker.batch(k), 0, 4, 2), worker.loss_fn(k), 4).lr for k in steps]


def _whole(state: dict) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}


def test_resume_with_changed_optimizer_settings_matches_the_local_runtime(group_of_one: None) -> None:
    """The fsdp2 runtime takes lr, betas, eps and weight decay from its settings and the moments from the state."""
    options = {"device": "cpu", "precision": "fp32", "seed": 0}
    runs: dict[str, dict] = {}
    for name, kind in (("local", LocalRuntime), ("fsdp2", FSDP2Runtime)):
        first = kind(**options)
        first.build_network(worker.SPEC)
        first.attach_optimizer(FIRST)
        first.load_weights(worker.start_weights())
        _steps(first, range(2))
        saved = first.state_dict()
        second = kind(**options)
        second.build_network(worker.SPEC)
        second.attach_optimizer(RETUNED)
        second.load_state_dict(saved)
        moments = {n: _whole(s) for n, s in second.state_dict()["optimizer"]["state"].items()}
        assert all(
            torch.equal(moments[n][k], v) for n, s in saved["optimizer"]["state"].items() for k, v in _whole(s).items()
        )
        groups = second._optimizer.param_groups
        assert {(g["betas"], g["eps"]) for g in groups} == {(RETUNED.betas, RETUNED.eps)}
        assert sorted(g["weight_decay"] for g in groups) == [0.0, RETUNED.weight_decay]
        runs[name] = {"lr": _steps(second, range(2, 4)), "weights": _whole(second.state_dict()["model"])}
        second.close()
        first.close()
    assert runs["fsdp2"]["lr"] == runs["local"]["lr"] == [RETUNED.lr * lr_factor(k, RETUNED) for k in (2, 3)]
    start = worker.start_weights()  # the same 4 AdamW updates, as far as float reassociation lets them agree
    assert_adam_trained_alike(runs["fsdp2"]["weights"], runs["local"]["weights"], start)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_network_built_for_inference_holds_loaded_weights_and_takes_no_optimizer(
    group_of_one: None, dtype: torch.dtype
) -> None:
    """Sharded, in the inference dtype, uninitialised until loaded; samples like the local runtime's network."""
    runtime = FSDP2Runtime(**worker.OPTIONS)
    model = runtime.build_network(worker.SPEC, inference_dtype=dtype)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {dtype}
    start = worker.start_weights()
    runtime.load_weights(start)
    got = _whole(runtime.weights())
    assert got.keys() == start.keys() and all(torch.equal(got[k], v.to(dtype)) for k, v in start.items())
    local = LocalRuntime(device="cpu")
    reference = local.build_network(worker.SPEC, inference_dtype=dtype)
    local.load_weights(start)
    b = worker.batch(0)
    t = torch.full((b.size,), 500.0)
    with torch.no_grad():
        ours, theirs = (
            runtime.inference_model()(b.latents, t, b.text),
            reference(b.latents.to(dtype), t, b.text.to(dtype)),
        )
    assert ours.dtype == theirs.dtype == dtype
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= (1e-5 if dtype == torch.float32 else 2e-2)
    with pytest.raises(RuntimeError, match="inference_dtype takes no optimizer"):
        runtime.attach_optimizer(FIRST)
    with pytest.raises(RuntimeError, match=r"attach_optimizer\(settings\) must be called first"):
        runtime.state_dict()
    runtime.close()
