"""Initialisation draws: plain parameters keep their exact values (golden), and a parameter of another
tensor type (as FSDP2/tensor-parallel ``DTensor`` shards are) gets the same values, drawn full-shape into a
plain tensor and copied, never by an in-place draw on the parameter itself. The real ``DTensor`` case is
covered by the FSDP2 runtime's tests (the domain must not import ``torch.distributed``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from dfm.domain.networks.dit import DiT
from dfm.domain.networks.layers import draw_init
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import DIT_TINY, WAN_TINY

GOLDEN = {
    # sum, sum |p|, sum p^2, position-weighted sum, count over all parameters, seed 5 (before DTensor support)
    "wan": [229.88776936268187, 3011.6358490457314, 824.506729684101, 157.7311037738973, 21784],
    "dit": [138.23749724973914, 2324.9452843333083, 621.4364017864287, 61.387455079994524, 26152],
}


def _build(kind: str, seed: int = 5) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    return WanTransformer(WAN_TINY, generator=gen) if kind == "wan" else DiT(DIT_TINY, generator=gen)


def _stats(model: nn.Module) -> list[float]:
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    w = torch.arange(1, flat.numel() + 1, dtype=torch.float64) / flat.numel()
    return [
        flat.sum().item(),
        flat.abs().sum().item(),
        flat.square().sum().item(),
        (flat * w).sum().item(),
        flat.numel(),
    ]


class _NoInPlaceDraw(nn.Parameter):
    """A parameter type other than ``Tensor``/``Parameter`` (like ``DTensor``) that refuses in-place random draws."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in ("uniform_", "normal_", "random_"):
            raise AssertionError(f"{func.__name__} drawn in place on a sharded-like parameter")
        return super(nn.Parameter, cls).__torch_function__(func, types, args, kwargs)


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_plain_parameters_keep_their_exact_draws(kind: str) -> None:
    # torch's vectorised normal_ (AVX2/AVX-512 Box-Muller) and its scalar one (ATEN_CPU_CAPABILITY=default, a CPU
    # without AVX2) round the same draws differently: the sums move by up to 1e-8 of themselves. Other draws move
    # them by more: one element's sign by 5e-4, two elements of one tensor swapped by 5e-7 at least.
    assert _stats(_build(kind)) == pytest.approx(GOLDEN[kind], rel=1e-7, abs=1e-12)


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_subclass_parameters_get_the_plain_draws_without_in_place_sampling(kind: str) -> None:
    model = _build(kind, seed=0)
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            module._parameters[name] = _NoInPlaceDraw(torch.full_like(p, float("nan")))
    model.init_weights(torch.Generator().manual_seed(5))
    reference = _build(kind)
    assert all(type(p) is _NoInPlaceDraw for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.as_subclass(torch.Tensor), q), name


def test_draw_init_in_place_for_plain_and_through_a_copy_otherwise() -> None:
    def init(t: torch.Tensor) -> None:
        nn.init.uniform_(t, generator=torch.Generator().manual_seed(1))

    plain = nn.Parameter(torch.empty(3, 4))
    other = _NoInPlaceDraw(torch.empty(3, 4))
    with torch.no_grad():
        draw_init(plain, init, torch.Generator())
        draw_init(other, init, torch.Generator())
    assert torch.equal(other.as_subclass(torch.Tensor), plain.detach())
    with pytest.raises(AssertionError, match="drawn in place"), torch.no_grad():
        init(other)  # the guard is real: an in-place draw on the subclass would have failed
