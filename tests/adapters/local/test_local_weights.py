"""The local runtime's separate steps: the network alone (to train, or empty in an inference dtype), the optimizer
attached to it, and weights read, loaded and restored from one entry of a checkpoint without optimizer state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from support.networks import inference_dtype_of, tiny_network

from dfm.adapters.checkpoint import DCPCheckpointStore
from dfm.adapters.local import LocalRuntime, is_checkpointed
from dfm.domain.batch import Batch
from dfm.domain.diffusion import FlowMatching
from dfm.domain.objective import training_loss
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import WAN_TINY
from dfm.ports.runtime import OptimizerSettings, ParallelRuntime

SETTINGS = OptimizerSettings(lr=1e-2)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def source_weights() -> dict[str, torch.Tensor]:
    """Tiny WAN weights with no all-zero tensor (so a load that skipped one would show)."""
    return {k: v.detach().clone() for k, v in tiny_network("wan").state_dict().items()}


def trained(tmp_path: Path, **options: Any) -> tuple[LocalRuntime, Path]:
    """A runtime that took one step (its EMA then differs from its weights), checkpointed like training does."""
    runtime = LocalRuntime(device="cpu", precision="fp32", **options)
    runtime.build_network(WAN_TINY)
    runtime.attach_optimizer(SETTINGS)
    runtime.load_weights(source_weights())
    g = torch.Generator().manual_seed(3)
    batch = Batch(
        latents=torch.randn(2, WAN_TINY.in_channels, 2, 4, 4, generator=g),
        text=torch.randn(2, 5, WAN_TINY.text_dim, generator=g),
        sample_index=torch.arange(2),
    )
    result = runtime.train_step([batch], lambda m, b: training_loss(m, b, FlowMatching(), SampleRNG(seed=0, step=0)), 2)
    assert not result.skipped
    info = DCPCheckpointStore(tmp_path).save(1, {"runtime": runtime.state_dict(), "rng": {"x": torch.ones(1)}}, {})
    return runtime, info.path


def clones(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in weights.items()}


class RecordingReader:
    """Loads from a checkpoint through the DCP store, recording the keys it was asked for."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: list[str] = []

    def __call__(self, state: dict[str, Any]) -> None:
        self.keys += [f"{top}.{name}" for top, entries in state.items() for name in entries]
        DCPCheckpointStore(self.directory.parent).load(self.directory, {"runtime": state})


def test_a_network_built_for_inference_is_allocated_in_its_dtype_and_takes_no_optimizer() -> None:
    runtime = LocalRuntime(device="cpu", ema_decay=0.9, activation_checkpointing="full")
    assert isinstance(runtime, ParallelRuntime)
    model = runtime.build_network(WAN_TINY, inference_dtype=torch.bfloat16)
    assert all(p.dtype == inference_dtype_of(n, torch.bfloat16) for n, p in model.named_parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}  # declared parts stay fp32
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert not any(is_checkpointed(block) for block in model.blocks)
    source = source_weights()
    runtime.load_weights(source)
    got = runtime.weights()  # no EMA is attached: the network's weights, whatever use_ema says
    assert got.keys() == source.keys()
    assert all(torch.equal(got[k], source[k].to(inference_dtype_of(k, torch.bfloat16))) for k in source)
    assert runtime.inference_model() is model and runtime.inference_model(use_ema=False) is model
    with pytest.raises(RuntimeError, match="inference_dtype takes no optimizer"):
        runtime.attach_optimizer(SETTINGS)
    with pytest.raises(RuntimeError, match=r"attach_optimizer\(settings\) must be called first"):
        runtime.state_dict()
    with pytest.raises(ValueError, match="floating type"):
        LocalRuntime(device="cpu").build_network(WAN_TINY, inference_dtype=torch.int8)


