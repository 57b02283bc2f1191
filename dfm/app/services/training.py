"""The training service: the loop every runtime shares (Python API first; the CLI wraps it).

```python
from dfm.app.config import resolve_config
from dfm.app.services.training import train
result = train(resolve_config("default", None, ["train.max_steps=20", "run.dir=runs/try"]))
```
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
import yaml
from tqdm import tqdm

from dfm.app import bootstrap
from dfm.app.bootstrap import all_gather_json, write_text_atomic
from dfm.app.config import ConfigError, TrainConfig, config_to_yaml
from dfm.app.logging import bind_step, configure_logging, get_logger
from dfm.app.services.lora import initial_adapters
from dfm.app.services.resume import restore_first, select
from dfm.app.services.run_dir import RunDirError, RunDirLock, disk_full_error
from dfm.app.services.samples import check_training_samples, training_prompts, write_training_samples
from dfm.app.services.signals import StopRequest
from dfm.app.services.throughput import Work, batch_work, job_work, rates
from dfm.domain.batch import Batch
from dfm.domain.objective import Objective
from dfm.domain.rng import SampleRNG
from dfm.ports.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore
from dfm.ports.codecs import ImageEncoder, LatentCodec, TextEncoder
from dfm.ports.data import DataSource
from dfm.ports.runtime import ParallelRuntime, StepResult
from dfm.ports.tracking import MetricsSink

log = get_logger("dfm.train")

MUST_MATCH_ON_RESUME = ("seed", "train.global_batch_size", "lora.rank", "lora.targets")
"""Settings a resumed run must share with its checkpoint (they fix the data order and the noise streams)."""
_NOT_SETTINGS = ("checkpoint.resume",)
"""Keys that say where to resume from, not how to train: never reported as changed."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row); the last checkpoint is intact."""


@attrs.frozen(kw_only=True)
class TrainResult:
    """How a run ended."""

    step: int
    """Steps completed."""
    checkpoint: CheckpointInfo | None
    """The last checkpoint written (or resumed from)."""
    stopped_by: str | None = None
    """The signal's name when a SIGTERM/SIGINT stopped the run early."""
    skipped_steps: int = 0
    """Steps skipped because the loss or gradients were not finite."""


@attrs.define
class _Run:
    cfg: TrainConfig
    runtime: ParallelRuntime
    data: DataSource
    store: CheckpointStore
    sink: MetricsSink
    step: int = 0
    skipped: int = 0
    consecutive_nonfinite: int = 0
    last_checkpoint: CheckpointInfo | None = None
    before_streak: CheckpointInfo | None = None
    batches: Iterator[Batch] | None = None
    codecs: tuple[LatentCodec, TextEncoder] | None = None
    """The VAE and text encoder that sample videos while training (``sample.every_n_steps``)."""
    image_encoder: ImageEncoder | None = None
    """What encodes the first frames of an image-to-video model's samples (built once, with the codecs)."""
    sampled_step: int | None = None


def train(
    cfg: TrainConfig,
    *,
    runtime: ParallelRuntime | None = None,
    data: DataSource | None = None,
    store: CheckpointStore | None = None,
    sink: MetricsSink | None = None,
) -> TrainResult:
    """Train ``cfg``; any port may be injected (e.g. the in-memory adapters), the rest come from bootstrap.

    With an injected ``store`` and ``sink`` nothing is written to disk (``config.yaml`` included).
    Otherwise global rank 0 first takes the lock on ``run.dir`` (:class:`~dfm.app.services.run_dir.RunDirLock`)
    and holds it until the run ends.

    Raises:
        TrainingError: after ``train.max_consecutive_nonfinite`` non-finite steps in a row.
        ConfigError: settings that cannot work together, or that differ from the checkpoint's where a
            resumed run must keep them (``seed``, ``train.global_batch_size``).
        CheckpointError: a checkpoint to resume from is unusable (before any training step).
        RunDirError: ``run.dir`` is a file, not writable, in use by another run, or its disk is full.
    """
    bootstrap.check_training_config(cfg)
    writes_run_dir = store is None or sink is None
    lock = RunDirLock(cfg.run.dir) if writes_run_dir and int(os.environ.get("RANK", "0")) == 0 else None
    if lock is not None:
        lock.acquire()  # before anything is built or written
    try:
        return _train(cfg, runtime, data, store, sink)
    finally:
        if lock is not None:
            lock.release()


