"""LoRA adapter files in the diffusers format, and merging adapters into weights.

The file ``convert export-lora`` writes is what ``WanPipeline.load_lora_weights`` and
``WanTransformer3DModel.load_lora_adapter`` read: safetensors with ``transformer.<module>.lora_A.weight``
(``r x in``) and ``transformer.<module>.lora_B.weight`` (``out x r``), module names as in
``WanTransformer3DModel`` (dfm's WAN network uses the same). The scale ``alpha / r`` is folded into ``B``, so the
file needs no alpha: every loader (diffusers infers ``alpha = r`` without metadata; ComfyUI) applies ``B A``.
dfm's own settings ride along in the safetensors metadata (``dfm_lora``).

Reading goes through diffusers' ``WanLoraLoaderMixin.lora_state_dict``, so the community namings it converts
load too: the original WAN/kohya-style ``diffusion_model.blocks.N.self_attn.q.lora_down.weight`` (with
``.alpha``, ``.diff_b``) and musubi-tuner's ``lora_unet_blocks_N_...``. What comes back is the diffusers naming
with alphas folded in, and optionally ``lora_B.bias`` (bias deltas); :func:`merge_adapters` adds
``B A`` (times a user scale) to each weight.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

PREFIX = "transformer."
"""The diffusers pipeline component the adapters belong to."""
META_KEY = "dfm_lora"


def write_lora_file(
    path: Path | str, adapters: Mapping[str, torch.Tensor], *, scale: float, meta: Mapping[str, object]
) -> Path:
    """Write ``adapters`` (``<module>.lora_A.weight`` / ``.lora_B.weight``, dfm's network names) in diffusers' format.

    ``scale`` (``alpha / r``) is folded into each ``lora_B``; float32 tensors on the CPU. Written atomically.

    Raises:
        ValueError: If a module has only one of ``lora_A`` and ``lora_B``.
    """
    modules = module_pairs(adapters)
    tensors = {}
    for module, (a, b) in modules.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (b.detach().float() * scale).cpu().contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", META_KEY: json.dumps(dict(meta), sort_keys=True)})
    tmp.replace(path)
    return path


def module_pairs(adapters: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` of ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` entries.

    Raises:
        ValueError: For a module with only one half, or an entry of another kind.
    """
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapters.items():
        for half in ("lora_A", "lora_B"):
            suffix = f".{half}.weight"
            if key.endswith(suffix):
                halves.setdefault(key.removesuffix(suffix), {})[half] = value
                break
        else:
            raise ValueError(f"not a LoRA weight: {key!r} (expected <module>.lora_A.weight or .lora_B.weight)")
    broken = sorted(m for m, h in halves.items() if len(h) != 2)
    if broken:
        raise ValueError(f"LoRA modules with only one of lora_A / lora_B: {broken[:5]}")
    return {m: (h["lora_A"], h["lora_B"]) for m, h in halves.items()}


def read_lora_file(path: Path | str) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA file, as ``<module>.lora_A.weight`` / ``.lora_B.weight`` (+ ``.lora_B.bias``).

    Any naming diffusers' WAN loader reads (diffusers/PEFT, WAN/kohya ``diffusion_model.``, musubi
    ``lora_unet_``), alphas folded into the weights (apply ``B A``).

    Raises:
        ValueError: If the file is missing or unreadable, or holds no WAN transformer adapters.
    """
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"LoRA file {path} does not exist")
    try:
        state = WanLoraLoaderMixin.lora_state_dict(str(path))
    except Exception as exc:
        raise ValueError(f"cannot read the LoRA file {path}: {exc}") from None
    adapters = {k.removeprefix(PREFIX): v for k, v in state.items() if k.startswith(PREFIX)}
    others = sorted(k for k in state if not k.startswith(PREFIX))
    if others or not adapters:
        raise ValueError(
            f"{path} holds no WAN transformer LoRA in a naming dfm reads (diffusers, WAN/kohya, musubi); "
            f"unexpected keys: {others[:5]}"
        )
    return adapters


@torch.no_grad()
def merge_adapters(
    weights: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """``weights`` with ``scale * B A`` added to each adapted ``<module>.weight`` (and ``scale * bias`` deltas).

    Computed in float32, returned in each weight's dtype; the other weights are the same tensors.

    Raises:
        ValueError: If an adapter names a module the weights lack, or its shapes do not fit.
    """
    biases = {k.removesuffix(".lora_B.bias"): v for k, v in adapters.items() if k.endswith(".lora_B.bias")}
    pairs = module_pairs({k: v for k, v in adapters.items() if not k.endswith(".lora_B.bias")})
    missing = sorted(m for m in set(pairs) | set(biases) if f"{m}.weight" not in weights)
    if missing:
        raise ValueError(f"the LoRA adapts modules this model does not have: {missing[:5]}")
    out = dict(weights)
    for module, (a, b) in pairs.items():
        w = weights[f"{module}.weight"]
        if a.shape[1] != w.shape[1] or b.shape[0] != w.shape[0] or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA of {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit its weight {tuple(w.shape)}"
            )
        delta = b.to(torch.float32, copy=False) @ a.to(torch.float32, copy=False)
        out[f"{module}.weight"] = (w.float() + scale * delta.to(w.device)).to(w.dtype)
    for module, delta_b in biases.items():
        bias = weights[f"{module}.bias"]
        out[f"{module}.bias"] = (bias.float() + scale * delta_b.float().to(bias.device)).to(bias.dtype)
    return out