def test_the_training_network_takes_its_optimizer_ema_and_checkpointing_when_attached() -> None:
    runtime = LocalRuntime(device="cpu", ema_decay=0.9, activation_checkpointing="full")
    model = runtime.build_network(WAN_TINY)
    assert model.training and all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert runtime.inference_model(use_ema=True) is model  # no EMA before attach_optimizer
    runtime.attach_optimizer(SETTINGS)
    assert all(is_checkpointed(block) for block in model.blocks)
    ema = runtime.inference_model(use_ema=True)
    assert ema is not model and not any(is_checkpointed(block) for block in ema.blocks)
    assert set(runtime.state_dict()) == {"model", "optimizer", "scheduler", "ema"}
    assert all(torch.equal(runtime.weights()[k], v) for k, v in runtime.weights(use_ema=False).items())
    with pytest.raises(RuntimeError, match="already called"):
        runtime.attach_optimizer(SETTINGS)
    rebuilt = runtime.build_network(WAN_TINY)  # building again starts over: no optimizer, no EMA
    assert rebuilt is not model and runtime.inference_model(use_ema=True) is rebuilt
    with pytest.raises(RuntimeError, match=r"attach_optimizer\(settings\) must be called first"):
        runtime.state_dict()
    with pytest.raises(RuntimeError, match=r"build_network\(spec\) must be called first"):
        LocalRuntime(device="cpu").attach_optimizer(SETTINGS)


@pytest.mark.parametrize(
    ("ema_decay", "use_ema", "which"), [(0.9, True, "ema"), (0.9, False, "model"), (None, True, "model")]
)
def test_restore_weights_reads_only_the_chosen_weights_of_a_checkpoint(
    tmp_path: Path, ema_decay: float | None, use_ema: bool, which: str
) -> None:
    source, directory = trained(tmp_path, ema_decay=0.9)
    want = clones(source.weights(use_ema=which == "ema"))
    assert any(not torch.equal(want[k], v) for k, v in source.weights(use_ema=which != "ema").items())
    runtime = LocalRuntime(device="cpu", ema_decay=ema_decay)
    model = runtime.build_network(WAN_TINY, inference_dtype=torch.float32)
    read = RecordingReader(directory)
    assert runtime.restore_weights(read, use_ema=use_ema) == which
    prefix = f"{which}.module." if which == "ema" else "model."
    assert sorted(read.keys) == sorted(prefix + name for name in want)  # no optimizer state, no n_averaged
    got = model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_restore_weights_casts_into_a_bf16_network_and_takes_new_tensors_from_a_reader(tmp_path: Path) -> None:
    source, directory = trained(tmp_path, ema_decay=0.9)
    ema = clones(source.weights(use_ema=True))
    runtime = LocalRuntime(device="cpu", ema_decay=0.9)
    model = runtime.build_network(WAN_TINY, inference_dtype=torch.bfloat16)
    assert runtime.restore_weights(RecordingReader(directory)) == "ema"
    assert all(torch.equal(model.state_dict()[k], v.to(inference_dtype_of(k, torch.bfloat16))) for k, v in ema.items())

    def replacing(state: dict[str, Any]) -> None:  # like megatron's IO, which returns the tensors it loaded
        state["ema"] = {k: 2 * ema[k.removeprefix("module.")] for k in state["ema"]}

    other = LocalRuntime(device="cpu", ema_decay=0.9)
    network = other.build_network(WAN_TINY, inference_dtype=torch.float32)
    other.restore_weights(replacing)
    assert all(torch.equal(network.state_dict()[k], 2 * v) for k, v in ema.items())


def test_weights_load_into_a_training_runtime_only_before_its_first_step(tmp_path: Path) -> None:
    source, directory = trained(tmp_path, ema_decay=0.9)
    fresh = LocalRuntime(device="cpu", ema_decay=0.5)
    fresh.build_network(WAN_TINY)
    fresh.attach_optimizer(SETTINGS)
    assert fresh.restore_weights(RecordingReader(directory)) == "ema"  # e.g. finetuning from a checkpoint's EMA
    want = source.weights(use_ema=True)
    for use_ema in (False, True):  # the EMA restarts at the loaded weights
        assert all(torch.equal(fresh.weights(use_ema=use_ema)[k], v) for k, v in want.items())
    for load in (
        lambda: source.load_weights(source_weights()),
        lambda: source.restore_weights(RecordingReader(directory)),
    ):
        with pytest.raises(RuntimeError, match="before the first train_step; to resume a run use load_state_dict"):
            load()
