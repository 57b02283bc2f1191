"""Speed-up and drift of step caching (``generate --cache``) against uncached sampling: one command.

Loads the model once, as ``python -m dfm.app.generate`` does, then samples one prompt from the same noise
uncached and with each ``--cache`` setting (the generation service's own per-video sampling, timed with CUDA
synchronised, after an untimed warm-up that also loads the text encoder). Prints one JSON line per setting:
seconds, speed-up over uncached, network calls and how many reused the cache, the relative L2 distance
``||x - x_ref|| / ||x_ref||`` of the final latents from the uncached ones, and the PSNR of the decoded frames
(uint8, as written to the mp4) against the uncached video's.

A benchmark script, not part of the product. For WAN 2.1 T2V 1.3B at 480p (the diffusers release needs the
training config beside its transformer weights, once)::

    M=Wan2.1-T2V-1.3B-Diffusers
    python -m dfm.app.train --recipe wan_1_3b_t2v_pretrain --dry-run > $M/transformer/dfm_config.yaml
    python scripts/bench_step_cache.py --checkpoint $M/transformer --vae $M --text-encoder $M \\
        --frames 81 --height 480 --width 832 --steps 50 --guidance 5 --shift 3 \\
        --cache first_block:0.05 --cache first_block:0.1 --cache teacache:0.08 --cache teacache:0.2
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import attrs
import torch

from dfm.adapters.video import to_uint8_frames
from dfm.app import bootstrap
from dfm.app.logging import configure_logging
from dfm.app.services.checkpoints import load_for_inference
from dfm.app.services.generation import (
    GenerateRequest,
    SamplingPlan,
    _one_video,
    cache_option,
    sampling_plan,
    with_codecs,
)
from dfm.domain.networks.step_cache import StepCacheConfig, step_caching

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_CACHES = ("first_block:0.05", "first_block:0.1", "teacache:0.08", "teacache:0.2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="as generate --checkpoint")
    p.add_argument("--vae", default=None)
    p.add_argument("--text-encoder", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--prompt", default="A cat walks on the grass, realistic style, a sunny afternoon.")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--shift", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed warm-up run")
    p.add_argument("--cache", action="append", default=None, help=f"METHOD:THRESHOLD, repeatable ({DEFAULT_CACHES})")
    args = p.parse_args()
    configure_logging(level="WARNING")  # stdout holds only the JSON lines

    caches = [cache_option(c) for c in (args.cache or DEFAULT_CACHES)]
    request = GenerateRequest(
        checkpoint=args.checkpoint,
        prompts=[args.prompt],
        out=Path(tempfile.gettempdir()) / "bench_step_cache.mp4",
        negative_prompt=args.negative_prompt,
        sampler=args.sampler,
        steps=args.steps,
        guidance=args.guidance,
        shift=args.shift,
        seed=args.seed,
        frames=args.frames,
        height=args.height,
        width=args.width,
        vae=args.vae,
        text_encoder=args.text_encoder,
        tokenizer=args.tokenizer,
        progress=False,
    )
    cfg, model = load_for_inference(request.checkpoint, dtype=DTYPES[args.dtype])
    cfg = with_codecs(cfg, request)
    codec, text_encoder = bootstrap.build_codecs(cfg)
    if codec is None or text_encoder is None:
        raise SystemExit("this checkpoint has no VAE or text encoder configured: pass --vae and --text-encoder")
    plan = sampling_plan(request, cfg, codec.latent_spec)
    device = next(model.parameters()).device

    def run(cache: StepCacheConfig | None, run_plan: SamplingPlan = plan) -> tuple[torch.Tensor, float, list[int]]:
        with step_caching(model, cache) as cached:
            _sync()
            start = time.perf_counter()
            latents = _one_video(request, run_plan, cfg, model, codec, text_encoder, args.prompt, device, 0)
            _sync()
            seconds = time.perf_counter() - start
        stats = cached.videos[0] if cached is not None else None
        return latents, seconds, [] if stats is None else [stats.calls, stats.skipped_calls, stats.reused, stats.rows]

    run(None, attrs.evolve(plan, steps=args.warmup_steps))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reference, dense_s, _ = run(None)
    reference_frames = to_uint8_frames(codec.decode(reference.float().cpu())[0])
    common = {
        "sampler": plan.sampler,
        "steps": plan.steps,
        "guidance": plan.guidance,
        "video": [plan.frames, plan.height, plan.width],
        "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    print(json.dumps({"cache": "off", "seconds": round(dense_s, 2), "speedup": 1.0, **common}), flush=True)
    for cache in caches:
        latents, seconds, (calls, calls_reused, rows_reused, rows) = run(cache)
        frames = to_uint8_frames(codec.decode(latents.float().cpu())[0])
        rel = float((latents.float() - reference.float()).norm() / reference.float().norm())
        line = {
            "cache": f"{cache.method}:{cache.threshold:g}",
            "seconds": round(seconds, 2),
            "speedup": round(dense_s / seconds, 3),
            "calls": calls,
            "calls_reused": calls_reused,
            "rows_reused": f"{rows_reused}/{rows}",
            "latents_rel_l2": round(rel, 5),
            "frames_psnr_db": round(_psnr(frames, reference_frames), 2),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
            if torch.cuda.is_available()
            else None,
            **common,
        }
        print(json.dumps(line), flush=True)


def _psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    """``10 log10(255^2 / MSE)`` over all uint8 pixels (``inf`` when equal)."""
    mse = float((frames.float() - reference.float()).square().mean())
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
