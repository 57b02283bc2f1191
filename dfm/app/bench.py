"""``python -m dfm.app.bench train | data``: training throughput and memory of a config, or data loader speed.

Builds the runtime, model and data source exactly as ``python -m dfm.app.train`` does (recipe < YAML <
``key=value``; ``torchrun`` for several processes), runs ``--warmup`` steps then ``--steps`` timed steps
(CUDA synchronised around each), and prints one JSON line on rank 0: seconds per step (mean, min, max),
samples/s, tokens/s, the host's share of a step spent drawing its batches (``data_s_per_step``, within
``s_per_step``: the device waits meanwhile), model TFLOP/s per device (the spec's analytic training FLOPs,
:func:`dfm.domain.specs.training_flops`; recompute not counted), peak memory, and the final loss. Samples,
tokens and FLOPs are counted from the timed steps' micro-batches as they ran (their own latent shapes and
text length, every data-parallel rank's; :mod:`dfm.app.services.throughput`), so bucketed and packed data
are measured right.
``--profile DIR`` also writes a ``torch.profiler`` trace of two more steps after the timed ones and a
table of the operators that took the most device time.

``python -m dfm.app.bench data --source energon|hf_datasets --path DIR`` reads ``--warmup`` then ``--steps``
micro-batches of ``--batch`` samples from a prepared data set (one process, data-parallel rank 0 of 1)
and prints one JSON line: samples/s, batches/s, MB/s of tensors and the time to open the source.
``--make-fake DIR --samples N`` first writes a data set of random 480p WAN samples (latents 16 x 21 x 60 x
104, text 512 x 4096) as prepared shards in DIR (and, for ``--source hf_datasets``, its conversion in
``DIR/hf``).

Examples::

    python -m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain train.activation_checkpointing=full
    torchrun --nproc-per-node 2 -m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain parallel.context=2
    python -m dfm.app.bench data --make-fake /tmp/fake480p --samples 64 --source energon --num-workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dfm.app import bootstrap
from dfm.app.cli import UserError, add_config_arguments, config_from_args, make_parser, parse_args, run_main
from dfm.app.config import TrainConfig
from dfm.app.logging import configure_logging
from dfm.app.profiling import profiler, write_profile
from dfm.app.services.throughput import Work, batch_work, job_work
from dfm.app.services.training import step_objective
from dfm.domain.specs import LatentSpec
from dfm.ports.runtime import ParallelRuntime
from dfm.ports.samples import ImageCondition


def bench_train(cfg: TrainConfig, *, warmup: int = 2, steps: int = 6, profile: Path | None = None) -> dict[str, Any]:
    """Time ``steps`` training steps of ``cfg`` after ``warmup`` untimed ones; the figures (see module doc)."""
    runtime = bootstrap.build_runtime(cfg)
    runtime.build_network(cfg.model)
    runtime.attach_optimizer(bootstrap.optimizer_settings(cfg))
    codec, text = bootstrap.build_codecs(cfg)
    data = iter(bootstrap.build_data_source(cfg, runtime.topology, codec, text))
    n_micro = bootstrap.batch_layout(cfg, runtime.topology.dp_size).micro_batches
    times, data_times, loss, prof, work = [], [], float("nan"), None, Work()
    extra = 2 if profile is not None else 0  # profiled after the timed steps, so timings stay clean
    for step in range(warmup + steps + extra):
        if extra and step == warmup + steps:
            prof = profiler()
            prof.__enter__()
        _sync(runtime)
        t0 = time.perf_counter()
        micro = [next(data) for _ in range(n_micro)]
        t_data = time.perf_counter() - t0
        result = runtime.train_step(micro, step_objective(cfg, step), cfg.train.global_batch_size)
        _sync(runtime)
        if warmup <= step < warmup + steps:
            times.append(time.perf_counter() - t0)
            data_times.append(t_data)
            work += batch_work(cfg.model, micro)
        loss = result.loss
    if prof is not None and profile is not None:
        prof.__exit__(None, None, None)
        write_profile(prof, profile)
    figures = _figures(cfg, runtime, times, job_work(work, runtime.topology), loss, warmup)
    figures["data_s_per_step"] = round(statistics.fmean(data_times), 4)
    runtime.close()  # a runtime that created a process group tears it down
    return figures


def _figures(
    cfg: TrainConfig, runtime: ParallelRuntime, times: list[float], work: Work, loss: float, warmup: int
) -> dict:
    """The printed figures; ``work`` is what the job's timed steps held (every data-parallel rank's)."""
    mean, topo, total = statistics.fmean(times), runtime.topology, sum(times)
    return {
        "runtime": cfg.runtime,
        "rank": topo.rank,
        "world": topo.world_size,
        "layout": {"dp": topo.dp_size, "tp": topo.tp_size, "cp": topo.cp_size},
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "every_k": cfg.train.activation_checkpointing_every_k,
        "compile": cfg.train.compile,
        "global_batch_size": cfg.train.global_batch_size,
        "tokens_per_sample": round(work.video_tokens / work.samples, 1),
        "warmup_steps": warmup,
        "timed_steps": len(times),
        "s_per_step": round(mean, 4),
        "s_per_step_min": round(min(times), 4),
        "s_per_step_max": round(max(times), 4),
        "samples_per_s": round(work.samples / total, 4),
        "tokens_per_s": round(work.video_tokens / total, 1),
        "model_tflops_per_device": round(work.flops / total / topo.world_size / 1e12, 1),
        "max_memory_gib": round(runtime.max_memory_gib(), 2),
        "loss": loss,
    }


def _sync(runtime: ParallelRuntime) -> None:
    if runtime.topology.device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_data(
    source: str,
    path: Path,
    *,
    batch: int = 4,
    steps: int = 20,
    warmup: int = 2,
    num_workers: int = 2,
    shuffle_buffer: int = 100,
    text_len: int = 512,
    text_dim: int = 4096,
    seed: int = 0,
    image_condition: ImageCondition | None = None,
) -> dict[str, Any]:
    """Time ``steps`` micro-batches of ``batch`` samples from the ``source`` data set at ``path`` (image-to-video
    samples, checked and completed with the frame mask as training reads them, with ``image_condition``).

    Raises:
        UserError: The data set cannot be opened with these settings.
    """
    t0 = time.perf_counter()
    options = {"text_len": text_len, "text_dim": text_dim, "seed": seed, "image_condition": image_condition}
    data = _open_source(source, path, batch, num_workers, shuffle_buffer, options)
    it = iter(data)
    for _ in range(warmup):
        next(it)
    setup = time.perf_counter() - t0
    t0, nbytes, shape = time.perf_counter(), 0, ()
    for _ in range(steps):
        got = next(it)
        nbytes += sum(_tensor_bytes(t) for t in (got.latents, got.text, got.condition, got.image) if t is not None)
        shape = tuple(got.latents.shape[1:])
    seconds = time.perf_counter() - t0
    if hasattr(data, "close"):
        data.close()
    return {
        "benchmark": "data",
        "source": source,
        "path": str(path),
        "batch": batch,
        "num_workers": num_workers if source == "energon" else 0,
        "warmup_batches": warmup,
        "timed_batches": steps,
        "latent_shape": list(shape),
        **({} if image_condition is None else {"image_condition": image_condition.kind}),
        "setup_s": round(setup, 3),
        "seconds": round(seconds, 4),
        "samples_per_s": round(steps * batch / seconds, 3),
        "batches_per_s": round(steps / seconds, 3),
        "mb_per_s": round(nbytes / seconds / 1e6, 1),
        "skipped": int(getattr(data, "skipped", 0)),
    }


def _open_source(
    source: str, path: Path, batch: int, num_workers: int, shuffle_buffer: int, options: dict[str, Any]
) -> Any:
    common = {"global_batch_size": batch, "micro_batch_size": batch, **options}
    try:
        return bootstrap.open_prepared_source(
            source, path, num_workers=num_workers, shuffle_buffer=shuffle_buffer, **common
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _tensor_bytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def make_fake_data(
    root: Path,
    samples: int,
    *,
    source: str = "energon",
    latent_shape: Sequence[int] = (16, 21, 60, 104),
    text_shape: Sequence[int] = (512, 4096),
    dtype: str = "float32",
    samples_per_shard: int = 16,
    image_condition: str | None = None,
    image_shape: Sequence[int] = (257, 1280),
) -> dict[str, Any]:
    """Write ``samples`` random samples as prepared shards in ``root`` (and ``root/hf`` for ``hf_datasets``);
    image-to-video samples with ``image_condition`` (``first``/``first_last``, image features ``image_shape``)."""
    if any(root.iterdir()) if root.is_dir() else root.exists():
        raise UserError(f"{root} exists and is not empty; --make-fake writes a new data set")
    t0 = time.perf_counter()
    bootstrap.write_fake_dataset(
        root,
        samples,
        latent_shape=latent_shape,
        text_shape=text_shape,
        dtype=dtype,
        samples_per_shard=samples_per_shard,
        image_condition=image_condition,
        image_shape=image_shape,
    )
    made = {"made": str(root), "samples": samples, "latent_shape": list(latent_shape), "text_shape": list(text_shape)}
    if image_condition is not None:
        made |= {"image_condition": image_condition, "image_shape": list(image_shape)}
    if source == "hf_datasets":
        bootstrap.webdataset_to_hf(root, root / "hf")
        made["hf_path"] = str(root / "hf")
    made["seconds"] = round(time.perf_counter() - t0, 2)
    return made


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 16,21,60,104, got {text!r}") from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return dims


DATA_EXAMPLES = """\
  python -m dfm.app.bench data --make-fake /tmp/fake480p --samples 64 --source energon
  python -m dfm.app.bench data --source energon --path /tmp/fake480p --batch 2 --steps 20 --num-workers 2
  python -m dfm.app.bench data --source hf_datasets --path /tmp/fake480p/hf --batch 2"""


def main_data(argv: Sequence[str]) -> int:
    """``python -m dfm.app.bench data ...``: loader samples/s as one JSON line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m dfm.app.bench data",
        description="Samples/s of a data source on a prepared data set (one process).",
        epilog=f"examples:\n{DATA_EXAMPLES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--source", choices=("energon", "hf_datasets"), default="energon", help="data source")
    parser.add_argument("--path", type=Path, default=None, help="prepared data set (default: the --make-fake one)")
    parser.add_argument("--batch", type=int, default=2, help="samples per micro-batch")
    parser.add_argument("--steps", type=int, default=20, help="timed micro-batches")
    parser.add_argument("--warmup", type=int, default=2, help="untimed micro-batches first")
    parser.add_argument("--num-workers", type=int, default=2, help="energon loader worker processes")
    parser.add_argument("--shuffle-buffer", type=int, default=100, help="energon shuffle buffer (samples)")
    parser.add_argument("--text-len", type=int, default=512, help="text tokens per row S")
    parser.add_argument("--text-dim", type=int, default=None, help="text width D (default: the --text-shape width)")
    parser.add_argument("--make-fake", type=Path, default=None, metavar="DIR", help="first write random samples here")
    parser.add_argument("--samples", type=int, default=64, help="samples --make-fake writes")
    parser.add_argument("--latent-shape", type=_shape, default=(16, 21, 60, 104), help="C,F,H,W of fake latents")
    parser.add_argument("--text-shape", type=_shape, default=(512, 4096), help="L,D of fake text embeddings")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="fake tensor dtype")
    parser.add_argument("--samples-per-shard", type=int, default=16, help="fake samples per .tar shard")
    parser.add_argument(
        "--image-condition",
        choices=("first", "first_last"),
        default=None,
        help="image-to-video samples (--make-fake writes condition latents and image features; the reader checks "
        "them and adds the frame mask, WAN's temporal stride 4)",
    )
    parser.add_argument("--image-shape", type=_shape, default=(257, 1280), help="R,D of each image's features")
    args = parser.parse_args(list(argv))
    configure_logging()  # stderr: stdout carries only the JSON lines
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.num_workers < 0 or args.samples < 1:
        parser.error("need --batch >= 1, --steps >= 1, --warmup >= 0, --num-workers >= 0 and --samples >= 1")
    if len(args.latent_shape) != 4 or len(args.text_shape) != 2 or len(args.image_shape) != 2:
        parser.error("--latent-shape takes C,F,H,W, --text-shape L,D and --image-shape R,D")
    path = args.path
    if args.make_fake is not None:
        made = make_fake_data(
            args.make_fake,
            args.samples,
            source=args.source,
            latent_shape=args.latent_shape,
            text_shape=args.text_shape,
            dtype=args.dtype,
            samples_per_shard=args.samples_per_shard,
            image_condition=args.image_condition,
            image_shape=args.image_shape,
        )
        print(json.dumps(made), flush=True)
        path = path or Path(made.get("hf_path", made["made"]))
    if path is None:
        parser.error("give --path DIR (or --make-fake DIR)")
    text_dim = args.text_dim if args.text_dim is not None else args.text_shape[1]
    figures = bench_data(
        args.source,
        path,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        num_workers=args.num_workers,
        shuffle_buffer=args.shuffle_buffer,
        text_len=args.text_len,
        text_dim=text_dim,
        image_condition=None
        if args.image_condition is None
        else ImageCondition(
            kind=args.image_condition, temporal_stride=LatentSpec().temporal_stride, image_dim=args.image_shape[1]
        ),
    )
    print(json.dumps(figures), flush=True)
    return 0


EXAMPLES = """\
  python -m dfm.app.bench train --recipe wan_tiny_t2v
  python -m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain train.activation_checkpointing=full
  torchrun --nproc-per-node 2 -m dfm.app.bench train --recipe wan_1_3b_t2v_pretrain parallel.context=2"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "data":
        return main_data(argv[1:])
    if argv and argv[0] == "generate":
        from dfm.app.bench_generate import main_generate

        return main_generate(argv[1:])
    parser = make_parser("python -m dfm.app.bench train", __doc__.split("\n", 1)[0], examples=EXAMPLES)
    add_config_arguments(parser)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--profile", type=Path, default=None, help="write a torch.profiler trace here")
    if not argv or argv[0] != "train":
        parser.error(
            "the first argument names the benchmark: train, generate or data "
            "(e.g. `python -m dfm.app.bench generate -h`)"
        )
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
