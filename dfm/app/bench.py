"""``python -m dfm.app.bench train``: training throughput and memory of a config, without checkpoints.

Builds the runtime, model and data source exactly as ``python -m dfm.app.train`` does (recipe < YAML <
``key=value``; ``torchrun`` for several processes), runs ``--warmup`` steps then ``--steps`` timed steps
(CUDA synchronised around each), and prints one JSON line on rank 0: seconds per step (mean, min, max),
samples/s, tokens/s, model TFLOP/s per device (the spec's analytic training FLOPs,
:func:`dfm.domain.specs.training_flops`; recompute not counted), peak memory, and the final loss.
``--profile DIR`` also writes a ``torch.profiler`` trace of two more steps after the timed ones and a
table of the operators that took the most device time.

Examples::

    python -m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain train.activation_checkpointing=full
    torchrun --nproc-per-node 2 -m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain parallel.context=2
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dfm.app import bootstrap
from dfm.app.cli import add_config_arguments, config_from_args, make_parser, parse_args, run_main
from dfm.app.config import TrainConfig
from dfm.domain.objective import training_loss
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import num_tokens, training_flops
from dfm.ports.runtime import LossFn, ParallelRuntime


def bench_train(cfg: TrainConfig, *, warmup: int = 2, steps: int = 6, profile: Path | None = None) -> dict[str, Any]:
    """Time ``steps`` training steps of ``cfg`` after ``warmup`` untimed ones; the figures (see module doc)."""
    runtime = bootstrap.build_runtime(cfg)
    runtime.build(cfg.model, bootstrap.optimizer_settings(cfg))
    codec, text = bootstrap.build_codecs(cfg)
    data = iter(bootstrap.build_data_source(cfg, runtime.topology, codec, text))
    n_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * runtime.topology.dp_size)
    times, loss, prof = [], float("nan"), None
    extra = 2 if profile is not None else 0  # profiled after the timed steps, so timings stay clean
    for step in range(warmup + steps + extra):
        if extra and step == warmup + steps:
            prof = _profiler()
            prof.__enter__()
        _sync(runtime)
        t0 = time.perf_counter()
        micro = [next(data) for _ in range(n_micro)]
        result = runtime.train_step(micro, _loss_fn(cfg, step), cfg.train.global_batch_size)
        _sync(runtime)
        if warmup <= step < warmup + steps:
            times.append(time.perf_counter() - t0)
        loss = result.loss
    if prof is not None and profile is not None:
        prof.__exit__(None, None, None)
        _write_profile(prof, profile)
    figures = _figures(cfg, runtime, times, loss, warmup)
    runtime.close()  # a runtime that created a process group tears it down
    return figures


def _loss_fn(cfg: TrainConfig, step: int) -> LossFn:
    """The training service's loss for ``step`` (per-sample noise streams keyed by seed and step)."""
    rng = SampleRNG(seed=cfg.seed, step=step)
    return lambda model, batch: training_loss(model, batch, cfg.diffusion, rng)


def _figures(cfg: TrainConfig, runtime: ParallelRuntime, times: list[float], loss: float, warmup: int) -> dict:
    codec, _ = bootstrap.build_codecs(cfg)
    _, f, h, w = bootstrap.latent_shape(cfg, codec)
    tokens = num_tokens(cfg.model, f, h, w)
    flops = training_flops(cfg.model, tokens, cfg.data.text_len) * cfg.train.global_batch_size
    mean, topo = statistics.fmean(times), runtime.topology
    return {
        "runtime": cfg.runtime,
        "rank": topo.rank,
        "world": topo.world_size,
        "layout": {"dp": topo.dp_size, "tp": topo.tp_size, "cp": topo.cp_size},
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "every_k": cfg.train.activation_checkpointing_every_k,
        "compile": cfg.train.compile,
        "global_batch_size": cfg.train.global_batch_size,
        "tokens_per_sample": tokens,
        "warmup_steps": warmup,
        "timed_steps": len(times),
        "s_per_step": round(mean, 4),
        "s_per_step_min": round(min(times), 4),
        "s_per_step_max": round(max(times), 4),
        "samples_per_s": round(cfg.train.global_batch_size / mean, 4),
        "tokens_per_s": round(cfg.train.global_batch_size * tokens / mean, 1),
        "model_tflops_per_device": round(flops / mean / topo.world_size / 1e12, 1),
        "max_memory_gib": round(runtime.max_memory_gib(), 2),
        "loss": loss,
    }


def _sync(runtime: ParallelRuntime) -> None:
    if runtime.topology.device.startswith("cuda"):
        torch.cuda.synchronize()


def _profiler() -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=False)


def _write_profile(prof: torch.profiler.profile, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    prof.export_chrome_trace(str(out / f"trace_rank{rank}.json"))
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (out / f"top_ops_rank{rank}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))


EXAMPLES = """\
  python -m dfm.app.bench train --recipe wan_tiny_t2v
  python -m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain train.activation_checkpointing=full
  torchrun --nproc-per-node 2 -m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain parallel.context=2"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser("python -m dfm.app.bench train", __doc__.split("\n", 1)[0], examples=EXAMPLES)
    add_config_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace here")
    if not argv or argv[0] != "train":
        parser.error("the first argument names the benchmark: train")
    args = parse_args(parser, argv[1:])
    if args.warmup < 0 or args.steps < 1:
        parser.error("need --warmup >= 0 and --steps >= 1")
    cfg = config_from_args(args)
    figures = bench_train(cfg, warmup=args.warmup, steps=args.steps, profile=args.profile)
    if figures["rank"] == 0:
        print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
