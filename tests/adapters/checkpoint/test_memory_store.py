"""InMemoryCheckpointStore, and the behaviour it must share with DCPCheckpointStore (run on both)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dfm.adapters.checkpoint import DCPCheckpointStore
from dfm.adapters.memory.checkpoint import InMemoryCheckpointStore
from dfm.ports.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore

Factory = Callable[..., Any]


def nested_state() -> dict[str, Any]:
    """Model + optimizer-like state with int keys, tensors of several dtypes, plain values and lists."""
    g = torch.Generator().manual_seed(3)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).to(torch.bfloat16)},
        "optim": {"state": {0: {"exp_avg": torch.randn(4, 3, generator=g), "count": 2}}, "param_groups": [{"lr": 0.1}]},
        "lists": [torch.arange(3), torch.ones(2, dtype=torch.float64)],
        "progress": {"step": 9, "loss": 0.5, "name": "x", "seen": [4, 5]},
    }


def blank_state() -> dict[str, Any]:
    """``nested_state``'s structure with zeros and blanks, to load into."""
    return {
        "model": {"w": torch.zeros(4, 3), "b": torch.zeros(3, dtype=torch.bfloat16)},
        "optim": {"state": {0: {"exp_avg": torch.zeros(4, 3), "count": 0}}, "param_groups": [{"lr": 0.0}]},
        "lists": [torch.zeros(3, dtype=torch.long), torch.zeros(2, dtype=torch.float64)],
        "progress": {"step": 0, "loss": 0.0, "name": "", "seen": []},
    }


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of nested states."""
    if isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in b)
    if isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b and type(a) is type(b)


@pytest.fixture(params=["memory", "dcp"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    """Builds either store with the same arguments, so every test below runs on both."""
    if request.param == "memory":
        return lambda **kwargs: InMemoryCheckpointStore(**kwargs)
    return lambda **kwargs: DCPCheckpointStore(tmp_path / "ckpt", **kwargs)


def test_round_trip_in_place(make_store: Factory) -> None:
    store = make_store()
    assert isinstance(store, CheckpointStore)
    info = store.save(7, nested_state(), {"config": "a: 1", "data": {"i": 3}, "pair": (1, 2)})
    assert info.step == 7 and info.path.name == "step_0000007"
    target = blank_state()
    weight = target["model"]["w"]
    meta = store.load(info, target)
    assert meta == {"config": "a: 1", "data": {"i": 3}, "pair": [1, 2]}  # meta goes through JSON
    assert same(target, nested_state())
    assert target["model"]["w"] is weight


def test_latest_list_and_root_loading(make_store: Factory) -> None:
    store = make_store()
    assert store.latest() is None and store.list() == []
    for step in (3, 1, 2):
        store.save(step, {"w": torch.full((1,), float(step))}, {"at": step})
    assert [info.step for info in store.list()] == [1, 2, 3]
    assert store.latest().step == 2  # the last saved, as the DCP store's latest pointer says
    target = {"w": torch.zeros(1)}
    assert store.load(store.latest().path.parent, target) == {"at": 2} and target["w"].item() == 2.0
    assert store.read_meta(store.list()[0]) == {"at": 1}


def test_retention_keeps_the_newest_and_the_one_just_saved(make_store: Factory) -> None:
    store = make_store(keep_last=2)
    for step in range(1, 6):
        store.save(step, {"w": torch.ones(1)}, {})
    assert [info.step for info in store.list()] == [4, 5]
    store.save(2, {"w": torch.ones(1)}, {})
    assert [info.step for info in store.list()] == [2, 5]
    assert store.latest().step == 2


def test_same_step_replaces(make_store: Factory) -> None:
    store = make_store()
    store.save(1, {"w": torch.ones(1)}, {"v": 1})
    store.save(1, {"w": torch.full((1,), 2.0)}, {"v": 2})
    target = {"w": torch.zeros(1)}
    assert store.load(store.latest(), target) == {"v": 2} and target["w"].item() == 2.0
    assert len(store.list()) == 1


def test_mismatch_is_reported_alike_and_changes_nothing(make_store: Factory) -> None:
    store = make_store()
    info = store.save(1, {"model": {"a": torch.ones(2), "b": torch.ones(3)}, "n": 1}, {})
    target = {"model": {"a": torch.zeros(2), "b": torch.zeros(4), "c": torch.zeros(1)}, "n": 0}
    with pytest.raises(CheckpointError) as caught:
        store.load(info, target)
    assert str(caught.value) == (
        f"checkpoint {info.path} does not match the state to load: 1 key missing from the checkpoint: model.c; "
        "model.b has shape (4,) in the state but (3,) in the checkpoint"
    )
    assert target["model"]["a"].sum() == 0 and target["n"] == 0


def test_bad_inputs_are_refused_alike(make_store: Factory) -> None:
    store = make_store()
    with pytest.raises(CheckpointError, match="meta must be JSON-safe"):
        store.save(1, {"w": torch.ones(1)}, {"t": torch.ones(1)})
    with pytest.raises(CheckpointError, match="top-level keys of a checkpoint state must be strings"):
        store.save(1, {3: torch.ones(1)}, {})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        store.save(-1, {"w": torch.ones(1)}, {})
    with pytest.raises(ValueError, match="keep_last"):
        make_store(keep_last=0)
    assert store.list() == [] and store.latest() is None


def test_saved_copies_are_independent() -> None:
    store = InMemoryCheckpointStore()
    state = {"w": torch.ones(2), "cfg": {"xs": [1, 2]}}
    store.save(1, state, {"m": [1]})
    state["w"].add_(5)
    state["cfg"]["xs"].append(3)
    target = {"w": torch.zeros(2), "cfg": {"xs": []}}
    store.load(store.latest(), target)
    assert target["w"].tolist() == [1.0, 1.0] and target["cfg"]["xs"] == [1, 2]
    target["cfg"]["xs"].append(9)
    again = {"w": torch.zeros(2), "cfg": {"xs": []}}
    meta = store.load(store.latest(), again)
    assert again["cfg"]["xs"] == [1, 2]
    meta["m"].append(2)
    assert store.read_meta(store.latest()) == {"m": [1]}


def test_paths_and_unknown_checkpoints() -> None:
    store = InMemoryCheckpointStore(name="run-a")
    assert store.save(5, {"w": torch.ones(1)}, {}) == CheckpointInfo(step=5, path=Path("run-a/step_0000005"))
    with pytest.raises(CheckpointError, match="does not exist in the in-memory store run-a"):
        store.load(Path("run-a/step_0000006"), {"w": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="no checkpoint in the in-memory store"):
        InMemoryCheckpointStore().load(Path("memory"), {})
