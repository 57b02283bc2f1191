"""WAN 2.1 weights in diffusers' directory layout (``WanTransformer3DModel.save_pretrained``).

A directory holds ``config.json`` and either ``diffusion_pytorch_model.safetensors`` or shards listed
by ``diffusion_pytorch_model.safetensors.index.json``. Parameter names are the same in dfm and
diffusers, so moving weights is reading and writing files: no renaming, no pickle.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dfm.domain.specs import WanSpec

CLASS_NAME = "WanTransformer3DModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")

DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 1024,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "pos_embed_seq_len": None,
}
"""``WanTransformer3DModel.__init__`` defaults: what diffusers assumes for a key a config leaves out."""

IMAGE_TO_VIDEO_KEYS = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
"""Config keys that, when not null, describe an image-to-video model."""


def _spec_fields() -> list[str]:
    return [f.name for f in attrs.fields(WanSpec) if f.name != "arch"]


def _diffusers_version() -> str:
    try:
        return metadata.version("diffusers")
    except metadata.PackageNotFoundError:
        return "0.42.1"


def spec_to_config(spec: WanSpec) -> dict[str, Any]:
    """The ``config.json`` content of ``spec`` (every :class:`WanSpec` field but ``arch``; image-to-video keys null
    for a text-to-video model)."""
    config: dict[str, Any] = {"_class_name": CLASS_NAME, "_diffusers_version": _diffusers_version()}
    for name in _spec_fields():
        value = getattr(spec, name)
        config[name] = list(value) if isinstance(value, tuple) else value
    return config


def spec_from_config(config: Mapping[str, Any], *, source: Path | str = CONFIG_NAME) -> WanSpec:
    """Read a diffusers ``WanTransformer3DModel`` config into a :class:`WanSpec`.

    Keys the config leaves out take diffusers' defaults (:data:`DIFFUSERS_DEFAULTS`), as diffusers would.

    Args:
        config: The parsed ``config.json``.
        source: The file it came from, named in errors.

    Raises:
        ValueError: For another ``_class_name``, or invalid values.
    """
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ValueError(f"{source}: _class_name is {name!r}, expected {CLASS_NAME!r} (a WAN 2.1 transformer)")
    if config.get("qk_norm", DIFFUSERS_DEFAULTS["qk_norm"]) != "rms_norm_across_heads":
        raise ValueError(f"{source}: qk_norm={config['qk_norm']!r} is not supported; expected 'rms_norm_across_heads'")
    known = set(_spec_fields())
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        warnings.warn(f"{source}: ignoring config keys dfm does not know: {unknown}", stacklevel=2)
    values = {k: config.get(k, default) for k, default in DIFFUSERS_DEFAULTS.items()}
    values["out_channels"] = values["out_channels"] or values["in_channels"]  # diffusers: `out_channels or in_channels`
    try:
        return WanSpec(**values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: invalid WAN config: {err}") from err


def save_wan_diffusers(
    model_state: Mapping[str, torch.Tensor],
    spec: WanSpec,
    out_dir: Path | str,
    *,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model_state`` and ``spec`` as a diffusers ``WanTransformer3DModel`` directory.

    Files are written aside and renamed into place, ``config.json`` last.

    Args:
        model_state: Parameter name -> tensor (diffusers names, i.e. a :class:`WanTransformer` state dict).
        spec: The architecture, written as ``config.json``.
        out_dir: Target directory (created if missing).
        max_shard_bytes: Split the weights into shards of at most this size, with an index file.
        overwrite: Replace the WAN files of a directory that already holds some.

    Returns:
        ``out_dir``.

    Raises:
        ValueError: If ``out_dir`` is a file, or already holds WAN files and ``overwrite`` is false.
    """
    out = Path(out_dir)
    existing = existing_wan_files(out, overwrite=overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out / name).unlink()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        _atomic_save(shards[0], out / WEIGHTS_NAME)
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, start=1):
            file = shard_file_name(i, len(shards))
            _atomic_save(shard, out / file)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json({"metadata": {"total_size": total}, "weight_map": weight_map}, out / INDEX_NAME)
    atomic_write_json(spec_to_config(spec), out / CONFIG_NAME)
    return out


def load_wan_diffusers(model_dir: Path | str) -> tuple[WanSpec, dict[str, torch.Tensor]]:
    """Read a diffusers ``WanTransformer3DModel`` directory (single file or sharded safetensors).

    Args:
        model_dir: Directory with ``config.json`` and the safetensors weights.

    Returns:
        ``(spec, state_dict)``; tensors keep the dtype stored in the files.

    Raises:
        ValueError: Naming the file at fault: a missing directory, config or weights file, another model
            class, an image-to-video config, pickle-only weights, or unreadable files.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory (expected a diffusers WanTransformer3DModel directory)")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing; a diffusers model directory needs config.json beside its weights")
    spec = spec_from_config(_read_json(config_path), source=config_path)
    return spec, _load_weights(root)


def _load_weights(root: Path) -> dict[str, torch.Tensor]:
    single, index = root / WEIGHTS_NAME, root / INDEX_NAME
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        return _load_sharded(index)
    pickled = [n for n in PICKLE_NAMES if (root / n).exists()]
    hint = f"; found only pickle weights {pickled}, which dfm does not load (re-save as safetensors)" if pickled else ""
    raise ValueError(f"{single}: missing (and no {INDEX_NAME}){hint}")


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: no 'weight_map' of parameter name -> shard file")
    state: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        shard = index.parent / file
        if not shard.is_file():
            raise ValueError(f"{shard}: missing, but {index.name} lists it")
        state.update(_load_safetensors(shard))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"{index}: shards lack listed tensors {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return state


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def shard_plan(sizes: Mapping[str, int], max_bytes: int | None) -> list[list[str]]:
    """Names per shard: in the given order, groups of at most ``max_bytes`` (a larger tensor gets a shard
    of its own); one shard when ``max_bytes`` is ``None``.

    Raises:
        ValueError: ``max_bytes`` is not positive.
    """
    if max_bytes is None:
        return [list(sizes)]
    if max_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def shard_file_name(index: int, count: int) -> str:
    """diffusers' name of weights file ``index`` (from 1) of ``count``."""
    return WEIGHTS_NAME if count == 1 else f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


def existing_wan_files(out: Path, *, overwrite: bool) -> list[str]:
    """The WAN files already in ``out`` (to be replaced).

    Raises:
        ValueError: ``out`` is a file, or holds WAN files and ``overwrite`` is false.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    existing = sorted(p.name for p in out.glob("diffusion_pytorch_model*")) + (
        [CONFIG_NAME] if (out / CONFIG_NAME).exists() else []
    )
    if existing and not overwrite:
        raise ValueError(f"{out} already holds {existing}; choose an empty directory or allow overwriting")
    return existing


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """:func:`shard_plan` of ``tensors``, as tensor dicts."""
    plan = shard_plan({k: t.numel() * t.element_size() for k, t in tensors.items()}, max_bytes)
    return [{k: tensors[k] for k in names} for names in plan]


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)


def atomic_write_json(data: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
