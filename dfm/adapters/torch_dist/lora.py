"""LoRA on a network's linears with ``peft``: injection, seeded initialisation, tensor-parallel plan, names.

``peft.inject_adapter_in_model`` wraps each targeted ``nn.Linear`` in a ``peft`` LoRA layer: the linear becomes
its ``base_layer`` (frozen) and the adapter adds ``lora_A.default`` (``r x in``) and ``lora_B.default``
(``out x r``), computing ``W x + b + (alpha / r) * B A dropout(x)``. So inside a runtime that trains LoRA the
parameter names are peft's (``blocks.0.attn1.to_q.base_layer.weight``, ``blocks.0.attn1.to_q.lora_A.default.weight``);
:func:`peft_names` maps the network's own names (imported weights) onto them.

Initialisation is dfm's, not peft's (which draws from the global RNG): ``A`` Kaiming-uniform as peft does,
``B`` zero, drawn full-size from a generator seeded by the run's seed (:func:`init_lora`), so every layout
starts from the same adapters. Under tensor parallelism the adapter of a column-parallel linear splits
``B``'s rows like the base (``A`` stays whole), that of a row-parallel linear splits ``A``'s columns (``B``
stays whole) (:func:`lora_parallel_plan`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from collections.abc import Iterator, Mapping

import attrs
import torch
from torch import nn

from dfm.adapters.torch_dist.state import listing
from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.layers import draw_init
from dfm.domain.networks.plan import ParallelPlan
from dfm.domain.networks.registry import network_class
from dfm.domain.specs import ModelSpec
from dfm.ports.runtime import LoraSettings

ADAPTER = "default"
"""peft's adapter name; dfm trains one adapter."""
LORA_SEED_OFFSET = 0x10A
"""The adapters' generator is seeded with ``seed + LORA_SEED_OFFSET``: the base weights' stream stays the same."""


def check_peft() -> None:
    """Raise ``ValueError`` (naming the install) unless ``peft`` can be imported."""
    if importlib.util.find_spec("peft") is None:
        raise ValueError("lora.rank needs the peft library: pip install 'dfm[lora]' (or pip install peft)")


def check_lora_options(settings: LoraSettings | None, *, fp8: bool, compute: torch.dtype) -> None:
    """Raise ``ValueError`` naming the ``lora.*`` key for settings that cannot train (checked before any build)."""
    if settings is None:
        return
    problems = [
        None if settings.rank >= 1 else f"lora.rank must be >= 1, got {settings.rank}",
        None if settings.alpha > 0 else f"lora.alpha must be > 0, got {settings.alpha}",
        None if 0.0 <= settings.dropout < 1.0 else f"lora.dropout must be in [0, 1), got {settings.dropout}",
        None
        if settings.base_dtype.is_floating_point
        else f"lora.base_dtype must be floating, got {settings.base_dtype}",
        "train.fp8 does not combine with lora yet (the adapted linears are peft layers)" if fp8 else None,
        f"lora.base_dtype={_dtype_name(settings.base_dtype)} needs computing in it: set train.precision=bf16"
        if settings.base_dtype != torch.float32 and compute != settings.base_dtype
        else None,
    ]
    if any(problems):
        raise ValueError("; ".join(p for p in problems if p))
    check_peft()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def lora_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Names of the linears ``settings.targets`` (default: the plan's tensor-parallel linears) select.

    Raises:
        ValueError: If the patterns match no module, or match modules that are not linears.
    """
    plan: ParallelPlan = model.parallel_plan
    patterns = settings.targets if settings.targets is not None else plan.column_parallel + plan.row_parallel
    matched = plan.modules_matching(model, tuple(patterns))
    if not matched:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"lora.targets {list(patterns)} match no module; the network's linears: {listing(linears)}")
    wrong = [n for n, m in matched if not isinstance(m, nn.Linear)]
    if wrong:
        raise ValueError(f"lora.targets must select linears only; these are not: {listing(wrong)}")
    return [name for name, _ in matched]


def inject_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Wrap the targeted linears of ``model`` (any device, meta too) in peft LoRA layers; freeze the rest.

    The adapters are float32 and not yet initialised (see :func:`init_lora`). Returns the adapted linears' names.
    """
    check_peft()
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(model, settings)
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for _, layer in lora_layers(model):
        for part in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]):
            part.weight.data = part.weight.data.float()
    return targets


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the peft LoRA layers of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """``A`` Kaiming-uniform (a = sqrt(5), peft's default), ``B`` zero; drawn full-size, so every layout agrees."""
    generator = torch.Generator().manual_seed(seed + LORA_SEED_OFFSET)
    for _, layer in lora_layers(model):
        a = layer.lora_A[ADAPTER].weight
        draw_init(a, lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator), generator)
        layer.lora_B[ADAPTER].weight.zero_()


