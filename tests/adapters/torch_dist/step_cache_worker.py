"""One rank of the step-cache parallel tests (launched by ``support.distributed.run_ranks``; not a test module).

``python step_cache_worker.py CASE...``: each case samples latents on this rank with a step cache twice: on the
plain network (the one-process reference, no collective) and on the network parallelized over the 2 ranks
(CFG parallel or context parallel, :func:`sampling_ranks`, as ``generate`` does) with the cache installed on
it, First-Block Cache given the ranks' ``context_sum`` or nothing. It reports the relative difference, the
caches' statistics and a digest of the parallel latents.
"""

from __future__ import annotations

import copy
import hashlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from sampling_worker import network
from support.distributed import run_worker

from dfm.adapters.torch_dist import destroy, init_process_group
from dfm.adapters.torch_dist.parallel_sampling import SamplingLayout, sampling_ranks
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.networks.step_cache import StepCacheConfig, step_caching
from dfm.domain.sampling import sample_latents

LATENT = (4, 2, 4, 8)
"""``(C, F, H, W)``: 16 tokens with patch (1, 2, 2)."""
CASES: dict[str, dict[str, Any]] = {  # name: layout, cache method, whether first_block gets the context_sum
    "context_teacache": {"cfg": 1, "context": 2, "method": "teacache", "reduce": False},
    "cfg_first_block": {"cfg": 2, "context": 1, "method": "first_block", "reduce": False},
    "context_first_block_reduced": {"cfg": 1, "context": 2, "method": "first_block", "reduce": True},
    "context_first_block_refused": {"cfg": 1, "context": 2, "method": "first_block", "reduce": False},
}


def sample(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((1, *LATENT), generator=g)
    text, null = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        return sample_latents(
            model, FlowMatching(shift=3.0), noise, sampler="unipc", steps=10, guidance=5.0, text=text, null_text=null
        )


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    config = StepCacheConfig(method=case["method"], threshold=0.05, warmup=2)
    plain = network("wan")
    with step_caching(plain, config) as reference:
        want = sample(plain)
    net = copy.deepcopy(plain)
    layout = SamplingLayout(cfg=case["cfg"], context=case["context"])
    with (
        sampling_ranks(net, layout, attention_backend="math") as ranks,
        step_caching(net, config, reduce=ranks.context_sum if case["reduce"] else None) as cache,
    ):
        try:
            got = sample(ranks.model)
        except ValueError as exc:
            return {"error": str(exc)}
    return {
        "rel": float((got - want).norm() / want.norm()),
        "want_reused": reference.videos[0].reused,
        "stats": [cache.videos[0].calls, cache.videos[0].rows, cache.videos[0].reused],
        "reference": [reference.videos[0].calls, reference.videos[0].rows, reference.videos[0].reused],
        "digest": hashlib.sha256(got.numpy().tobytes()).hexdigest(),
    }


def main(argv: list[str]) -> dict[str, Any]:
    init_process_group("cpu", timedelta(seconds=60), min_world_size=2)
    torch.use_deterministic_algorithms(True)
    result = {name: run_case(CASES[name]) for name in argv}
    assert dist.get_world_size() == 2
    destroy()
    return result


if __name__ == "__main__":
    run_worker(main)
