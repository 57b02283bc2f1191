"""One rank of the megatron runtime tests (launched by ``support.distributed.run_ranks``; not a test module).

The device is the fsdp2 worker's ``DFM_TEST_DEVICE`` (``cpu`` with the test-only megatron patches, or
``cuda``). ``python megatron_worker.py OUT CASE...`` runs each case in one process group (megatron's groups are
rebuilt per case):

- ``<layout>`` (a key of :data:`LAYOUTS`): build from the seed, load the fsdp2 tests' start weights, train
  3 steps; report losses and gradient norms.
- ``resume``: 2 steps at ``tensor=2`` and a dist checkpoint (``OUT/ckpt``; its weights and EMA whole in
  ``OUT/saved.safetensors``, ``OUT/saved_ema.safetensors``); its EMA and raw weights alone read into chunks
  built for inference at ``tensor=1`` (``OUT/weights_<which>.safetensors``); that checkpoint loaded at
  ``tensor=2`` (exact resume) and at ``tensor=1`` (data=2), each then taking step 3; rank 0 writes the
  weights right after each load to ``OUT/<name>.loaded.safetensors``.
- ``legacy``: a layout-version-1 checkpoint (``dist_checkpointing.save``'s own pickle-era format) saved at
  ``tensor=2`` and loaded at ``tensor=1``; crafted copies of it refused (see :func:`legacy`).
- ``retune`` (after ``resume``): that checkpoint loaded at ``tensor=2`` by a runtime built with
  :data:`RETUNED` (other lr, betas, eps, weight decay), then steps 3 and 4; rank 0 writes the weights
  after them to ``OUT/retuned.safetensors``.

Batches, spec, settings and the loss are the fsdp2 tests' (loaded from ``fsdp2_worker.py``), so the
parent compares with the same local-runtime reference.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from support.distributed import run_worker
from support.megatron_cpu import patch_megatron_for_cpu

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("fsdp2_worker_shared", HERE.parent / "fsdp2" / "fsdp2_worker.py")
assert _spec is not None and _spec.loader is not None
shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shared)

SPEC = attrs.evolve(shared.SPEC, num_layers=4)
"""The fsdp2 tests' tiny WAN with 4 layers (two per pipeline stage, one per virtual stage of 2 x 2)."""
OPTIONS = dict(shared.OPTIONS)
RETUNED = attrs.evolve(shared.SETTINGS, lr=3e-2, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.1)
"""The optimizer settings a user changes before resuming the ``resume`` case's run."""
LAYOUTS: dict[str, dict[str, Any]] = {
    "data": {},
    "tensor": {"tensor": 2},
    "pipeline": {"pipeline": 2, "activation_checkpointing": "full"},
    "context": {"context": 2, "activation_checkpointing": "selective"},
    "virtual": {"pipeline": 2, "virtual_pipeline": 2},
    "sequence": {"tensor": 2, "sequence_parallel": True},
    "overlap": {"overlap_grad_reduce": True, "overlap_param_gather": True},
}


def runtime_for(layout: dict[str, Any]) -> Any:
    from dfm.adapters.megatron import MegatronRuntime

    runtime = MegatronRuntime(**layout, **OPTIONS)
    runtime.build_network(SPEC)
    runtime.attach_optimizer(shared.SETTINGS)
    return runtime


def train(runtime: Any, steps: range) -> dict[str, list[float]]:
    top = runtime.topology
    share = shared.GLOBAL_BATCH // top.dp_size
    out: dict[str, list[float]] = {"loss": [], "grad_norm": [], "lr": []}
    for step in steps:
        whole = shared.batch(step)
        micro = shared.micro_batches(whole, top.dp_rank * share, (top.dp_rank + 1) * share, 1)
        result = runtime.train_step(micro, shared.loss_fn(step), shared.GLOBAL_BATCH)
        for key in out:
            out[key].append(getattr(result, key))
    return out


def parity(layout: str) -> dict[str, Any]:
    runtime = runtime_for(LAYOUTS[layout])
    runtime.load_weights(start_weights())
    result = train(runtime, range(shared.STEPS))
    result["dp"] = runtime.topology.dp_size
    runtime.close()
    return result


