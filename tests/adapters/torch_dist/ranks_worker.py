"""One rank of the torch_dist tests (launched by ``support.distributed.run_ranks``; not a test module).

``python ranks_worker.py LAYOUT...``: initialise the process group, build the mesh of every named
layout and report its topology, then run the sequence-parallel cases on the ``cp`` group of the last
layout with ``context > 1``. The parent compares everything with single-process references.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import attrs
import torch
import torch.distributed as dist
from support.distributed import run_worker

from dfm.adapters.torch_dist import (
    DIM_NAMES,
    UlyssesAttention,
    build_mesh,
    destroy,
    fsdp_mesh,
    gather_sequence,
    init_process_group,
    resolve_sizes,
    shard_sequence,
    topology,
)
from dfm.domain.networks.attention import SDPAAttention

LAYOUTS: dict[str, dict[str, int]] = {
    "shard": {},
    "replicate": {"data_replicate": 2},
    "context": {"context": 2},
    "tensor": {"tensor": 2},
    "shard_tensor": {"data_shard": 2, "tensor": 2},
    "replicate_shard": {"data_replicate": 2, "data_shard": 2},
    "context_tensor": {"context": 2, "tensor": 2},
    "replicate_context": {"data_replicate": 2, "context": 2},
}
SHAPE = (2, 4, 8, 4)
"""q/k/v ``[B, H, L, D]`` of the attention cases (the parent builds the same from the same seeds)."""


def inputs(seed: int) -> list[torch.Tensor]:
    """q, k, v, the output weight and a key mask ``[B, 1, 1, L]``, drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(SHAPE, generator=g) for _ in range(4)]
    mask = torch.rand(SHAPE[0], 1, 1, SHAPE[2], generator=g) > 0.3
    mask[..., 0] = True
    return [*tensors, mask]


def error(fn: Callable[[], Any]) -> str | None:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return None


def describe(name: str) -> tuple[dict[str, Any], Any]:
    mesh = build_mesh("cpu", resolve_sizes(dist.get_world_size(), **LAYOUTS[name]))
    names = (*DIM_NAMES, "dp", "dp_shard_cp")
    fsdp = fsdp_mesh(mesh)
    return {
        "topology": attrs.asdict(topology(mesh, "cpu")),
        "sizes": {n: mesh[n].size() for n in names},
        "local_ranks": {n: mesh[n].get_local_rank() for n in names},
        "fsdp": [list(fsdp.mesh_dim_names), list(fsdp.shape)],
    }, mesh


def ulysses_case(group: dist.ProcessGroup, masked: bool) -> dict[str, Any]:
    """Shard q/k/v, Ulysses attention, gather, loss on the full output, backward (the CP recipe of §4)."""
    q, k, v, w, mask = inputs(seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    local = [shard_sequence(t, 2, group) for t in leaves]
    out_local = UlyssesAttention(SDPAAttention("math"), group)(*local, mask if masked else None)
    out = gather_sequence(out_local, 2, group)
    (out * w).sum().backward()
    return {"out": out.tolist(), "grads": [t.grad.tolist() for t in leaves]}


def gather_case(group: dist.ProcessGroup) -> dict[str, Any]:
    """y = gather(3 * shard(x)); loss = sum(y * w): x.grad must be 3 * w on this rank's chunk, 0 elsewhere."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 6, 3, generator=g).requires_grad_(), torch.randn(2, 6, 3, generator=g)
    y = gather_sequence(3.0 * shard_sequence(x, 1, group), -2, group)
    (y * w).sum().backward()
    return {"y": y.tolist(), "x": x.tolist(), "w": w.tolist(), "grad": x.grad.tolist()}


def errors(group: dist.ProcessGroup) -> dict[str, str | None]:
    q = torch.zeros(1, 3, 4, 2)
    kernel = UlyssesAttention(SDPAAttention(), group)
    return {
        "length": error(lambda: shard_sequence(torch.zeros(1, 5, 2), 1, group)),
        "heads": error(lambda: kernel(q, q, q)),
        "mask": error(lambda: kernel(*[torch.zeros(1, 2, 4, 2)] * 3, torch.ones(1, 1, 4, 8, dtype=torch.bool))),
    }


def main(argv: list[str]) -> dict[str, Any]:
    env = init_process_group("cpu", timedelta(seconds=60), min_world_size=2)
    result: dict[str, Any] = {"env": attrs.asdict(env), "again": init_process_group("cpu") == env, "layouts": {}}
    cp_group = None
    for name in argv:
        result["layouts"][name], mesh = describe(name)
        if mesh["cp"].size() > 1:
            cp_group = mesh["cp"].get_group()
    if cp_group is not None:
        result["cp_rank"] = dist.get_rank(cp_group)
        result["ulysses"] = ulysses_case(cp_group, masked=False)
        result["ulysses_masked"] = ulysses_case(cp_group, masked=True)
        result["gather"] = gather_case(cp_group)
        result["errors"] = errors(cp_group)
    destroy()
    destroy()
    result["destroyed"] = not dist.is_initialized()
    return result


if __name__ == "__main__":
    run_worker(main)
