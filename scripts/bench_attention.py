"""Attention kernels alone at WAN's shapes: cuDNN SDPA against FlashAttention-4, forward and forward + backward.

Times ``F.scaled_dot_product_attention`` under one SDPA backend at a time (cuDNN, then torch's flash backend with
FlashAttention-4 activated as ``--attention fa4`` activates it), q/k/v laid out as WAN's blocks lay them out
(``[B, L, H, D]`` viewed as ``[B, H, L, D]``). Prints one JSON line per kernel and shape: seconds per call,
TFLOP/s (4·B·H·Lq·Lk·D forward, 3.5× that forward + backward) and, for FA4, its difference from cuDNN's output.
A benchmark script for docs/benchmarks.md (needs CUDA; FA4 rows need the flash-attn-4 package).

    python scripts/bench_attention.py
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dfm.adapters.kernels import activate_flash_attention_4

SHAPES = [(1, 12, 32760, 32760), (2, 12, 32760, 32760), (1, 40, 32760, 32760), (1, 12, 32760, 512)]
"""(batch, heads, query tokens, key tokens): WAN 1.3B self-attention at 81 x 480 x 832, the same with CFG batched,
WAN 14B's 40 heads, and cross-attention over 512 text tokens."""


def seconds(fn: Callable[[], object], iters: int = 8) -> float:
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters / 1e3


def qkv(b: int, h: int, lq: int, lk: int, d: int = 128) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(0)
    return tuple(
        torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2) for n in (lq, lk, lk)
    )


def attention(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def main() -> None:
    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION}
    try:
        activate_flash_attention_4()  # only the flash backend changes: cuDNN rows are the same either way
        kernels["fa4"] = SDPBackend.FLASH_ATTENTION
    except ValueError as err:
        print(json.dumps({"fa4": str(err)}))
    for shape in SHAPES:
        q, k, v = qkv(*shape)
        flops = 4 * shape[0] * shape[1] * shape[2] * shape[3] * q.shape[-1]
        with torch.no_grad():
            reference = attention(SDPBackend.CUDNN_ATTENTION, q, k, v).float()
            for name, backend in kernels.items():
                t = seconds(lambda backend=backend, q=q, k=k, v=v: attention(backend, q, k, v))
                diff = attention(backend, q, k, v).float() - reference
                row = {"kernel": name, "shape": shape, "s": round(t, 5), "tflops": round(flops / t / 1e12, 1)}
                row["rel_to_cudnn"] = (diff.norm() / reference.norm()).item()
                print(json.dumps(row), flush=True)
    q, k, v = (t.requires_grad_(True) for t in qkv(*SHAPES[0]))
    flops = 3.5 * 4 * SHAPES[0][1] * SHAPES[0][2] * SHAPES[0][3] * q.shape[-1]
    for name, backend in kernels.items():
        t = seconds(lambda backend=backend: attention(backend, q, k, v).sum().backward(), iters=4)
        print(
            json.dumps({"kernel": name, "fwd_bwd": SHAPES[0], "s": round(t, 5), "tflops": round(flops / t / 1e12, 1)})
        )


if __name__ == "__main__":
    main()