def start_weights() -> dict[str, torch.Tensor]:
    from dfm.domain.networks.wan import WanTransformer

    network = WanTransformer(SPEC, generator=torch.Generator().manual_seed(shared.SEED))
    weights = {name: value.detach().clone() for name, value in network.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    weights["proj_out.weight"] = 0.2 * torch.randn(weights["proj_out.weight"].shape, generator=g)
    return weights


def whole_weights(runtime: Any, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Every rank's weights (or EMA weights) gathered to whole tensors (rank 0's view; collective)."""
    from megatron.core import parallel_state as mpu

    from dfm.adapters.megatron.state import named_parameters

    group = mpu.get_tensor_model_parallel_group()
    weights = runtime.weights(use_ema=use_ema)
    out = {}
    for name, param in named_parameters(runtime._chunks, runtime._blocks):
        value = weights[name].detach().float()
        if getattr(param, "tensor_model_parallel", False) and runtime.sizes.tensor > 1:
            parts = [torch.empty_like(value) for _ in range(runtime.sizes.tensor)]
            dist.all_gather(parts, value.contiguous(), group=group)
            value = torch.cat(parts, dim=param.partition_dim)
        out[name] = value.cpu().clone()
    return out


def resume(out: Path) -> dict[str, Any]:
    from dfm.adapters.checkpoint import DCPCheckpointStore
    from dfm.adapters.megatron import DistCheckpointIO

    store = DCPCheckpointStore(out / "ckpt", io=DistCheckpointIO())
    first = runtime_for({"tensor": 2})
    first.load_weights(start_weights())
    result: dict[str, Any] = {"first": train(first, range(2))}
    info = store.save(2, {"runtime": first.state_dict(), "rng": {"torch": torch.get_rng_state()}}, {"step": 2})
    saved, saved_ema = whole_weights(first), whole_weights(first, use_ema=True)
    if dist.get_rank() == 0:
        save_file(saved, str(out / "saved.safetensors"))
        save_file(saved_ema, str(out / "saved_ema.safetensors"))
    first.close()
    result["weights_only"] = weights_only(out, info)
    for name, layout in (("same", {"tensor": 2}), ("other", {})):
        runtime = runtime_for(layout)
        state = {"runtime": runtime.state_dict(), "rng": {"torch": torch.get_rng_state()}}
        store.load(info, state)
        runtime.load_state_dict(state["runtime"])
        weights = whole_weights(runtime)
        if dist.get_rank() == 0:
            save_file(weights, str(out / f"{name}.loaded.safetensors"))
        result[name] = train(runtime, range(2, 3))
        runtime.close()
    return result


def weights_only(out: Path, info: Any) -> dict[str, Any]:
    """The checkpoint's EMA and raw weights read alone into chunks built for inference at ``tensor=1`` (no DDP,
    no optimizer: megatron's optimizer factory refuses to run meanwhile); rank 0 writes them whole.

    ``DistCheckpointIO.load`` asks megatron for ``strict="raise_all"``, which also refuses a state that leaves
    out some of the checkpoint's keys (here: the optimizer's), unlike the store's contract ("keys the checkpoint
    has but the state lacks are skipped"); the reader here is that IO with ``strict="raise_unexpected"``.
    """
    from megatron.core import dist_checkpointing

    import dfm.adapters.megatron.optimizer as megatron_optimizer
    from dfm.adapters.checkpoint import DCPCheckpointStore
    from dfm.adapters.megatron import DistCheckpointIO, MegatronRuntime
    from dfm.adapters.megatron.checkpoint_io import _NoCommon, _ReaderLoad
    from dfm.adapters.torch_dist.dcp_storage import safetensors_reader

    class PartialIO(DistCheckpointIO):
        def load(self, leaves: dict[str, Any], directory: Path) -> dict[str, Any]:
            strategy, common = _ReaderLoad(safetensors_reader), _NoCommon()
            return dist_checkpointing.load(
                dict(leaves), str(directory), strategy, common_strategy=common, strict="raise_unexpected"
            )

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an optimizer was built to read weights")

    store, found = DCPCheckpointStore(out / "ckpt", io=PartialIO()), {}
    factory, megatron_optimizer.get_megatron_optimizer = megatron_optimizer.get_megatron_optimizer, refuse
    try:
        for use_ema in (True, False):
            runtime = MegatronRuntime(**OPTIONS)
            runtime.build_network(SPEC, inference_dtype=torch.float32)
            which = runtime.restore_weights(lambda state: store.load(info, {"runtime": state}), use_ema=use_ema)
            found[which] = {"ddp": len(runtime._ddp), "optimizer": runtime._optimizer is not None}
            weights = whole_weights(runtime)
            if dist.get_rank() == 0:
                save_file(weights, str(out / f"weights_{which}.safetensors"))
            runtime.close()
    finally:
        megatron_optimizer.get_megatron_optimizer = factory
    return found


def retune(out: Path) -> dict[str, Any]:
    from dfm.adapters.checkpoint import DCPCheckpointStore
    from dfm.adapters.megatron import DistCheckpointIO, MegatronRuntime

    store = DCPCheckpointStore(out / "ckpt", io=DistCheckpointIO())
    runtime = MegatronRuntime(tensor=2, **OPTIONS)
    runtime.build_network(SPEC)
    runtime.attach_optimizer(RETUNED)
    state = {"runtime": runtime.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    store.load(store.latest(), state)
    runtime.load_state_dict(state["runtime"])
    groups = runtime._optimizer.param_groups
    result: dict[str, Any] = {"betas_eps": sorted({(*g["betas"], g["eps"]) for g in groups})}
    result |= train(runtime, range(2, 4))
    weights = whole_weights(runtime)
    if dist.get_rank() == 0:
        save_file(weights, str(out / "retuned.safetensors"))
    runtime.close()
    return result


def legacy(out: Path) -> dict[str, Any]:
    """A checkpoint of layout version 1 (megatron's pickle-based ``torch_dist`` format, as dfm wrote it before)
    loads at another layout; crafted copies of it (``.metadata``, ``common.pt``) are refused and run nothing."""
    import json
    import multiprocessing
    import shutil

    from megatron.core import dist_checkpointing
    from support.checkpoints import Payload, payload_pickle, rewrite_manifest

    from dfm.adapters.checkpoint import DCPCheckpointStore
    from dfm.adapters.megatron import DistCheckpointIO

    root = out / "legacy"
    directory = root / "step_0000002"
    first = runtime_for({"tensor": 2})
    first.load_weights(start_weights())
    train(first, range(2))
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({"runtime": first.state_dict(), "rng": {"torch": torch.get_rng_state()}}, str(directory))
    for child in multiprocessing.active_children():  # megatron's async writer leaves a spawn Manager running
        child.terminate()
        child.join()
    saved = whole_weights(first)
    first.close()
    marker = out / "pwned"
    if dist.get_rank() == 0:
        document = {"format": "dfm-dcp-checkpoint", "version": 1, "step": 2, "meta": {"step": 2}}
        (directory / "meta.json").write_text(json.dumps(document))
        rewrite_manifest(directory, version=1)
        for name, crafted in ((".metadata", payload_pickle(marker)), ("common.pt", None)):
            copy = out / f"crafted-{name.strip('.').replace('.', '-')}" / "step_0000002"
            shutil.copytree(directory, copy)
            if crafted is None:
                torch.save({"runtime": {"scheduler": {"step": Payload(marker)}}}, copy / name)
            else:
                (copy / name).write_bytes(crafted)
            rewrite_manifest(copy)
    dist.barrier()
    runtime = runtime_for({})
    state = {"runtime": runtime.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    result: dict[str, Any] = {"meta": DCPCheckpointStore(root, io=DistCheckpointIO()).load(root, state)}
    runtime.load_state_dict(state["runtime"])
    loaded = whole_weights(runtime)
    result["same_weights"] = all(torch.equal(loaded[k], v) for k, v in saved.items())
    for name in ("metadata", "common-pt"):
        crafted_root = out / f"crafted-{name}"
        try:
            DCPCheckpointStore(crafted_root, io=DistCheckpointIO()).load(crafted_root, state)
            result[name] = None
        except Exception as exc:
            result[name] = f"{type(exc).__name__}: {exc}"
    runtime.close()
    result["marker"] = marker.exists()
    return result


def inference(out: Path) -> dict[str, Any]:
    """Tensor=2 with an EMA after 2 steps: the in-process inference networks (raw and EMA) against one process."""
    from dfm.domain.networks.wan import WanTransformer

    runtime = runtime_for({"tensor": 2})
    runtime.load_weights(start_weights())
    train(runtime, range(2))
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, SPEC.in_channels, 2, 4, 4, generator=g).to(shared.DEVICE)
    t, text = torch.tensor([100.0, 700.0], device=x.device), torch.randn(2, 5, SPEC.text_dim, generator=g).to(x.device)
    errors = {}
    for which, use_ema in (("model", False), ("ema", True)):
        reference = WanTransformer(SPEC, generator=torch.Generator().manual_seed(0)).to(x.device)
        reference.load_state_dict({k: v.to(x.device) for k, v in whole_weights(runtime, use_ema=use_ema).items()})
        with torch.no_grad():
            got, want = runtime.inference_model(use_ema=use_ema)(x, t, text), reference(x, t, text)
        errors[which] = float((got - want).abs().max() / want.abs().max())
    runtime.close()
    return errors


CASES = {"resume": resume, "retune": retune, "legacy": legacy, "inference": inference}


def main(argv: list[str]) -> dict[str, Any]:
    out, cases = Path(argv[0]), argv[1:]
    if shared.DEVICE == "cpu":
        patch_megatron_for_cpu()
    else:  # the runtime joins this group (NCCL) and sets its rank's device; fp32 without TF32 like the reference
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    from dfm.adapters.torch_dist import init_process_group

    init_process_group(shared.DEVICE, min_world_size=2)
    result: dict[str, Any] = {}
    for case in cases:
        result[case] = CASES[case](out) if case in CASES else parity(case)
    from dfm.adapters.torch_dist import destroy

    destroy()
    return result


if __name__ == "__main__":
    run_worker(main)
