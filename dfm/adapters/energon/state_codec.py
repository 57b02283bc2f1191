"""Energon loader state <-> JSON-safe data, without pickle (DESIGN.md rule 8).

``SavableDataLoader.save_state_rank()`` returns a tree of energon dataclasses (``SavableDataLoaderState``,
``SavableDatasetCheckpoint``, ``SystemRngState``...), ``FlexState`` dicts whose keys may be tuples, and
leaves that JSON cannot hold: ``bytes`` (random generator states), tuples, torch and numpy arrays.
:func:`encode` turns such a tree into JSON-safe data; :func:`decode` rebuilds an equal tree.

Every value JSON cannot hold natively becomes an object tagged with :data:`TAG`::

    tuple           {"$dfm": "tuple", "v": [...]}
    bytes           {"$dfm": "bytes", "v": "<base64>"}
    dict (any keys) {"$dfm": "dict", "cls": "module:Qualname" | null, "v": [[key, value], ...]}
    torch.Tensor    {"$dfm": "tensor", "dtype": "uint8", "shape": [...], "v": "<base64>"}
    numpy array     {"$dfm": "ndarray", "dtype": "<u4", "shape": [...], "v": "<base64>"}
    numpy scalar    {"$dfm": "npscalar", "dtype": "int64", "v": 3}
    dataclass       {"$dfm": "dataclass", "cls": "module:Qualname", "v": {"field": value, ...}}

Classes are looked up by name only among :data:`ALLOWED_CLASSES` (the energon state classes its loader
states hold, measured on every loader configuration dfm uses: 0 or more workers, packing or not) and
rebuilt from their fields; arrays only of numeric dtypes. Nothing in the data can make :func:`decode`
import a module or run code of its choosing; a loader state holding another class is refused when saved.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
from typing import Any

import numpy as np
import torch

TAG = "$dfm"
"""Key that marks an encoded non-JSON value."""
ALLOWED_CLASSES = frozenset(
    {
        "megatron.energon.flavors.webdataset.sample_loader:SliceState",
        "megatron.energon.rng:SystemRngState",
        "megatron.energon.savable_loader:SavableDataLoaderState",
        "megatron.energon.savable_loader:SavableDatasetCheckpoint",
        "megatron.energon.savable_loader:SavableDatasetState",
        "megatron.energon.state:FlexState",
    }
)
"""The classes (``module:Qualname``) :func:`encode` stores and :func:`decode` rebuilds."""
_NUMERIC_KINDS = "biufc"
"""numpy dtype kinds an encoded array may have (bool, ints, floats, complex)."""


class StateCodecError(ValueError):
    """A loader state that cannot be encoded, or JSON data that is not an encoded loader state."""


def encode(value: Any) -> Any:
    """``value`` as JSON-safe data (see the module docstring)."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {TAG: "tuple", "v": [encode(v) for v in value]}
    if isinstance(value, bytes | bytearray):
        return {TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        cls = None if type(value) is dict else _class_name(type(value))
        return {TAG: "dict", "cls": cls, "v": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().contiguous()
        raw = array.view(torch.uint8).numpy().tobytes() if array.numel() else b""
        return {
            TAG: "tensor",
            "dtype": str(array.dtype).removeprefix("torch."),
            "shape": list(array.shape),
            "v": _b64(raw),
        }
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {TAG: "ndarray", "dtype": array.dtype.str, "shape": list(array.shape), "v": _b64(array.tobytes())}
    if isinstance(value, np.generic):
        return {TAG: "npscalar", "dtype": value.dtype.str, "v": value.item()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {TAG: "dataclass", "cls": _class_name(type(value)), "v": fields}
    raise StateCodecError(f"cannot store a {type(value).__module__}.{type(value).__qualname__} in a JSON loader state")


def decode(data: Any) -> Any:
    """The value :func:`encode` turned into ``data``.

    Raises:
        StateCodecError: ``data`` is not what :func:`encode` writes (unknown tag, class outside
            :data:`ALLOWED_CLASSES`, fields that do not fit the class, malformed values).
    """
    if data is None or isinstance(data, bool | int | float | str):
        return data
    if isinstance(data, list):
        return [decode(v) for v in data]
    if not isinstance(data, dict) or TAG not in data:
        raise StateCodecError(f"not an encoded loader state value: {str(data)[:80]!r}")
    kind = data[TAG]
    try:
        return _DECODERS[kind](data)
    except KeyError as exc:
        raise StateCodecError(f"encoded loader state: unknown tag {kind!r} or missing key {exc}") from None
    except StateCodecError:
        raise
    except (TypeError, ValueError, AttributeError, RuntimeError) as exc:  # malformed: base64, shapes, fields
        raise StateCodecError(f"encoded loader state: malformed {kind!r} value: {exc}") from None


def _decode_dict(data: dict[str, Any]) -> dict[Any, Any]:
    cls = dict if data["cls"] is None else _load_class(data["cls"])
    if not issubclass(cls, dict):
        raise StateCodecError(f"encoded loader state: {data['cls']} is not a dict type")
    return cls((decode(k), decode(v)) for k, v in data["v"])


def _decode_tensor(data: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, data["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise StateCodecError(f"encoded loader state: unknown torch dtype {data['dtype']!r}")
    raw = bytearray(base64.b64decode(data["v"]))
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(data["shape"]).clone()


def _numeric_dtype(name: Any) -> np.dtype:
    try:
        dtype = np.dtype(str(name))
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind not in _NUMERIC_KINDS:
        raise StateCodecError(f"encoded loader state: {name!r} is not a numeric numpy dtype")
    return dtype


def _decode_ndarray(data: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(data["v"])
    return np.frombuffer(raw, dtype=_numeric_dtype(data["dtype"])).reshape(data["shape"]).copy()


def _decode_dataclass(data: dict[str, Any]) -> Any:
    cls = _load_class(data["cls"])
    if not dataclasses.is_dataclass(cls):
        raise StateCodecError(f"encoded loader state: {data['cls']} is not a dataclass")
    values = {name: decode(v) for name, v in data["v"].items()}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if set(values) != set(fields):
        raise StateCodecError(f"encoded loader state: fields {sorted(values)} do not match {data['cls']}")
    obj = cls(**{k: v for k, v in values.items() if fields[k].init})
    for name, v in values.items():
        if not fields[name].init:
            object.__setattr__(obj, name, v)
    return obj


_DECODERS = {
    "tuple": lambda d: tuple(decode(v) for v in d["v"]),
    "bytes": lambda d: base64.b64decode(d["v"]),
    "dict": _decode_dict,
    "tensor": _decode_tensor,
    "ndarray": _decode_ndarray,
    "npscalar": lambda d: _numeric_dtype(d["dtype"]).type(d["v"]),
    "dataclass": _decode_dataclass,
}


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _class_name(cls: type) -> str:
    name = f"{cls.__module__}:{cls.__qualname__}"
    if name not in ALLOWED_CLASSES:
        raise StateCodecError(
            f"cannot store an instance of {name} in a JSON loader state (not one of energon's known state classes; "
            "this energon version's loader state needs dfm's state codec extended)"
        )
    return name


def _load_class(name: str) -> type:
    if name not in ALLOWED_CLASSES:
        raise StateCodecError(f"encoded loader state names class {name!r}, which is not an energon state class")
    module, _, qualname = name.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, type):
        raise StateCodecError(f"encoded loader state names class {name!r}, which does not exist")
    return obj
