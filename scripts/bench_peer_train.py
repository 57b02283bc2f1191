"""The peer of ``python -m dfm.app.bench train``: diffusers' ``WanTransformer3DModel`` training on the same workload.

Builds diffusers' WAN transformer from a dfm recipe's model spec (random weights, bf16 parameters as a
diffusers fine-tuning script keeps them, the modules diffusers keeps in fp32 left in fp32), fused AdamW, and
times ``--steps`` training steps (forward, flow-matching MSE on the velocity, backward, optimizer step) after
``--warmup``. ``--checkpointing full`` is diffusers' own ``enable_gradient_checkpointing()``; ``selective``
passes it dfm's selective policy (keep the attention kernels' outputs, recompute the rest); ``off`` keeps
every activation. ``--compile`` compiles each block; ``--cudnn`` runs under dfm's CUDA SDPA priority (cuDNN
first). Prints one JSON line: seconds per step (mean, min, max), model TFLOP/s (dfm's analytic training FLOPs,
the formula ``bench train`` uses; recompute not counted) and peak GPU memory.

A benchmark script, not part of the product: speed claims are ratios against this peer timed in the same
device call (docs/benchmarks.md).

    python scripts/bench_peer_train.py --recipe wan_1_3b_t2v_pretrain --frames 81 --height 480 --width 832
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from functools import partial

import torch
from peer_common import build_peer, sync
from torch.nn.attention import sdpa_kernel
from torch.utils.checkpoint import checkpoint

from dfm.adapters.torch_dist.checkpointing import _selective_context
from dfm.app.config import resolve_config
from dfm.domain.networks.attention import AUTO_CUDA_PRIORITY
from dfm.domain.specs import num_tokens, training_flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="wan_1_3b_t2v_pretrain")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", choices=("full", "selective", "off"), default="full")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cudnn", action="store_true", help="prefer cuDNN attention, as dfm's auto does on CUDA")
    args = p.parse_args()

    spec = resolve_config(args.recipe, None, []).model
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    model = build_peer(spec, device, dtype).train()
    if args.checkpointing == "full":
        model.enable_gradient_checkpointing()
    elif args.checkpointing == "selective":
        model.enable_gradient_checkpointing(
            lambda module, *a: checkpoint(module.__call__, *a, use_reentrant=False, context_fn=_selective_context)
        )
    if args.compile:
        for block in model.blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=cuda)
    f, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    make = partial(torch.randn, device=device)
    times: list[float] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    priority = sdpa_kernel(list(AUTO_CUDA_PRIORITY), set_priority=True) if args.cudnn else contextlib.nullcontext()
    with priority:
        for _ in range(args.warmup + args.steps):
            x0, noise = make(1, spec.in_channels, f, h, w), make(1, spec.in_channels, f, h, w)
            text = make(1, args.text_len, spec.text_dim, dtype=dtype)
            sigma = torch.rand(1, device=device)
            xt = ((1 - sigma) * x0 + sigma * noise).to(dtype)
            sync(cuda)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=cuda):
                v = model(xt, sigma * 1000, text, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(v.float(), noise - x0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(cuda)
            times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    tokens = num_tokens(spec, f, h, w)
    mean = statistics.mean(timed)
    print(
        json.dumps(
            {
                "peer": "diffusers WanTransformer3DModel training",
                "checkpointing": args.checkpointing,
                "compiled": args.compile,
                "attention": "cudnn first" if args.cudnn else "torch's choice",
                "recipe": args.recipe,
                "video": [args.frames, args.height, args.width],
                "tokens": tokens,
                "s_per_step": round(mean, 4),
                "min_s": round(min(timed), 4),
                "max_s": round(max(timed), 4),
                "model_tflops": round(training_flops(spec, tokens, args.text_len) / mean / 1e12, 1),
                "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "loss": round(loss.item(), 5),
                "gpu": torch.cuda.get_device_name() if cuda else "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
