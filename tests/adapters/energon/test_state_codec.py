"""The energon loader state as JSON: real states round-trip; crafted ones are refused and import nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from support.shards import make_samples, write_prepared

from dfm.adapters.energon import EnergonSource
from dfm.adapters.energon import state_codec as codec

pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
SHAPES = ((4, 2, 4, 6), (4, 2, 6, 4))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = make_samples(24, latent_shapes=SHAPES, text_dim=8, max_text_len=6)
    return write_prepared(tmp_path_factory.mktemp("codec"), samples)


def loader_state(path: Path, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"global_batch_size": 4, "micro_batch_size": 2, "seed": 3, "text_len": 7, "text_dim": 8}
    src = EnergonSource(path, **{**args, "shuffle_buffer": 4, "max_samples_per_sequence": 4, **kw})
    it = iter(src)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(src.state_dict()))
    src.close()
    return state


def classes(data: Any) -> set[str]:
    if isinstance(data, dict):
        own = {data["cls"]} if data.get("cls") else set()
        return own.union(*(classes(v) for v in data.values()))
    if isinstance(data, list):
        return set().union(*(classes(v) for v in data))
    return set()


@pytest.mark.parametrize(
    "kw", [{"num_workers": 0}, {"num_workers": 2}, {"num_workers": 0, "packing": True}], ids=["0", "2", "packed"]
)
def test_real_loader_states_round_trip_within_the_allowed_classes(shards: Path, kw: dict[str, Any]) -> None:
    encoded = loader_state(shards, **kw)["loader"]
    assert classes(encoded) <= codec.ALLOWED_CLASSES
    assert codec.encode(codec.decode(encoded)) == encoded


@pytest.mark.parametrize(
    ("crafted", "message"),
    [
        ({"$dfm": "dataclass", "cls": "os:system", "v": {}}, "'os:system', which is not an energon state class"),
        (
            {"$dfm": "dict", "cls": "megatron.energon.tools.checkpoint:Evil", "v": []},
            "which is not an energon state class",
        ),
        ({"$dfm": "ndarray", "dtype": "O", "shape": [1], "v": ""}, "'O' is not a numeric numpy dtype"),
        ({"$dfm": "npscalar", "dtype": "object", "v": 1}, "'object' is not a numeric numpy dtype"),
        (
            {"$dfm": "dataclass", "cls": "megatron.energon.rng:SystemRngState", "v": {"torch": 1}},
            "fields ['torch'] do not match",
        ),
        ({"$dfm": "bytes", "v": "not base64!"}, "malformed 'bytes' value"),
        ({"$dfm": "tensor", "dtype": "float32", "shape": [3], "v": "AAAA"}, "malformed 'tensor' value"),
        ({"$dfm": "pickle", "v": "gASV"}, "unknown tag 'pickle'"),
    ],
)
def test_a_crafted_state_is_refused_without_importing_anything(crafted: dict[str, Any], message: str) -> None:
    before = set(sys.modules)
    with pytest.raises(codec.StateCodecError) as caught:
        codec.decode({"$dfm": "tuple", "v": [1, crafted]})
    assert message in str(caught.value)
    assert set(sys.modules) == before


def test_a_crafted_loader_state_in_a_checkpoint_is_a_clear_error(shards: Path) -> None:
    state = loader_state(shards)
    state["loader"] = {"$dfm": "dataclass", "cls": "subprocess:Popen", "v": {"args": ["touch", "/tmp/x"]}}
    fresh = EnergonSource(
        shards,
        global_batch_size=4,
        micro_batch_size=2,
        seed=3,
        text_len=7,
        text_dim=8,
        shuffle_buffer=4,
        max_samples_per_sequence=4,
    )
    with pytest.raises(ValueError, match=r"cannot resume energon data: .*'subprocess:Popen', which is not an energon"):
        fresh.load_state_dict(state)
