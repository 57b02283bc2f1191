"""torch_dist on real gloo process groups: meshes and topologies, Ulysses attention and sequence gradients.

Two launches (2 and 4 ranks) run every case of ``ranks_worker.py``; the references are computed here
in one process: ``scaled_dot_product_attention`` on the full sequence and its gradients.
"""

from __future__ import annotations

import importlib.util
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from support.distributed import run_ranks

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ranks_worker.py"
LAYOUTS: dict[str, tuple[int, int, int, int]] = {  # (dp_replicate, dp_shard, cp, tp)
    "shard": (1, 2, 1, 1),
    "replicate": (2, 1, 1, 1),
    "context": (1, 1, 2, 1),
    "tensor": (1, 1, 1, 2),
    "shard_tensor": (1, 2, 1, 2),
    "replicate_shard": (2, 2, 1, 1),
    "context_tensor": (1, 1, 2, 2),
    "replicate_context": (2, 1, 2, 1),
}
NAMES = ("dp_replicate", "dp_shard", "cp", "tp")


def _worker_inputs() -> Any:
    """The worker's ``inputs`` (the worker is a script, not an importable module)."""
    spec = importlib.util.spec_from_file_location("ranks_worker_inputs", WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.inputs


inputs = _worker_inputs()


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def ranks(request: pytest.FixtureRequest) -> tuple[int, list[dict[str, Any]]]:
    world = request.param
    names = [name for name, shape in LAYOUTS.items() if math.prod(shape) == world]
    return world, run_ranks(WORKER, world, names, timeout=120)


def expected_layout(shape: tuple[int, int, int, int], rank: int) -> dict[str, Any]:
    R, S, C, T = shape
    coords = dict(zip(NAMES, torch.unravel_index(torch.tensor(rank), shape), strict=True))
    coords = {name: int(c) for name, c in coords.items()}
    local = coords | {
        "dp": coords["dp_replicate"] * S + coords["dp_shard"],
        "dp_shard_cp": coords["dp_shard"] * C + coords["cp"],
    }
    fsdp = [["dp_shard_cp"], [S * C]] if R == 1 else [["dp_replicate", "dp_shard_cp"], [R, S * C]]
    topology = {"world_size": R * S * C * T, "rank": rank, "dp_size": R * S, "dp_rank": local["dp"]}
    topology |= {"tp_size": T, "cp_size": C, "pp_size": 1, "device": "cpu"}
    sizes = dict(zip(NAMES, shape, strict=True)) | {"dp": R * S, "dp_shard_cp": S * C}
    return {"topology": topology, "sizes": sizes, "local_ranks": local, "fsdp": fsdp}


def test_meshes_and_topologies(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    world, results = ranks
    for rank, result in enumerate(results):
        assert result["env"] == {
            "rank": rank,
            "world_size": world,
            "local_rank": rank,
            "master_addr": "127.0.0.1",
            "master_port": results[0]["env"]["master_port"],
        }
        assert result["again"] and result["destroyed"]
        assert result["layouts"], "no layout of this world size was run"
        for name, got in result["layouts"].items():
            assert got == expected_layout(LAYOUTS[name], rank), (name, rank)


def reference(masked: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    q, k, v, w, mask = inputs(seed=1)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves, attn_mask=mask if masked else None)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("case", ["ulysses", "ulysses_masked"])
def test_ulysses_attention_equals_full_sdpa(ranks: tuple[int, list[dict[str, Any]]], case: str) -> None:
    """Forward and q/k/v gradients: each cp rank's gradient is the full one on its chunk, zero elsewhere."""
    _, results = ranks
    out, grads = reference(masked=case == "ulysses_masked")
    length = out.shape[2] // 2
    for result in results:
        got = result[case]
        # The heads' split changes the SDPA kernel's blocking, so float32 sums round differently: 7e-7 was seen
        # against values of order 1. A misrouted head or sequence chunk is off by order 1.
        torch.testing.assert_close(torch.tensor(got["out"]), out, rtol=1e-5, atol=1e-5)
        chunk = slice(result["cp_rank"] * length, (result["cp_rank"] + 1) * length)
        for name, grad, full in zip("qkv", got["grads"], grads, strict=True):
            expected = torch.zeros_like(full)
            expected[:, :, chunk] = full[:, :, chunk]
            torch.testing.assert_close(torch.tensor(grad), expected, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_gather_sequence_backward_keeps_this_ranks_slice(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    """Not a reduce-scatter: summed over the cp ranks, the gradient is the true one (not cp times it)."""
    _, results = ranks
    for result in results:
        got = {key: torch.tensor(value) for key, value in result["gather"].items()}
        assert torch.equal(got["y"], 3.0 * got["x"])
        chunk = slice(result["cp_rank"] * 3, (result["cp_rank"] + 1) * 3)
        expected = torch.zeros_like(got["w"])
        expected[:, chunk] = 3.0 * got["w"][:, chunk]
        assert torch.equal(got["grad"], expected)


def test_sequence_errors_are_explained(ranks: tuple[int, list[dict[str, Any]]]) -> None:
    _, results = ranks
    errors = results[0]["errors"]
    assert errors["length"] == (
        "shard_sequence: the sequence length 5 (dim 1 of shape (1, 5, 2)) is not divisible by the context-parallel "
        "size 2; choose a video size whose token count is a multiple of parallel.context"
    )
    assert errors["heads"].startswith(
        "Ulysses context parallelism splits the attention heads over parallel.context=2 ranks, but this rank holds "
        "3 heads (after tensor parallelism)"
    )
    assert errors["mask"] == (
        "UlyssesAttention supports only key masks [B | 1, 1, 1, S] over the full sequence, got a mask of shape "
        "(1, 1, 4, 8)"
    )


_FAILING = """
import torch.distributed as dist
from support.distributed import run_worker


def main(argv):
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise RuntimeError("rank one gives up: " + argv[0])
    dist.barrier()  # rank 0 waits here for a peer that is gone
    return {}


if __name__ == "__main__":
    run_worker(main)
"""


def test_run_ranks_surfaces_a_failing_rank(tmp_path: Path) -> None:
    script = tmp_path / "failing.py"
    script.write_text(textwrap.dedent(_FAILING))
    with pytest.raises(
        AssertionError, match=r"(?s)ranks \[.*1.*\] of 2 .* failed.*--- rank 1 .*RuntimeError: rank one gives up: now"
    ):
        run_ranks(script, 2, ["now"], timeout=60)
