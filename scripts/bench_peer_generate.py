"""The peer of ``python -m dfm.app.bench generate``: diffusers' ``WanTransformer3DModel`` sampling on the same workload.

Builds diffusers' WAN transformer from a dfm recipe's model spec (random weights, bf16 on CUDA), then times
``--steps`` sampling steps after ``--warmup`` the way ``WanPipeline`` runs them: two forwards per step
(conditional and unconditional text, classifier-free guidance), the UniPC scheduler's update in between.
Prints one JSON line: seconds per step (mean, min, max), the denoising loop's model TFLOP/s (dfm's analytic
forward FLOPs, the same formula ``bench generate`` uses), and peak GPU memory. ``--compile`` compiles each
block (``torch.compile`` on the blocks, as diffusers' docs suggest for WAN) and reports the first step apart.
``--cudnn`` runs it under the SDPA priority dfm's ``auto`` uses on CUDA (cuDNN first); without it torch picks
(flash attention first), as a diffusers user gets it.

A benchmark script, not part of the product: it exists so that speed claims are ratios against this peer
timed in the same device call (docs/benchmarks.md).

    python scripts/bench_peer_generate.py --recipe wan_1_3b_t2v_pretrain --frames 81 --height 480 --width 832
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from diffusers import UniPCMultistepScheduler
from peer_common import build_peer, sync
from torch.nn.attention import sdpa_kernel

from dfm.app.config import resolve_config
from dfm.domain.networks.attention import AUTO_CUDA_PRIORITY
from dfm.domain.specs import forward_flops, num_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="wan_1_3b_t2v_pretrain")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--cudnn", action="store_true", help="prefer cuDNN attention, as dfm's auto does on CUDA")
    args = p.parse_args()

    spec = resolve_config(args.recipe, None, []).model
    cuda = torch.cuda.is_available()
    device, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    model = build_peer(spec, device, dtype).eval()
    if args.compile:
        for block in model.blocks:
            block.compile()
    f, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    latents = torch.randn(1, spec.in_channels, f, h, w, device=device)
    cond = torch.randn(1, args.text_len, spec.text_dim, device=device, dtype=dtype)
    uncond = torch.zeros_like(cond)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(args.warmup + args.steps, device=device)
    times: list[float] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    priority = sdpa_kernel(list(AUTO_CUDA_PRIORITY), set_priority=True) if args.cudnn else contextlib.nullcontext()
    with torch.no_grad(), priority:
        for t in scheduler.timesteps:
            sync(cuda)
            t0 = time.perf_counter()
            x = latents.to(dtype)
            timestep = t.expand(1)
            v_cond = model(x, timestep, cond, return_dict=False)[0]
            v_uncond = model(x, timestep, uncond, return_dict=False)[0]
            v = v_uncond + args.guidance * (v_cond - v_uncond)
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
            sync(cuda)
            times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    tokens = num_tokens(spec, f, h, w)
    flops = 2 * forward_flops(spec, tokens, args.text_len)  # two forwards per step
    mean = statistics.mean(timed)
    print(
        json.dumps(
            {
                "peer": "diffusers WanTransformer3DModel",
                "compiled": args.compile,
                "attention": "cudnn first" if args.cudnn else "torch's choice",
                "recipe": args.recipe,
                "video": [args.frames, args.height, args.width],
                "tokens": tokens,
                "first_step_s": round(times[0], 3),
                "s_per_step": round(mean, 4),
                "min_s": round(min(timed), 4),
                "max_s": round(max(timed), 4),
                "model_tflops": round(flops / mean / 1e12, 1),
                "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "gpu": torch.cuda.get_device_name() if cuda else "cpu",
            }
        )
    )


if __name__ == "__main__":
    main()
