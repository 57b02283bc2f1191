"""Step caching composes with multi-process sampling (real gloo process groups, 2 ranks): under context
parallelism (each rank caches its shard of the tokens) and CFG parallelism (each rank caches its half of the
batch) the cached latents equal one process's, and every rank takes the same decisions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support.distributed import run_ranks

WORKER = Path(__file__).resolve().parent / "step_cache_worker.py"
CASES = ("context_teacache", "cfg_first_block", "context_first_block_reduced", "context_first_block_refused")


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(WORKER, 2, CASES, timeout=180)


@pytest.mark.parametrize("case", ["context_teacache", "context_first_block_reduced"])
def test_context_parallel_caches_equal_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    for got in (r[case] for r in ranks):
        assert got["rel"] <= 1e-5, got
        assert got["want_reused"] > 0, got  # the cache did reuse
        assert got["stats"] == got["reference"], got  # each rank took the one-process decisions
    assert len({r[case]["digest"] for r in ranks}) == 1


def test_cfg_parallel_caches_equal_one_process(ranks: list[dict[str, Any]]) -> None:
    case = "cfg_first_block"
    for got in (r[case] for r in ranks):
        assert got["rel"] <= 1e-5, got
        calls, rows, reused = got["stats"]
        assert rows == calls and reused > 0, got  # one row (cond or uncond) per rank
    assert sum(r[case]["stats"][2] for r in ranks) == ranks[0][case]["reference"][2]
    assert len({r[case]["digest"] for r in ranks}) == 1


def test_first_block_on_a_shard_without_a_reduction_is_refused_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        assert "holds a shard of it" in r["context_first_block_refused"]["error"]