@contextlib.contextmanager
def base_structure(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with each LoRA layer swapped for its base linear meanwhile (its own init sees its own modules)."""
    swapped = []
    for name, layer in lora_layers(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        parent._modules[attr] = layer.base_layer
        swapped.append((parent, attr, layer))
    try:
        yield model
    finally:
        for parent, attr, layer in swapped:
            parent._modules[attr] = layer


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters to ``dtype``, except the parts the network keeps in float32 (``fp32_modules``)."""
    keep = set(getattr(model, "fp32_modules", ()))
    for name, param in model.named_parameters():
        if not param.requires_grad and not keep & set(name.split(".")):
            param.data = param.data.to(dtype)


def peft_names(weights: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``weights`` keyed by the network's own names, renamed to the LoRA-wrapped ``model``'s (``.base_layer.``)."""
    wrapped = {name for name, _ in lora_layers(model)}
    out = {}
    for key, value in weights.items():
        module, _, leaf = key.rpartition(".")
        out[f"{module}.base_layer.{leaf}" if module in wrapped else key] = value
    return out


def is_adapter(name: str) -> bool:
    """Whether the parameter ``name`` (peft's naming) is part of a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def adapter_key(name: str) -> str:
    """peft's ``x.lora_A.default.weight`` -> ``x.lora_A.weight`` (the diffusers/PEFT file naming, unprefixed)."""
    return name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")


def lora_parallel_plan(model: nn.Module, plan: ParallelPlan) -> ParallelPlan:
    """``plan`` for the LoRA-wrapped ``model``: explicit names of the linears to split, adapters included.

    A column-parallel base splits its output, and so does its ``B`` (``A`` stays whole, listed as replicated);
    a row-parallel base splits its input, and so does its ``A`` (``B`` whole).
    """
    wrapped = {name for name, _ in lora_layers(model)}
    column, row, replicated = [], [], list(plan.replicated)
    for name, module in model.named_modules():
        role = plan.linear_role(name)
        if role not in ("column", "row") or (name not in wrapped and not isinstance(module, nn.Linear)):
            continue
        if name not in wrapped:
            (column if role == "column" else row).append(name)
            continue
        split, whole = ("lora_B", "lora_A") if role == "column" else ("lora_A", "lora_B")
        (column if role == "column" else row).extend([f"{name}.base_layer", f"{name}.{split}.{ADAPTER}"])
        replicated.append(f"{name}.{whole}.{ADAPTER}")
    return attrs.evolve(plan, column_parallel=tuple(column), row_parallel=tuple(row), replicated=tuple(replicated))


def adapter_template(spec: ModelSpec, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Zero float32 CPU tensors shaped like the adapters ``settings`` put on the network of ``spec``, by peft name.

    What a checkpoint's adapters are read into without building the network (it is built on the meta device).
    """
    with torch.device("meta"):
        model = network_class(spec)(spec, attention=SDPAAttention("auto"), generator=None)
    inject_lora(model, settings)
    return {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in model.named_parameters() if p.requires_grad}


def from_adapter_key(key: str) -> str:
    """``x.lora_A.weight`` -> peft's ``x.lora_A.default.weight`` (the inverse of :func:`adapter_key`)."""
    return key.replace(".lora_A.", f".lora_A.{ADAPTER}.").replace(".lora_B.", f".lora_B.{ADAPTER}.")
