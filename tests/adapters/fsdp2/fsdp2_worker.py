"""One rank of the fsdp2 runtime tests (launched by ``support.distributed.run_ranks``; not a test module).

``python fsdp2_worker.py OUT CASE...`` runs, in one process group, each case in order:

- ``<layout>`` (a key of :data:`LAYOUTS`): build from the seed (rank 0 writes the initial weights to
  ``OUT/<layout>.init.safetensors``), load :func:`start_weights`, train :data:`STEPS` steps; report the
  losses and gradient norms; rank 0 writes the final weights and EMA to ``OUT/<layout>.final.safetensors``.
- ``resume``: 2 steps at ``shard`` and a checkpoint (``OUT/ckpt``); that checkpoint loaded at ``shard``
  (exact resume) and at ``tensor`` (another layout), each then taking step 3; then its EMA and raw weights
  alone, read into networks built for inference at ``tensor`` (``OUT/weights_<which>_<dtype>.safetensors``).
- ``errors``: the ``ValueError`` messages of a few layouts that cannot work;
- ``export``: the training service trains ``wan_tiny_t2v`` for 2 steps at ``parallel.tensor=2``
  (``OUT/tp_run``; both ranks sample a video at step 2), then these ranks export it through the app service:
  the EMA weights in float32 (``OUT/tp_ema``) and the raw weights in bf16, sharded into several files
  (``OUT/tp_raw``);
- ``lora_<layout>``: as ``<layout>`` with :data:`LORA` adapters (the base frozen, float32 or bf16 as the layout
  says in :data:`LORA_LAYOUTS`); rank 0 writes the adapters and their EMA (``OUT/lora_<layout>.final.safetensors``)
  and the state's model keys are reported;
- ``i2v_<layout>``: the training service trains ``wan_tiny_i2v`` (image-to-video) for 2 steps at ``<layout>``;
- ``bf16``: data parallel over all ranks with bf16 mixed precision, activation checkpointing and (on CUDA)
  compiled blocks (``compile`` is ignored on the CPU).

The device is ``DFM_TEST_DEVICE`` (default ``cpu``; ``cuda`` for the GPU tests).

The parent test builds the same references with the local runtime (:func:`start_weights`, :func:`batch`,
:func:`loss_fn` are shared with it).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from support.distributed import run_worker
from torch.distributed.tensor import DTensor

from dfm.adapters.checkpoint import DCPCheckpointStore
from dfm.adapters.fsdp2 import FSDP2Runtime
from dfm.adapters.torch_dist import destroy, init_process_group, is_checkpointed
from dfm.adapters.tracking import read_metrics
from dfm.domain.batch import Batch
from dfm.domain.diffusion import FlowMatching
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.objective import Objective
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import WAN_TINY, WanSpec
from dfm.ports.runtime import LoraSettings, LossFn, OptimizerSettings

SPEC = attrs.evolve(WAN_TINY, num_attention_heads=4, attention_head_dim=8, ffn_dim=64)
"""Tiny WAN with 4 heads, so tensor x context = 4 divides them."""
LATENT = (4, 4, 8, 8)
"""``C, F, H, W``: 4 x 4 x 4 = 64 tokens with the (1, 2, 2) patch."""
TEXT_LEN, GLOBAL_BATCH, STEPS, SEED = 8, 4, 3, 0
SETTINGS = OptimizerSettings(lr=1e-2, weight_decay=0.01, warmup_steps=1)
DEVICE = os.environ.get("DFM_TEST_DEVICE", "cpu")
OPTIONS: dict[str, Any] = {"device": DEVICE, "precision": "fp32", "grad_clip": 1.0, "ema_decay": 0.9, "seed": SEED}
"""Runtime knobs shared with the local reference (the clip acts on steps 1 and 2, not on step 3)."""
LAYOUTS: dict[str, dict[str, int]] = {
    "shard": {"data_shard": 2},
    "replicate": {"data_replicate": 2, "data_shard": 1},
    "tensor": {"tensor": 2},
    "context": {"context": 2},
    "shard_tensor": {"data_shard": 2, "tensor": 2},
    "context_tensor": {"context": 2, "tensor": 2},
    "replicate_shard": {"data_replicate": 2, "data_shard": 2},
}
CHECKPOINTED: dict[str, dict[str, Any]] = {
    "context_tensor": {"activation_checkpointing": "full", "activation_checkpointing_every_k": 2},
    "context": {"activation_checkpointing": "selective"},
}
"""Layouts trained with activation checkpointing (the recompute runs the all-to-alls again; ``selective`` keeps
the attention outputs): each must still reproduce the local runtime trained without it."""


LORA = LoraSettings(rank=4, alpha=8.0)
"""The adapters of the ``lora_<layout>`` cases (on the plan's linears)."""
LORA_LAYOUTS = {"tensor": LORA, "context_tensor": LORA, "shard": attrs.evolve(LORA, base_dtype=torch.bfloat16)}
"""``shard`` keeps the frozen base in bf16 and so computes in bf16 (``precision: bf16``)."""


def start_weights() -> dict[str, torch.Tensor]:
    """The seed's weights with a random output projection, so that step 1 has gradients in every block."""
    network = WanTransformer(SPEC, generator=torch.Generator().manual_seed(SEED))
    weights = {name: value.detach().clone() for name, value in network.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    weights["proj_out.weight"] = 0.2 * torch.randn(weights["proj_out.weight"].shape, generator=g)
    return weights


def batch(step: int) -> Batch:
    """The global batch of ``step`` (sample indices ``4 * step ...``)."""
    g = torch.Generator().manual_seed(100 + step)
    return Batch(
        latents=torch.randn(GLOBAL_BATCH, *LATENT, generator=g),
        text=torch.randn(GLOBAL_BATCH, TEXT_LEN, SPEC.text_dim, generator=g),
        sample_index=torch.arange(GLOBAL_BATCH * step, GLOBAL_BATCH * (step + 1)),
    )


def micro_batches(whole: Batch, start: int, stop: int, size: int) -> list[Batch]:
    """Samples ``start:stop`` of ``whole`` in micro-batches of ``size``."""
    return [
        Batch(
            latents=whole.latents[i : i + size],
            text=whole.text[i : i + size],
            sample_index=whole.sample_index[i : i + size],
        )
        for i in range(start, stop, size)
    ]


def loss_fn(step: int) -> LossFn:
    return Objective(process=FlowMatching(), rng=SampleRNG(seed=SEED, step=step))


def full(state: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Whole tensors of a (sharded) state (collective)."""
    return {
        prefix + k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in state.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }


def dump(runtime: FSDP2Runtime, path: Path, ema: bool = True) -> None:
    """Rank 0 writes the whole weights (and EMA weights as ``ema.<name>``) to ``path``."""
    state = runtime.state_dict()
    tensors = full(state["model"]) | (full(state["ema"], "ema.") if ema else {})
    if dist.get_rank() == 0:
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path))


def train(runtime: FSDP2Runtime, steps: range) -> dict[str, list[float]]:
    """Steps ``steps``: this data-parallel rank's share of each global batch, in micro-batches of 1."""
    top = runtime.topology
    share = GLOBAL_BATCH // top.dp_size
    out: dict[str, list[float]] = {"loss": [], "grad_norm": [], "lr": [], "mse": []}
    for step in steps:
        micro = micro_batches(batch(step), top.dp_rank * share, (top.dp_rank + 1) * share, 1)
        result = runtime.train_step(micro, loss_fn(step), GLOBAL_BATCH)
        assert not result.skipped
        for key, value in (("loss", result.loss), ("grad_norm", result.grad_norm), ("lr", result.lr)):
            out[key].append(value)
        out["mse"].append(result.metrics["mse"])
    return out


def parity(out: Path, layout: str) -> dict[str, Any]:
    runtime = FSDP2Runtime(**LAYOUTS[layout], **OPTIONS, **CHECKPOINTED.get(layout, {}))
    runtime.build_network(SPEC)
    runtime.attach_optimizer(SETTINGS)
    dump(runtime, out / f"{layout}.init.safetensors", ema=False)
    runtime.load_weights(start_weights())
    result: dict[str, Any] = train(runtime, range(STEPS))
    dump(runtime, out / f"{layout}.final.safetensors")
    result["checkpointed"] = [is_checkpointed(block) for block in runtime.inference_model(use_ema=False).blocks]
    result["topology"] = {
        "dp": runtime.topology.dp_size,
        "cp": runtime.topology.cp_size,
        "tp": runtime.topology.tp_size,
    }
    return result


def lora(out: Path, layout: str) -> dict[str, Any]:
    settings = LORA_LAYOUTS[layout]
    precision = "bf16" if settings.base_dtype == torch.bfloat16 else OPTIONS["precision"]
    runtime = FSDP2Runtime(**LAYOUTS[layout], **(OPTIONS | {"precision": precision}), lora=settings)
    runtime.build_network(SPEC)
    runtime.attach_optimizer(SETTINGS)
    runtime.load_weights(start_weights())
    result: dict[str, Any] = train(runtime, range(STEPS))
    dump(runtime, out / f"lora_{layout}.final.safetensors")
    result["model_keys"] = sorted(runtime.state_dict()["model"])
    return result


def resume(out: Path) -> dict[str, Any]:
    store = DCPCheckpointStore(out / "ckpt")
    first = FSDP2Runtime(**LAYOUTS["shard"], **OPTIONS)
    first.build_network(SPEC)
    first.attach_optimizer(SETTINGS)
    first.load_weights(start_weights())
    train(first, range(2))
    info = store.save(2, {"runtime": first.state_dict()}, {"step": 2})
    dump(first, out / "saved.safetensors")
    result: dict[str, Any] = {}
    for layout in ("shard", "tensor"):
        runtime = FSDP2Runtime(**LAYOUTS[layout], **OPTIONS)
        runtime.build_network(SPEC)
        runtime.attach_optimizer(SETTINGS)
        state = {"runtime": runtime.state_dict()}
        store.load(info, state)
        runtime.load_state_dict(state["runtime"])
        dump(runtime, out / f"loaded_{layout}.safetensors")
        result[layout] = train(runtime, range(2, 3))
        dump(runtime, out / f"resumed_{layout}.safetensors")
    result["weights_only"] = weights_only(out, info)
    return result


def weights_only(out: Path, info: Any) -> dict[str, Any]:
    """The checkpoint's EMA and raw weights read alone into networks built for inference at ``tensor`` (no
    optimizer: ``torch.optim.Optimizer`` refuses to be built meanwhile); rank 0 writes them whole."""
    store, found = DCPCheckpointStore(out / "ckpt"), {}
    refused, torch.optim.Optimizer.__init__ = torch.optim.Optimizer.__init__, _refuse
    try:
        for use_ema, dtype in ((True, torch.float32), (False, torch.float32), (True, torch.bfloat16)):
            runtime = FSDP2Runtime(**LAYOUTS["tensor"], **OPTIONS)
            model = runtime.build_network(SPEC, inference_dtype=dtype)
            which = runtime.restore_weights(lambda state: store.load(info, {"runtime": state}), use_ema=use_ema)
            name = f"{which}_{str(dtype).removeprefix('torch.')}"
            found[name] = sorted({str(p.dtype) for p in model.parameters()})
            weights = full(runtime.weights())
            if dist.get_rank() == 0:
                save_file(
                    {k: v.cpu().contiguous() for k, v in weights.items()}, str(out / f"weights_{name}.safetensors")
                )
    finally:
        torch.optim.Optimizer.__init__ = refused
    return found


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("an optimizer was built to read weights")


def export(out: Path) -> dict[str, Any]:
    """Train a tensor-parallel run with the training service and export it on these ranks (collective)."""
    from dfm.app.config import resolve_config
    from dfm.app.services.checkpoints import export_checkpoint
    from dfm.app.services.training import train as train_run

    run = out / "tp_run"
    overrides = ["runtime=fsdp2", "parallel.tensor=2", f"run.dir={run}", "train.max_steps=2", "train.ema_decay=0.9"]
    overrides += ["sample.every_n_steps=2", "sample.steps=2", "sample.prompts=[a red circle]"]  # both ranks sample
    train_run(resolve_config("wan_tiny_t2v", None, [*overrides, "logging.level=WARNING"]))
    ema = export_checkpoint(run, out / "tp_ema", dtype=torch.float32)
    raw = export_checkpoint(run, out / "tp_raw", use_ema=False, dtype=torch.bfloat16, max_shard_bytes=20_000)
    return {name: [done.weights, done.step, done.ranks] for name, done in (("ema", ema), ("raw", raw))}


def image_to_video(out: Path, layout: str) -> list[float]:
    """The training service trains ``wan_tiny_i2v`` for 2 steps at ``layout`` (collective); its losses."""
    from dfm.app.config import resolve_config
    from dfm.app.services.training import train as train_run

    run = out / f"i2v_{layout}"
    sizes = [f"parallel.{k}={v}" for k, v in LAYOUTS[layout].items()]
    overrides = ["runtime=fsdp2", *sizes, f"run.dir={run}", "train.max_steps=2", "logging.level=WARNING"]
    train_run(resolve_config("wan_tiny_i2v", None, overrides))
    dist.barrier()
    return [row["loss"] for row in read_metrics(run / "metrics.jsonl")]


def errors() -> dict[str, str]:
    found = {}
    attempts = {
        "world": lambda: FSDP2Runtime(tensor=2, data_shard=2, **OPTIONS),
        "heads": lambda: FSDP2Runtime(tensor=2, **OPTIONS).build_network(
            WanSpec(num_attention_heads=3, attention_head_dim=8, ffn_dim=64, num_layers=1)
        ),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
        except ValueError as exc:
            found[name] = str(exc)
    runtime = FSDP2Runtime(context=2, **OPTIONS)
    runtime.build_network(SPEC)
    runtime.attach_optimizer(SETTINGS)
    odd = Batch(latents=torch.randn(2, 4, 3, 2, 2), text=torch.randn(2, TEXT_LEN, 32), sample_index=torch.arange(2))
    try:
        runtime.train_step([odd], loss_fn(0), 2)
    except ValueError as exc:
        found["tokens"] = str(exc)
    return found


def mixed_precision() -> dict[str, Any]:
    """3 steps in bf16 with checkpointing (and compiled blocks on CUDA): losses, dtypes, peak memory."""
    options = OPTIONS | {"precision": "bf16", "activation_checkpointing": "full", "compile": True}
    runtime = FSDP2Runtime(**options)
    runtime.build_network(SPEC)
    runtime.attach_optimizer(SETTINGS)
    runtime.load_weights(start_weights())
    result: dict[str, Any] = train(runtime, range(STEPS))
    model = runtime.inference_model(use_ema=False)
    result["compiled"] = [block._compiled_call_impl is not None for block in model.blocks]
    result["param_dtypes"] = sorted({str(p.dtype) for p in model.parameters()})
    with torch.no_grad():
        b = batch(0)
        out = model(
            b.latents.to(runtime.device),
            torch.full((GLOBAL_BATCH,), 500.0, device=runtime.device),
            b.text.to(runtime.device),
        )
    result["output_dtype"] = str(out.dtype)
    result["fused"] = [g.get("fused") for g in runtime._optimizer.param_groups]
    result["max_memory_gib"] = runtime.max_memory_gib()
    return result


def main(argv: list[str]) -> dict[str, Any]:
    out, cases = Path(argv[0]), argv[1:]
    init_process_group(DEVICE, timedelta(seconds=120))
    result: dict[str, Any] = {}
    for case in cases:
        if case == "resume":
            result[case] = resume(out)
        elif case == "errors":
            result[case] = errors()
        elif case == "bf16":
            result[case] = mixed_precision()
        elif case == "export":
            result[case] = export(out)
        elif case.startswith("i2v_"):
            result[case] = image_to_video(out, case.removeprefix("i2v_"))
        elif case.startswith("lora_"):
            result[case] = lora(out, case.removeprefix("lora_"))
        else:
            result[case] = parity(out, case)
    destroy()
    return result


if __name__ == "__main__":
    run_worker(main)
