"""``python -m dfm.app.bench generate``: where a generation's time and memory go, and what step caching buys.

Samples one or more prompts with the generation service's own loop (:func:`sample_prompts`, then the codec's
decode) from a trained checkpoint (``--checkpoint``), or from a recipe's network with random weights (N(0, 0.02),
no checkpoint needed: ``--recipe NAME`` plus ``key=value`` overrides; ``--vae random`` adds a WAN 2.1 VAE of
random weights so the decode is timed too). Prints one JSON line per setting: the dense run, then one per
``--cache`` (speed-up over dense, network calls that reused the cache, and the drift from the dense run on the
same seed: relative L2 of the final latents and PSNR of the decoded uint8 frames). Seconds are CUDA-synchronised:
loading, an untimed two-step warm-up (compilation with ``--compile``), text encoding, the first sampling step, the
mean of the others, the denoising loop, decoding and the total; model TFLOP/s of the denoising loop (the spec's
analytic forward FLOPs of every row the network ran, dense-equivalent under a cache); and peak accelerator memory
of the denoising loop (weights included) and of the decode. ``--profile DIR`` then profiles a two-step dense run
(``torch.profiler`` trace and the top operators by device time, as ``bench train --profile``).

Under ``torchrun`` the ranks share each forward as ``generate`` lays them out (CFG parallel x context parallel,
``--cfg-parallel``/``--context-parallel``); rank 0 prints the rows, with the layout, the whole job's model TFLOP/s
and its share per device, and its own peak memory.

Examples::

    python -m dfm.app.bench generate --recipe wan_1_3b_t2v_pretrain --vae random --frames 81 --height 480 \\
        --width 832 --steps 10 --precision bf16
    python -m dfm.app.bench generate --checkpoint runs/demo --steps 25 --cache first_block:0.05
    torchrun --nproc-per-node 8 -m dfm.app.bench generate --recipe wan_14b_t2v_pretrain --vae random \\
        --frames 81 --height 720 --width 1280 --steps 5 --precision bf16 --compile   # CFG 2 x context 4
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

from dfm.app import bootstrap
from dfm.app.bootstrap import SamplingRanks, save_random_wan_vae, to_uint8_frames, use_local_device
from dfm.app.cli import UserError, add_config_arguments, config_from_args, make_parser, parse_args
from dfm.app.config import TrainConfig
from dfm.app.config.training import ATTENTION_BACKENDS
from dfm.app.generate import add_parallel_arguments, sampling_arguments
from dfm.app.logging import configure_logging
from dfm.app.profiling import profiler, write_profile
from dfm.app.services.checkpoints import load_for_inference
from dfm.app.services.generation import (
    GenerationTimings,
    compile_blocks,
    generation_codecs,
    inference_dtype,
    joined_ranks,
    sample_prompts,
)
from dfm.app.services.generation_request import GenerateRequest, cache_option, sampling_plan, with_codecs
from dfm.domain.networks.step_cache import StepCacheConfig, step_caching
from dfm.domain.specs import forward_flops, num_tokens
from dfm.ports.codecs import LatentCodec, TextEncoder

PROMPT = "a red fox running through fresh snow at dawn, cinematic lighting"


@torch.no_grad()
def random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter with N(0, 0.02) draws, on its own device (a network to time, not to sample well)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for param in model.parameters():
        param.normal_(0.0, 0.02, generator=generator)


class _RowCounter:
    """Counts the rows (samples) the network is called on, for the denoising loop's FLOPs."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.rows += len(x) if isinstance(x, list | tuple) else int(x.shape[0])


