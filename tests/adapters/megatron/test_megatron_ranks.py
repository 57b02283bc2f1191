"""The megatron runtime on 2 gloo ranks against the local runtime (the single-process reference).

One launch of ``megatron_worker.py`` trains data=2 (also with overlapped gradient reduction and
parameter gathering), tensor=2, tensor=2 with sequence parallelism,
pipeline=2, pipeline=2 x virtual_pipeline=2 (interleaved) and context=2 for 3 steps from the same
weights, and saves a dist checkpoint at tensor=2 that it loads at tensor=2 and at tensor=1.
The reference is ``LocalRuntime`` on the same batches (fp32, same clipping, schedule and weight decay).
Megatron runs on CPU through the test-only patches of ``support.megatron_cpu``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from support.distributed import load_worker, run_ranks

from dfm.adapters.checkpoint import DCPCheckpointStore
from dfm.adapters.local import LocalRuntime

HERE = Path(__file__).resolve().parent
WORKER = HERE / "megatron_worker.py"
LAYOUTS = ["data", "overlap", "tensor", "sequence", "pipeline", "virtual", "context"]
RTOL = 1e-5


worker = load_worker(WORKER, "megatron_worker_shared")
shared = worker.shared


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("megatron")
    ranks = run_ranks(WORKER, 2, [str(out), *LAYOUTS, "resume"], timeout=400)
    return out, ranks[0]


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Local-runtime losses, gradient norms and learning rates of 3 steps, and its weights after 2."""
    runtime = LocalRuntime(**worker.OPTIONS)
    runtime.build(worker.SPEC, shared.SETTINGS)
    runtime.load_initial_weights(worker.start_weights())
    out: dict[str, list[float]] = {"loss": [], "grad_norm": [], "lr": []}
    after_two: dict[str, torch.Tensor] = {}
    for step in range(shared.STEPS):
        if step == 2:
            after_two = {k: v.detach().clone() for k, v in runtime.state_dict()["model"].items()}
        micro = shared.micro_batches(shared.batch(step), 0, shared.GLOBAL_BATCH, 2)
        result = runtime.train_step(micro, shared.loss_fn(step), shared.GLOBAL_BATCH)
        for key in out:
            out[key].append(getattr(result, key))
    return out, after_two


def _close(got: list[float], want: list[float]) -> None:
    for g, w in zip(got, want, strict=True):
        assert abs(g - w) <= RTOL * abs(w), (got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reproduces_the_local_loss(launch: tuple[Path, dict[str, Any]], reference: Any, layout: str) -> None:
    _, result = launch
    want, _ = reference
    got = result[layout]
    _close(got["loss"], want["loss"])
    _close(got["grad_norm"], want["grad_norm"])
    assert got["lr"] == pytest.approx(want["lr"])
    assert got["dp"] == (2 if layout in ("data", "overlap") else 1)


def test_dist_checkpoint_loads_at_another_tensor_size(launch: tuple[Path, dict[str, Any]], reference: Any) -> None:
    out, result = launch
    want, after_two = reference
    saved = load_file(str(out / "saved.safetensors"))
    for name in ("same", "other"):  # tensor=2 -> tensor=2 and tensor=2 -> tensor=1: identical weights
        loaded = load_file(str(out / f"{name}.loaded.safetensors"))
        assert loaded.keys() == saved.keys()
        for key, value in saved.items():
            assert torch.equal(loaded[key], value), (name, key)
    for key, value in after_two.items():  # and they are the local run's weights after 2 steps
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5)
    resumed = result["resume"]
    _close(resumed["first"]["loss"], want["loss"][:2])
    assert resumed["same"]["loss"] == [result["tensor"]["loss"][2]]  # exact resume at the same layout
    _close(resumed["other"]["loss"], want["loss"][2:])


def test_megatron_checkpoint_weights_load_into_the_local_runtime(launch: tuple[Path, dict[str, Any]]) -> None:
    """The dist checkpoint's model entries are plain DCP keys: one process reads them without megatron."""
    out, _ = launch
    runtime = LocalRuntime(**worker.OPTIONS)
    runtime.build(worker.SPEC, shared.SETTINGS)
    state = {"runtime": {"model": runtime.state_dict()["model"]}}
    store = DCPCheckpointStore(out / "ckpt")
    store.load(store.latest(), state)
    saved = load_file(str(out / "saved.safetensors"))
    for key, value in state["runtime"]["model"].items():
        assert torch.equal(value, saved[key]), key
