"""A checkpoint from a stranger cannot run code: no pickle is written, and none is read but through refusing readers.

Every crafted checkpoint here carries a payload that creates a marker file when unpickled, with the
manifest re-hashed to match (whoever hands over a checkpoint writes its manifest too). Loading must
refuse it with a clear error, or never read the crafted file, and the marker must never appear.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from support.checkpoints import Payload, payload_pickle, replace_file, rewrite_manifest, write_v1_checkpoint

from dfm.adapters.checkpoint import DCPCheckpointStore
from dfm.adapters.checkpoint._tree import flatten, set_leaf
from dfm.app import bootstrap
from dfm.app.config import resolve_config
from dfm.ports.checkpoint import CheckpointError


def runtime_state(seed: int = 0) -> dict[str, Any]:
    """A real training state (the local runtime's model, AdamW, schedule and EMA, and the RNG), as checkpointed."""
    torch.manual_seed(seed)
    cfg = resolve_config("wan_tiny_t2v", None, ["train.ema_decay=0.9"])
    runtime = bootstrap.build_runtime(cfg)
    runtime.build_network(cfg.model)
    runtime.attach_optimizer(bootstrap.optimizer_settings(cfg))
    return {"runtime": runtime.state_dict(), "rng": {"torch": torch.get_rng_state()}}


def fresh_target() -> dict[str, Any]:
    """The state a resuming run loads into (other initial weights)."""
    return runtime_state(seed=1)


PLAIN_KEYS = sorted(flatten(runtime_state(), lambda v: isinstance(v, torch.Tensor)).plain)
"""Every non-tensor entry of a training checkpoint (optimizer settings, schedule counters)."""


def leaves(state: dict[str, Any]) -> dict[str, Any]:
    return flatten(state, lambda v: isinstance(v, torch.Tensor)).engine | flatten(state, lambda v: False).plain


def assert_loaded(target: dict[str, Any], saved: dict[str, Any]) -> None:
    """Every tensor bit-identical and every plain value equal (tuples included)."""
    got = flatten(target, lambda v: isinstance(v, torch.Tensor))
    want = flatten(saved, lambda v: isinstance(v, torch.Tensor))
    assert got.engine.keys() == want.engine.keys() and got.plain.keys() == want.plain.keys()
    for key, value in want.engine.items():
        assert torch.equal(got.engine[key], value), key
    for key, value in want.plain.items():
        assert got.plain[key] == value and type(got.plain[key]) is type(value), key


def test_a_saved_checkpoint_holds_no_pickle_and_round_trips(tmp_path: Path) -> None:
    saved = runtime_state()
    info = DCPCheckpointStore(tmp_path).save(3, saved, {"step": 3})
    files = sorted(p.relative_to(info.path).as_posix() for p in info.path.rglob("*") if p.is_file())
    assert files == [
        "manifest.json",
        "meta.json",
        "state.json",
        "tensors/shard-00001-model-00001-of-00001.safetensors",
    ]
    plain = json.loads((info.path / "state.json").read_text())["values"]
    assert plain["runtime.optimizer.param_groups.0.betas"] == [0.9, 0.999]
    target = fresh_target()
    DCPCheckpointStore(tmp_path).load(info, target)
    assert_loaded(target, saved)
    assert isinstance(target["runtime"]["optimizer"]["param_groups"][0]["betas"], tuple)


def test_a_layout_version_1_checkpoint_loads_through_the_refusing_readers(tmp_path: Path) -> None:
    saved = runtime_state()
    write_v1_checkpoint(tmp_path, 3, saved, {"step": 3})
    target = fresh_target()
    assert DCPCheckpointStore(tmp_path).load(tmp_path, target) == {"step": 3}
    assert_loaded(target, saved)


def test_a_crafted_v1_metadata_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    directory = write_v1_checkpoint(tmp_path / "ckpt", 3, runtime_state(), {"step": 3})
    replace_file(directory, ".metadata", payload_pickle(marker))
    with pytest.raises(CheckpointError) as caught:
        DCPCheckpointStore(tmp_path / "ckpt").load(directory, fresh_target())
    assert "refers to posix.system, which DCP metadata never contains: refusing to unpickle it" in str(caught.value)
    assert str(caught.value).startswith(f"could not load checkpoint {directory}: {directory / '.metadata'}")
    assert not marker.exists()


@pytest.mark.parametrize("key", PLAIN_KEYS)
def test_each_crafted_v1_value_is_refused_and_runs_nothing(tmp_path: Path, key: str) -> None:
    marker = tmp_path / "pwned"
    crafted = runtime_state()
    set_leaf(crafted, flatten(crafted, lambda v: isinstance(v, torch.Tensor)).paths[key], Payload(marker))
    directory = write_v1_checkpoint(tmp_path / "ckpt", 3, crafted, {"step": 3})
    with pytest.raises(CheckpointError) as caught:
        DCPCheckpointStore(tmp_path / "ckpt").load(directory, fresh_target())
    assert f"the checkpoint's value of {key} is not plain data" in str(caught.value)
    assert "refusing to load it" in str(caught.value)
    assert not marker.exists()


def test_pickles_slipped_into_a_checkpoint_are_never_read(tmp_path: Path) -> None:
    """A v2 checkpoint with pickle files added (and listed in the manifest) loads without touching them."""
    marker = tmp_path / "pwned"
    saved = runtime_state()
    info = DCPCheckpointStore(tmp_path / "ckpt").save(3, saved, {"step": 3})
    for name in (".metadata", "__0_0.distcp", "common.pt", "tensors/.metadata", "tensors/common.pt"):
        (info.path / name).write_bytes(payload_pickle(marker))
    rewrite_manifest(info.path)
    target = fresh_target()
    DCPCheckpointStore(tmp_path / "ckpt").load(info, target)
    assert_loaded(target, saved)
    assert not marker.exists()


def test_a_pickle_in_place_of_the_tensors_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    info = DCPCheckpointStore(tmp_path / "ckpt").save(3, runtime_state(), {"step": 3})
    replace_file(info.path, "tensors/shard-00001-model-00001-of-00001.safetensors", payload_pickle(marker))
    with pytest.raises(CheckpointError, match=f"could not load checkpoint {info.path}: "):
        DCPCheckpointStore(tmp_path / "ckpt").load(info, fresh_target())
    assert not marker.exists()


def test_a_v2_checkpoint_relabelled_as_version_1_is_refused(tmp_path: Path) -> None:
    """Relabelling a checkpoint as the pickle-era layout routes it to the refusing readers."""
    marker = tmp_path / "pwned"
    info = DCPCheckpointStore(tmp_path / "ckpt").save(3, runtime_state(), {"step": 3})
    (info.path / ".metadata").write_bytes(payload_pickle(marker))
    meta = json.loads((info.path / "meta.json").read_text())
    (info.path / "meta.json").write_text(json.dumps(meta | {"version": 1}))
    rewrite_manifest(info.path, version=1)
    with pytest.raises(CheckpointError, match=r"refers to posix\.system"):
        DCPCheckpointStore(tmp_path / "ckpt").load(info, fresh_target())
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("runtime.optimizer.param_groups.0.lr", "os.system", "param_groups.0.lr is a float in the state but a str"),
        ("runtime.scheduler.last_epoch", 2.5, "scheduler.last_epoch is a int in the state but a float"),
        ("runtime.optimizer.param_groups.0.betas", {"a": 1}, "param_groups.0.betas is a list in the state but a dict"),
        ("runtime.optimizer.param_groups.0.amsgrad", 1, "param_groups.0.amsgrad is a bool in the state but a int"),
    ],
)
def test_a_crafted_plain_value_of_the_wrong_kind_is_refused(tmp_path: Path, key: str, value: Any, message: str) -> None:
    info = DCPCheckpointStore(tmp_path / "ckpt").save(3, runtime_state(), {"step": 3})
    document = json.loads((info.path / "state.json").read_text())
    document["values"][key] = value
    replace_file(info.path, "state.json", json.dumps(document).encode())
    target = fresh_target()
    before = target["runtime"]["model"]["proj_out.weight"].clone()
    with pytest.raises(CheckpointError, match="does not match the state to load") as caught:
        DCPCheckpointStore(tmp_path / "ckpt").load(info, target)
    assert message in str(caught.value)
    assert torch.equal(target["runtime"]["model"]["proj_out.weight"], before)  # nothing loaded


def test_a_value_that_is_neither_a_tensor_nor_plain_data_is_not_saved(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint state entry x\.y is a Payload; a checkpoint holds tensors"):
        DCPCheckpointStore(tmp_path).save(1, {"x": {"y": Payload(tmp_path / "m")}}, {})
    assert not (tmp_path / "step_0000001").exists()