def _train(
    cfg: TrainConfig,
    runtime: ParallelRuntime | None,
    data: DataSource | None,
    store: CheckpointStore | None,
    sink: MetricsSink | None,
) -> TrainResult:
    owns_runtime = runtime is None
    runtime = runtime or bootstrap.build_runtime(cfg)
    configure_logging(
        rank=runtime.topology.rank, level=cfg.logging.level, fmt=cfg.logging.format, all_ranks=cfg.logging.all_ranks
    )
    codec, text = bootstrap.build_codecs(cfg)
    bootstrap.check_model_fits_data(cfg.model, bootstrap.latent_shape(cfg, codec))
    check_training_samples(cfg, codec, text)
    data = data or bootstrap.build_data_source(cfg, runtime.topology, codec, text)
    writes_config = store is None
    store = store or bootstrap.build_checkpoint_store(cfg)
    runtime.build_network(cfg.model)
    runtime.attach_optimizer(bootstrap.optimizer_settings(cfg))
    if cfg.lora.enabled:  # the frozen base (and a fresh run's adapters) load before any checkpoint's adapters
        start = (bootstrap.initial_weights(cfg) or {}) | (initial_adapters(cfg) or {})
        if start:
            runtime.load_weights(start)
    run = _Run(cfg=cfg, runtime=runtime, data=data, store=store, sink=None)  # type: ignore[arg-type]
    if cfg.sample.every_n_steps is not None and codec is not None and text is not None:
        run.codecs = (codec, text)
        run.image_encoder = bootstrap.build_image_encoder(cfg) if getattr(cfg.model, "image_to_video", False) else None
    selection = select(cfg.checkpoint.resume, store, lambda root: bootstrap.checkpoint_store_at(root, cfg.runtime))
    restored = restore_first(selection, lambda info: _restore(run, info)) if selection is not None else None
    if restored is None and cfg.checkpoint.init_from is not None and not cfg.lora.enabled:
        runtime.load_weights(bootstrap.initial_weights(cfg) or {})
        log.info("initialised", weights=cfg.checkpoint.init_from)
    owns_sink = sink is None
    metrics_path = Path(cfg.run.dir) / "metrics.jsonl"
    with _disk_errors(metrics_path):
        run.sink = sink or bootstrap.build_metrics_sink(cfg, resume_step=run.step, is_main=runtime.topology.is_main)
    try:
        if writes_config:
            _write_config(cfg, runtime)
        return _loop(run)
    finally:
        if owns_sink:  # an injected sink belongs to the caller
            run.sink.close()
        if owns_runtime:  # as does an injected runtime
            runtime.close()
        bind_step(None)


@contextlib.contextmanager
def _disk_errors(path: Path, *, kept: bool = True) -> Iterator[None]:
    """Turn an ``OSError`` while writing ``path`` into a :class:`RunDirError` (out of space, not writable)."""
    try:
        yield
    except OSError as exc:
        raise disk_full_error(path, exc, kept=kept) or RunDirError(
            f"cannot write {path} ({exc.strerror or exc})"
        ) from None


def _write_config(cfg: TrainConfig, runtime: ParallelRuntime) -> None:
    if runtime.topology.is_main:
        path = Path(cfg.run.dir) / "config.yaml"
        with _disk_errors(path):
            write_text_atomic(path, config_to_yaml(cfg))


def _loop(run: _Run) -> TrainResult:
    cfg = run.cfg
    meter = _Meter(run.runtime)
    log.info(
        "training",
        start_step=run.step,
        max_steps=cfg.train.max_steps,
        run_dir=cfg.run.dir,
        device=run.runtime.topology.device,
    )
    bar = _progress_bar(cfg, run.step, run.runtime.topology.is_main)
    with StopRequest() as stop:
        while run.step < cfg.train.max_steps and not stop.requested:
            result, work = _one_step(run)
            meter.add(result, work)
            if bar is not None:
                bar.set_postfix(loss=f"{result.loss:.4f}", refresh=False)
                bar.update(1)
            if run.step % cfg.train.log_interval == 0 or run.step == cfg.train.max_steps:
                _log_metrics(run, meter.flush(run.step))
            if run.step % cfg.checkpoint.interval == 0 and run.step < cfg.train.max_steps:
                _save(run)
            if run.codecs is not None and run.step % cfg.sample.every_n_steps == 0:  # type: ignore[operator]
                _samples(run)
        if bar is not None:
            bar.close()
        if run.last_checkpoint is None or run.last_checkpoint.step != run.step:
            _save(run)
        if run.codecs is not None and run.sampled_step != run.step and not stop.requested:
            _samples(run)
        if stop.requested:
            log.warning(
                "stopped",
                signal=stop.name,
                step=run.step,
                checkpoint=str(run.last_checkpoint.path),
                hint="run again with --resume auto to continue",
            )
    return TrainResult(
        step=run.step, checkpoint=run.last_checkpoint, stopped_by=stop.name or None, skipped_steps=run.skipped
    )


