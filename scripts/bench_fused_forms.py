"""Time WAN's element-wise steps in their plain and their fused eager forms on CUDA (one JSON line).

The plain forms are what ``torch.compile`` traces and autograd runs; the fused ones are what eager sampling runs
(:func:`dfm.domain.networks.layers.eager_fusable`). Shapes of WAN 2.1 1.3B at 81 x 480 x 832 (32,760 tokens,
width 1536, 12 heads of 128, FFN 8960), bf16, no autograd; milliseconds per call, and the largest difference
between the two forms' outputs.

A benchmark script, not part of the product (docs/benchmarks.md)::

    python scripts/bench_fused_forms.py [--tokens 32760]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

import dfm.domain.networks.layers as layers
from dfm.domain.networks.layers import FP32LayerNorm, apply_rope, gated_residual, norm_modulate
from dfm.domain.networks.wan_layers import FeedForward


@contextlib.contextmanager
def plain_forms() -> Iterator[None]:
    """The plain formulas, as under ``torch.compile``."""
    saved = layers.eager_fusable
    layers.eager_fusable = lambda x: False
    try:
        yield
    finally:
        layers.eager_fusable = saved


def ms_per_call(fn: Callable[[], torch.Tensor], n: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / n, 4)


def compare(
    name: str, fused: Callable[[], torch.Tensor], plain: Callable[[], torch.Tensor] | None = None
) -> dict[str, float]:
    """Time ``fused`` as it runs, and ``plain`` (default: ``fused`` itself) under :func:`plain_forms`."""
    plain = fused if plain is None else plain
    with plain_forms():
        plain_ms, reference = ms_per_call(plain), plain()
    fused_ms, out = ms_per_call(fused), fused()
    diff = (out.float() - reference.float()).abs().max().item()
    return {f"{name}_plain_ms": plain_ms, f"{name}_fused_ms": fused_ms, f"{name}_max_diff": diff}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tokens", type=int, default=32_760)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_forms: needs CUDA")
    torch.manual_seed(0)
    L, C, H, D, FF = args.tokens, 1536, 12, 128, 8960
    dev, bf16 = "cuda", torch.bfloat16
    x, y = (torch.randn(1, L, C, device=dev, dtype=bf16) for _ in range(2))
    shift, scale, gate = (0.1 * torch.randn(1, 1, C, device=dev) for _ in range(3))
    q = torch.randn(1, L, C, device=dev, dtype=bf16).unflatten(2, (H, D)).transpose(1, 2)
    cos, sin = torch.randn(L, D, device=dev), torch.randn(L, D, device=dev)
    norm = FP32LayerNorm(C, 1e-6, elementwise_affine=False)
    ffn = FeedForward(C, FF).to(dev, bf16)
    proj = ffn.net[0].proj
    figures = {"device": torch.cuda.get_device_name(), "tokens": L}
    figures |= compare("norm_modulate", lambda: norm_modulate(norm, x, shift, scale))
    figures |= compare("gated_residual", lambda: gated_residual(x, y, gate))
    figures |= compare("rope", lambda: apply_rope(q, cos, sin))
    figures |= compare(
        "ffn_in_gelu",
        lambda: torch._addmm_activation(proj.bias, x.flatten(0, 1), proj.weight.t(), use_gelu=True),
        lambda: F.gelu(proj(x), approximate="tanh").flatten(0, 1),
    )
    print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    main()