def _run(
    request: GenerateRequest,
    cfg: TrainConfig,
    model: torch.nn.Module,
    ranks: SamplingRanks,
    codecs: tuple[LatentCodec, TextEncoder],
    cache: StepCacheConfig | None,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor | None]:
    """One timed generation by every rank of ``ranks`` (``model`` is the network they share); its figures, its
    final latents and (rank 0, which decodes) its decoded frames."""
    device = next(model.parameters()).device
    plan = sampling_plan(request, cfg, codecs[0].latent_spec)
    timings = GenerationTimings()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    counter = _RowCounter(ranks.model)  # the whole forward's rows, whatever share of them each rank runs
    t0 = time.perf_counter()
    try:
        with step_caching(model, cache, reduce=ranks.context_sum) as cached:
            latents = sample_prompts(request, plan, cfg, ranks.model, codecs, device, timings)
    finally:
        counter.handle.remove()
    denoise_peak = _peak_gib(device)
    t_decode = time.perf_counter()
    frames = [to_uint8_frames(codecs[0].decode(x.float())[0].cpu()) for x in latents] if ranks.is_main else None
    end = time.perf_counter()
    spec, latent = cfg.model, codecs[0].latent_spec
    tokens = num_tokens(spec, *latent.latent_shape(plan.frames, plan.height, plan.width)[1:])
    denoise = sum(timings.step_s)
    flops = counter.rows * forward_flops(spec, tokens, cfg.data.text_len)
    later = timings.step_s[1:] or timings.step_s
    figures = {
        "cfg": request.cfg,
        "video": [plan.frames, plan.height, plan.width],
        "tokens": tokens,
        "steps": plan.steps,
        "prompts": len(request.prompts),
        "text_encode_s": round(timings.text_encode_s, 3),
        "first_step_s": round(timings.step_s[0], 4),
        "s_per_step": round(statistics.mean(later), 4),
        "denoise_s": round(denoise, 3),
        "decode_s": round(end - t_decode, 3),
        "total_s": round(end - t0, 3),
        "model_tflops": round(flops / denoise / 1e12, 2),
        "model_tflops_per_device": round(flops / denoise / 1e12 / ranks.layout.world, 2),
        "max_memory_gib": denoise_peak,
        "decode_max_memory_gib": _peak_gib(device),
    }
    if cached is not None:
        figures["calls"] = sum(s.calls for s in cached.videos)
        figures["calls_reused"] = sum(s.skipped_calls for s in cached.videos)
    return figures, torch.cat(latents).float().cpu(), None if frames is None else torch.stack(frames)