def _samples(run: _Run) -> None:
    assert run.codecs is not None
    with _disk_errors(Path(run.cfg.run.dir) / "samples"):
        paths = write_training_samples(run.cfg, run.runtime, run.codecs, run.step, image_encoder=run.image_encoder)
    log_videos = getattr(run.sink, "log_videos", None)  # trackers that take videos (W&B)
    if paths and log_videos is not None:
        prompts = training_prompts(run.cfg)
        log_videos(run.step, {f"{i}: {p}": path for i, (p, path) in enumerate(zip(prompts, paths, strict=True))})
    run.sampled_step = run.step


def step_objective(cfg: TrainConfig, step: int) -> Objective:
    """The loss of optimizer step ``step``: the config's diffusion process, per-sample streams of (seed, step)."""
    return Objective(process=cfg.diffusion, rng=SampleRNG(seed=cfg.seed, step=step))


def _one_step(run: _Run) -> tuple[StepResult, Work]:
    """One optimizer step over this rank's next micro-batches; its result and what those batches held."""
    cfg, step = run.cfg, run.step
    n_micro = bootstrap.batch_layout(cfg, run.runtime.topology.dp_size).micro_batches
    if run.batches is None:
        run.batches = iter(run.data)
    micro = [next(run.batches) for _ in range(n_micro)]
    result = run.runtime.train_step(micro, step_objective(cfg, step), cfg.train.global_batch_size)
    run.step = step + 1
    bind_step(run.step)
    _count_nonfinite(run, result)
    return result, batch_work(cfg.model, micro)


def _count_nonfinite(run: _Run, result: StepResult) -> None:
    if not result.skipped:
        run.consecutive_nonfinite = 0
        return
    run.skipped += 1
    run.consecutive_nonfinite += 1
    if run.consecutive_nonfinite == 1:
        run.before_streak = run.last_checkpoint
    log.warning(
        "non-finite step skipped",
        step=run.step,
        loss=result.loss,
        grad_norm=result.grad_norm,
        consecutive=run.consecutive_nonfinite,
    )
    limit = run.cfg.train.max_consecutive_nonfinite
    if run.consecutive_nonfinite >= limit:
        first = run.step - run.consecutive_nonfinite + 1
        raise TrainingError(
            f"{limit} consecutive steps had a non-finite loss or gradient (last at step {run.step}); stopping. "
            f"{_good_checkpoint(run.before_streak, first)} Lower optim.lr (a resumed run uses the new value), "
            "check the data, or raise train.max_consecutive_nonfinite."
        )


def _good_checkpoint(info: CheckpointInfo | None, first_bad: int) -> str:
    """Where to go back to after a non-finite streak that began at step ``first_bad``."""
    if info is None:
        return f"No checkpoint was written before step {first_bad}."
    if not Path(info.path).exists():
        return f"The last checkpoint before step {first_bad}, {info.path}, was removed by checkpoint.keep_last."
    return f"The last checkpoint before step {first_bad} is intact: {info.path} (--resume {info.path} goes back to it)."


def _state(run: _Run) -> dict[str, Any]:
    return {"runtime": run.runtime.state_dict(), "rng": {"torch": torch.get_rng_state()}}


def _data_state(data: DataSource) -> dict[str, Any]:
    """The data position to checkpoint (collective): :func:`checkpoint_data_state` of every rank's state."""
    return checkpoint_data_state(all_gather_json(data.state_dict()))


def checkpoint_data_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """What a checkpoint keeps of the ranks' data ``states``: the state every rank shares, or, when they
    differ (a loader per data-parallel rank, e.g. energon), ``{"source", "ranks": [state per data-parallel
    rank]}`` (each state names its ``rank``; a source's ``load_state_dict`` picks its own)."""
    if all(state == states[0] for state in states):
        return states[0]
    by_rank = {int(state["rank"]): state for state in states}
    return {"source": states[0].get("source"), "ranks": [by_rank[r] for r in sorted(by_rank)]}


def _save(run: _Run) -> None:
    meta = {
        "step": run.step,
        "config": config_to_yaml(run.cfg),
        "data": _data_state(run.data),
        "skipped_steps": run.skipped,
        "model": {"arch": run.cfg.model.arch},
    }
    t0 = time.perf_counter()
    run.last_checkpoint = run.store.save(run.step, _state(run), meta)
    log.info(
        "checkpoint saved",
        step=run.step,
        path=str(run.last_checkpoint.path),
        seconds=round(time.perf_counter() - t0, 2),
    )


