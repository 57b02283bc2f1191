"""Multi-process sampling on real gloo process groups: CFG parallel x context parallel equals one process.

One 4-rank launch runs every case of ``sampling_worker.py`` (WAN with UniPC and flow Euler, DiT with EDM Heun;
CFG 2 x context 2, and context 4 with and without guidance; a first-block step cache deciding over the context
group's shards; WAN image-to-video and first-last-frame, the condition bound around the parallel model); the
layout choice is checked here, in one process.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import attrs
import pytest
from support.distributed import run_ranks

from dfm.adapters.torch_dist.parallel_sampling import SamplingLayout, choose_layout, video_tokens
from dfm.domain.specs import WAN_1_3B, WAN_TINY

HERE = Path(__file__).resolve().parent
WORKER = HERE / "sampling_worker.py"
CASES = (
    "wan_cfg_context",
    "dit_cfg_context",
    "wan_context4",
    "wan_context4_no_guidance",
    "wan_cfg_context_first_block",
    "wan_i2v_cfg_context",
    "wan_i2v_context4",
    "wan_flf_cfg_context",
)
RTOL = {"dit_cfg_context": 2e-5}
"""Relative tolerance on the latents (default 1e-5). EDM starts at ``sigma_max = 80``: float32 rounding of
inputs 80x the final latents' size reaches them amplified (5.4e-6 measured here; the flow cases ~4e-7)."""

WAN_LATENT = (16, 21, 60, 104)
"""WAN 2.1's latent of an 81 x 480 x 832 video: 21 x 30 x 52 = 32,760 tokens."""


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(WORKER, 4, CASES, timeout=180)


@pytest.mark.parametrize("case", CASES)
def test_parallel_latents_equal_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    for rank, result in enumerate(ranks):
        got = result[case]
        assert got["finite"], (case, rank)
        assert got["rel"] <= RTOL.get(case, 1e-5), (case, rank, got["rel"])
    assert len({r[case]["digest"] for r in ranks}) == 1, f"{case}: the ranks' latents differ"


def test_a_step_cache_decides_as_in_one_process(ranks: list[dict[str, Any]]) -> None:
    """CFG 2 x context 2: each CFG rank caches its half of the rows, the context ranks reduce the first block's
    L1 sums over their shards; together they reuse the rows one process reuses."""
    case = "wan_cfg_context_first_block"
    (want,) = ranks[0][case]["cache"]
    assert 0 < want["reused"] < want["rows"] == 16  # a case where the decisions matter
    parted = [r[case]["parted_cache"][0] for r in ranks]
    assert parted[0] == parted[1] and parted[2] == parted[3]  # a context group decides alike
    assert parted[0]["rows"] + parted[2]["rows"] == want["rows"]
    assert parted[0]["reused"] + parted[2]["reused"] == want["reused"]


def layout(world: int, guidance: float = 5.0, **kw: Any) -> SamplingLayout:
    return choose_layout(world, guidance=guidance, spec=WAN_1_3B, latent_shape=WAN_LATENT, **kw)


@pytest.mark.parametrize(
    ("world", "guidance", "options", "want"),
    [
        (1, 5.0, {}, (1, 1)),
        (2, 5.0, {}, (2, 1)),
        (4, 5.0, {}, (2, 2)),
        (8, 5.0, {}, (2, 4)),
        (3, 5.0, {}, (1, 3)),  # odd: all context parallel
        (2, 1.0, {}, (1, 2)),  # one pass per step: nothing for CFG parallel to split
        (4, 0.0, {}, (1, 4)),
        (4, 5.0, {"cfg_parallel": False}, (1, 4)),
        (4, 5.0, {"cfg_parallel": True}, (2, 2)),
        (4, 5.0, {"context": 4}, (1, 4)),
        (4, 5.0, {"context": 2}, (2, 2)),
        (2, 5.0, {"cfg_parallel": True, "context": 1}, (2, 1)),
    ],
)
def test_the_layout_is_cfg_first_then_context(
    world: int, guidance: float, options: dict[str, Any], want: tuple[int, int]
) -> None:
    got = layout(world, guidance, **options)
    assert (got.cfg, got.context) == want and got.world == world


@pytest.mark.parametrize(
    ("world", "guidance", "options", "message"),
    [
        (1, 5.0, {"context": 2}, "needs a multiple of 2 processes, but 1 process was launched (no torchrun)"),
        (1, 5.0, {"cfg_parallel": True}, "1 process was launched (no torchrun); launch an even number"),
        (3, 5.0, {"cfg_parallel": True}, "--cfg-parallel splits the processes into pairs, but 3 processes"),
        (2, 1.0, {"cfg_parallel": True}, "--guidance 1 runs one pass per step (conditional only)"),
        (4, 0.0, {"context": 2}, "leaves a factor of 2 for CFG parallelism, but --guidance 0 runs one pass"),
        (4, 5.0, {"context": 1}, "leaves a factor of 4 for CFG parallelism, but CFG parallelism splits only the 2"),
        (4, 5.0, {"context": 3}, "4 processes were launched; launch `torchrun --nproc-per-node 3 -m dfm.app.generate"),
        (4, 5.0, {"context": 3}, "or use a divisor of 4 (1, 2, 4)"),
        (1, 5.0, {"cfg_parallel": False, "context": 2}, "needs 2 processes (CFG 1 x context 2), but 1 process was"),
        (2, 5.0, {"cfg_parallel": True, "context": 2}, "needs 4 processes (CFG 2 x context 2), but 2 processes"),
        (16, 5.0, {"cfg_parallel": False}, "splits the model's 12 attention heads (Ulysses), but 12 is not divisible"),
    ],
)
def test_impossible_layouts_are_refused_with_the_fix(
    world: int, guidance: float, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        layout(world, guidance, **options)


def test_a_token_count_the_context_does_not_divide_is_refused() -> None:
    spec = attrs.evolve(WAN_TINY, num_attention_heads=4, attention_head_dim=6)
    shape = (4, 3, 4, 4)  # 3 x 2 x 2 = 12 tokens
    assert video_tokens(shape, spec.patch_size) == 12
    assert choose_layout(4, guidance=1.0, spec=spec, latent_shape=shape).context == 4
    with pytest.raises(ValueError, match=r"each video's 6 tokens \(latent grid 3x2x1 after patchifying\)") as err:
        choose_layout(4, guidance=1.0, spec=attrs.evolve(spec, patch_size=(1, 2, 4)), latent_shape=shape)
    assert "--context-parallel among 1, 2" in str(err.value)
    with pytest.raises(ValueError, match=r"each video's 9 tokens"):
        choose_layout(2, guidance=1.0, spec=spec, latent_shape=(4, 1, 6, 6))


def test_a_context_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="--context-parallel must be an integer >= 1, got 0"):
        layout(2, context=0)