def _peak_gib(device: torch.device) -> float | None:
    """Peak accelerator memory since the last reading (GiB; ``None`` off CUDA), then the peak is reset."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _drift(latents: torch.Tensor, frames: torch.Tensor, ref_latents: torch.Tensor, ref_frames: torch.Tensor) -> dict:
    rel = float((latents - ref_latents).norm() / ref_latents.norm().clamp_min(1e-12))
    mse = float((frames.float() - ref_frames.float()).pow(2).mean())
    return {"latents_rel_l2": rel, "frames_psnr_db": math.inf if mse == 0 else round(10 * math.log10(255**2 / mse), 2)}


def bench_generate(
    request: GenerateRequest,
    cfg: TrainConfig,
    model: torch.nn.Module,
    codecs: tuple[LatentCodec, TextEncoder],
    caches: Sequence[StepCacheConfig] = (),
    profile: Path | None = None,
) -> list[dict[str, Any]]:
    """The figures of a dense run, then of each cache setting against it (see the module docstring).

    A two-step run comes first, untimed but reported as ``warmup_s`` (compilation, kernel autotuning, the
    allocator's first growth, loading the VAE), so the dense run does not pay for what the cached ones then get
    for free. With ``profile``, a two-step dense run is profiled last, so the timings stay clean.

    Under ``torchrun`` every rank calls it and the ranks share each forward as ``generate`` lays them out
    (:func:`~dfm.app.services.generation.joined_ranks`); rank 0 decodes and returns the rows, the others ``[]``.
    """
    with joined_ranks(request, cfg, model, codecs[0].latent_spec) as (request, ranks):
        t0 = time.perf_counter()
        _run(attrs.evolve(request, steps=2), cfg, model, ranks, codecs, None)
        warmup_s = round(time.perf_counter() - t0, 2)
        dense, ref_latents, ref_frames = _run(request, cfg, model, ranks, codecs, None)
        layout = {"world": ranks.layout.world, "cfg_parallel": ranks.layout.cfg, "context": ranks.layout.context}
        rows = [{"setting": "dense", **layout, "warmup_s": warmup_s, **dense}]
        for cache in caches:
            figures, latents, frames = _run(request, cfg, model, ranks, codecs, cache)
            speedup = round(dense["denoise_s"] / figures["denoise_s"], 3)
            setting = f"{cache.method}:{cache.threshold:g}"
            drift = {} if frames is None else _drift(latents, frames, ref_latents, ref_frames)
            rows.append({"setting": setting, **layout, **figures, "speedup": speedup, **drift})
        if profile is not None:
            with profiler() as prof:
                _run(attrs.evolve(request, steps=2), cfg, model, ranks, codecs, None)
            write_profile(prof, profile)
    return rows if ranks.is_main else []


def _recipe_network(cfg: TrainConfig, dtype: torch.dtype, attention: str | None, seed: int) -> torch.nn.Module:
    local = attrs.evolve(cfg, runtime="local")
    if attention is not None:
        local = attrs.evolve(local, train=attrs.evolve(local.train, attention_backend=attention))
    model = bootstrap.build_runtime(local, device="auto").build_network(cfg.model, inference_dtype=dtype)
    random_weights(model, seed)
    return model


def main_generate(argv: Sequence[str]) -> int:
    """``python -m dfm.app.bench generate ...``: one JSON line per setting (see the module docstring)."""
    parser = make_parser("python -m dfm.app.bench generate", __doc__.split("\n", 1)[0])
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a run, checkpoint or exported directory")
    parser.add_argument("--vae", default=None, help="a WAN VAE directory, or 'random' (WAN 2.1 VAE, random weights)")
    parser.add_argument("--text-encoder", default=None, help="a UMT5 directory (default: the config's)")
    parser.add_argument("--prompts", type=int, default=1, help="prompts sampled (each its own video)")
    for flag, kind in (("--frames", int), ("--height", int), ("--width", int), ("--steps", int)):
        parser.add_argument(flag, type=kind, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--shift", type=float, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None, help="fa4: flash-attn-4")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cfg", choices=("auto", "batched", "separate"), default="auto")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--vae-tiling", action="store_true")
    parser.add_argument("--cache", action="append", default=[], metavar="METHOD:THRESHOLD", help="repeatable")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR", help="also profile two dense steps")
    add_parallel_arguments(parser)
    args = parse_args(parser, argv)
    configure_logging()  # stderr: stdout carries only the JSON lines
    try:
        caches = [c for c in (cache_option(text) for text in args.cache) if c is not None]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if caches and args.cfg == "separate":
        raise UserError("--cache keeps one state per row of a forward: use --cfg batched (or auto) with --cache")
    dtype = inference_dtype(args.precision)
    with tempfile.TemporaryDirectory() as tmp:
        request = GenerateRequest(
            checkpoint=args.checkpoint or tmp,
            prompts=[f"{PROMPT} ({i})" for i in range(args.prompts)],
            out=Path(tmp) / "bench.mp4",
            **sampling_arguments(args),
            vae=str(save_random_wan_vae(Path(tmp) / "vae")) if args.vae == "random" else args.vae,
            text_encoder=args.text_encoder,
            progress=False,
            precision=args.precision,
            attention=args.attention,
            compile=args.compile,
            cfg="batched" if caches else args.cfg,  # the dense reference runs as the cached settings do
            batch_size=args.batch_size,
            vae_tiling=args.vae_tiling,
            cfg_parallel=args.cfg_parallel,
            context_parallel=args.context_parallel,
        )
        use_local_device()  # under torchrun on GPUs: this rank's own GPU before the network is built
        t0 = time.perf_counter()
        if args.checkpoint is not None:
            cfg, model = load_for_inference(args.checkpoint, dtype=dtype, attention=args.attention)
            source = {"checkpoint": str(args.checkpoint)}
        else:
            cfg = config_from_args(args)
            model = _recipe_network(cfg, dtype, args.attention, args.seed)
            source = {"recipe": args.recipe or "default", "weights": "random"}
        cfg = with_codecs(cfg, request)
        codecs = generation_codecs(cfg, request)
        load_s = round(time.perf_counter() - t0, 2)
        if args.compile:
            compile_blocks(model)
        device = next(model.parameters()).device
        common = {
            "bench": "generate",
            **source,
            "precision": args.precision,
            "dtype": str(dtype).removeprefix("torch."),
            "compiled": args.compile,
            "batch_size": args.batch_size,
            "attention": args.attention or cfg.train.attention_backend,
            "load_s": load_s,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }
        for row in bench_generate(request, cfg, model, codecs, caches, args.profile):
            print(json.dumps({**common, **row}), flush=True)
    return 0