def _restore(run: _Run, info: CheckpointInfo) -> None:
    state = _state(run)
    meta = run.store.load(info, state)
    _compare_settings(run.cfg, meta, info)
    try:
        run.runtime.load_state_dict(state["runtime"])
    except ValueError as exc:
        raise CheckpointError(f"{info.path}: {exc}") from None
    torch.set_rng_state(state["rng"]["torch"])
    try:
        run.data.load_state_dict(meta["data"])
    except ValueError as exc:
        raise CheckpointError(
            f"{info.path}: {exc}; resume with the data settings the checkpoint was written with, or start a "
            "new run in another run.dir"
        ) from None
    run.step = int(meta["step"])
    run.skipped = int(meta.get("skipped_steps", 0))
    run.last_checkpoint = info
    log.info("resumed", step=run.step, checkpoint=str(info.path))


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of a nested mapping (lists are leaves)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _compare_settings(cfg: TrainConfig, meta: Mapping[str, Any], info: CheckpointInfo) -> None:
    """Refuse a resume that changed a :data:`MUST_MATCH_ON_RESUME` setting; log every other changed setting.

    A changed setting is used from now on (``optim.lr``, betas, epsilon, weight decay and the schedule
    included: the checkpoint gives the optimizer's moments and the schedule's position only).

    Raises:
        ConfigError: Naming each setting that must match and the checkpoint's value of it.
    """
    saved = meta.get("config")
    try:
        old = yaml.safe_load(saved) if isinstance(saved, str) else None
    except yaml.YAMLError:
        old = None
    if not isinstance(old, Mapping):
        return
    absent = {"lora.rank": None, "lora.targets": None}  # checkpoints from before LoRA trained without it
    before, now = absent | _flat(old), _flat(yaml.safe_load(config_to_yaml(cfg)))
    missing = object()
    changed = {
        key: (before.get(key, missing), now.get(key, missing))
        for key in sorted(before.keys() | now.keys())
        if key not in _NOT_SETTINGS and before.get(key, missing) != now.get(key, missing)
    }
    problems = [
        f"{key}: is {changed[key][1]!r}, but the checkpoint {info.path} was trained with {changed[key][0]!r}; "
        f"resuming requires the same value (set {key}={changed[key][0]}), or start a new run in another run.dir"
        for key in MUST_MATCH_ON_RESUME
        if key in changed
    ]
    if problems:
        raise ConfigError(problems)
    for key, (was, new) in changed.items():
        log.info(
            "setting changed since the checkpoint; the new value is used",
            key=key,
            old=None if was is missing else was,
            new=None if new is missing else new,
        )


def _progress_bar(cfg: TrainConfig, start: int, is_main: bool) -> tqdm | None:
    """On a terminal (rank 0's stderr), a bar of the optimizer steps with steps/s, ETA and the last loss; ``None``
    elsewhere (files and pipes get the JSON or console lines only)."""
    if not (is_main and sys.stderr.isatty()):
        return None
    return tqdm(total=cfg.train.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _log_metrics(run: _Run, metrics: Mapping[str, float | None]) -> None:
    with _disk_errors(Path(run.cfg.run.dir) / "metrics.jsonl", kept=False):
        run.sink.log(run.step, metrics)  # type: ignore[arg-type]
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}
    log.info("step", **shown)


class _Meter:
    """Throughput and means over one log interval.

    ``samples_per_s``, ``tokens_per_s`` and ``model_tflops`` (per device) count the job's micro-batches
    that ran in the interval, from their own shapes (:mod:`dfm.app.services.throughput`). ``loss``,
    ``grad_norm`` and the objective's metrics are means over the interval's steps where they were
    finite, ``None`` where none was (every step of the interval skipped); ``skipped`` counts the skipped
    steps. Every record has every key.
    """

    def __init__(self, runtime: ParallelRuntime) -> None:
        self.runtime = runtime
        self._reset()

    def _reset(self) -> None:
        self.t0, self.steps, self.skipped, self.last = time.perf_counter(), 0, 0, None
        self.work = Work()
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, result: StepResult, work: Work) -> None:
        self.steps += 1
        self.work += work
        self.skipped += int(result.skipped)
        self.last = result
        values = {"loss": result.loss, "grad_norm": result.grad_norm, **result.metrics}
        for k, v in values.items():
            self.sums.setdefault(k, 0.0)
            self.counts.setdefault(k, 0)
            if math.isfinite(v):
                self.sums[k] += v
                self.counts[k] += 1

    def flush(self, step: int) -> dict[str, float | None]:
        dt = time.perf_counter() - self.t0
        work = job_work(self.work, self.runtime.topology)  # collective: every rank flushes at the same steps
        out: dict[str, float | None] = {
            k: (total / self.counts[k] if self.counts[k] else None) for k, total in self.sums.items()
        }
        out.update(
            lr=self.last.lr if self.last else 0.0,
            **rates(work, dt, self.runtime.topology.world_size),
            max_memory_gib=self.runtime.max_memory_gib(),
            skipped=float(self.skipped),
        )
        self._reset()
        return out
