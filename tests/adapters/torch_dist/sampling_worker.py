"""One rank of the parallel-sampling tests (launched by ``support.distributed.run_ranks``; not a test module).

``python sampling_worker.py CASE...``: each case samples latents twice on this rank, from the same noise and
text: with the plain network (the one-process reference, no collective) and with the network parallelized
in the case's layout over the 4 ranks (:func:`sampling_ranks`), a step cache installed in both where the case
names one. An image-to-video case binds the same condition channels and image features around both, as
``generate`` does (:class:`ImageConditioned` around the parallel model). It reports the relative difference, a
digest of the parallel latents (every rank must hold the same bytes) and the step caches' statistics.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from datetime import timedelta
from typing import Any

import attrs
import torch
import torch.distributed as dist
from support.distributed import run_worker

from dfm.adapters.torch_dist import destroy, init_process_group
from dfm.adapters.torch_dist.parallel_sampling import SamplingLayout, sampling_ranks
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.diffusion.image_condition import ImageConditioned, condition_channels, frame_mask
from dfm.domain.networks.dit import DiT
from dfm.domain.networks.step_cache import StepCacheConfig, step_caching
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.sampling import sample_latents
from dfm.domain.specs import DIT_TINY, WAN_TINY

LATENT = (4, 2, 4, 8)
"""``(C, F, H, W)``: 2 x 2 x 4 = 16 tokens with patch (1, 2, 2)."""
CASES: dict[str, dict[str, Any]] = {  # name: network, process, sampler, guidance, layout
    "wan_cfg_context": {"net": "wan", "sampler": "unipc", "guidance": 5.0, "cfg": 2, "context": 2},
    "dit_cfg_context": {"net": "dit", "sampler": "edm_heun", "guidance": 3.0, "cfg": 2, "context": 2},
    "wan_context4": {"net": "wan4", "sampler": "flow_euler", "guidance": 4.0, "cfg": 1, "context": 4},
    "wan_context4_no_guidance": {"net": "wan4", "sampler": "flow_euler", "guidance": 1.0, "cfg": 1, "context": 4},
    "wan_cfg_context_first_block": {
        "net": "wan",
        "sampler": "unipc",
        "guidance": 5.0,
        "cfg": 2,
        "context": 2,
        "steps": 8,
        "cache": StepCacheConfig(method="first_block", threshold=0.05),  # reuses 4 of 16 rows in one process
    },
    "wan_i2v_cfg_context": {"net": "wan_i2v", "sampler": "unipc", "guidance": 5.0, "cfg": 2, "context": 2},
    "wan_i2v_context4": {"net": "wan4_i2v", "sampler": "flow_euler", "guidance": 4.0, "cfg": 1, "context": 4},
    "wan_flf_cfg_context": {"net": "wan_flf", "sampler": "unipc", "guidance": 5.0, "cfg": 2, "context": 2},
}
IMAGE_ROWS, IMAGE_DIM = 3, 10
"""Image-to-video cases: image features ``[R, d]`` per image."""


def network(kind: str) -> torch.nn.Module:
    """A tiny seeded network whose zero-initialised parameters are randomised (every path carries signal).

    ``wan4``: 4 heads; ``_i2v``: image-to-video (the condition channels beside the latents, image features);
    ``_flf``: first-last-frame.
    """
    g = torch.Generator().manual_seed(0)
    if kind == "dit":
        model: torch.nn.Module = DiT(DIT_TINY, generator=g)
    else:
        spec = WAN_TINY
        if kind.startswith("wan4"):
            spec = attrs.evolve(WAN_TINY, num_attention_heads=4, attention_head_dim=6)
        if kind.endswith(("_i2v", "_flf")):
            c = spec.out_channels
            spec = attrs.evolve(
                spec,
                in_channels=3 * c,
                image_dim=IMAGE_DIM,
                added_kv_proj_dim=spec.hidden_size,
                pos_embed_seq_len=2 * IMAGE_ROWS if kind.endswith("_flf") else None,
            )
        model = WanTransformer(spec, generator=g)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def conditioned(model: torch.nn.Module, kind: str) -> torch.nn.Module:
    """``model`` with a seeded image condition bound (image-to-video kinds), else ``model`` itself."""
    if not kind.endswith(("_i2v", "_flf")):
        return model
    g = torch.Generator().manual_seed(9)
    c, f, h, w = LATENT
    last = kind.endswith("_flf")
    mask = frame_mask(1, 1 + c * (f - 1), (h, w), c, last=last)  # temporal stride 4 = c here
    condition = condition_channels(mask, torch.randn(1, c, f, h, w, generator=g))
    image = torch.randn(2 if last else 1, IMAGE_ROWS, IMAGE_DIM, generator=g)
    return ImageConditioned(model, condition, image)


def sample(model: torch.nn.Module, case: dict[str, Any]) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((1, *LATENT), generator=g)
    text, null = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    process = EDM() if case["net"] == "dit" else FlowMatching(shift=3.0)
    with torch.no_grad():
        return sample_latents(
            model,
            process,
            noise,
            sampler=case["sampler"],
            steps=case.get("steps", 3),
            guidance=case["guidance"],
            text=text,
            text_mask=mask,
            null_text=null,
            null_text_mask=mask,
            generator=torch.Generator().manual_seed(8),
        )


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    plain = network(case["net"])
    with step_caching(plain, case.get("cache")) as cache:
        want = sample(conditioned(plain, case["net"]), case)
    layout = SamplingLayout(cfg=case["cfg"], context=case["context"])
    parted = copy.deepcopy(plain)
    with contextlib.ExitStack() as stack:
        ranks = stack.enter_context(sampling_ranks(parted, layout, attention_backend="math"))
        parted_cache = stack.enter_context(step_caching(parted, case.get("cache"), reduce=ranks.context_sum))
        got = sample(conditioned(ranks.model, case["net"]), case)
    return {
        "rel": float((got - want).norm() / want.norm()),
        "finite": bool(got.isfinite().all()),
        "digest": hashlib.sha256(got.numpy().tobytes()).hexdigest(),
        "cache": None if cache is None else [attrs.asdict(v) for v in cache.videos],
        "parted_cache": None if parted_cache is None else [attrs.asdict(v) for v in parted_cache.videos],
    }


def main(argv: list[str]) -> dict[str, Any]:
    init_process_group("cpu", timedelta(seconds=60), min_world_size=4)
    torch.use_deterministic_algorithms(True)
    result = {name: run_case(CASES[name]) for name in argv}
    assert dist.get_world_size() == 4
    destroy()
    return result


if __name__ == "__main__":
    run_worker(main)
