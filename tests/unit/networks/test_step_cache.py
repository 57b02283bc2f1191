"""Step caching (TeaCache, First-Block Cache) on tiny WAN and DiT networks: threshold 0 is the network bit for bit,
a positive threshold skips blocks at some steps and stays near the uncached latents, every video starts afresh,
and each batch row (conditional, unconditional, another prompt) keeps its own cache."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from support.networks import tiny_network
from torch import Tensor

from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.networks.step_cache import (
    TEACACHE_WAN_COEFFICIENTS,
    StepCache,
    StepCacheConfig,
    StepCacheStats,
    polynomial,
    relative_l1,
    step_caching,
)
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.sampling import sample_latents
from dfm.domain.specs import WAN_1_3B, WAN_14B

STEPS = 20
DRIFT = 0.03
"""Largest relative L2 distance of cached from uncached final latents allowed at threshold 0.05 (tiny models,
20 steps, guidance 5; measured 2e-3 to 1e-2)."""


def _setup(kind: str, prompts: int = 1) -> tuple[torch.nn.Module, dict[str, Any]]:
    net = tiny_network(kind).eval()
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(prompts, net.spec.in_channels, 3, 8, 8, generator=g)
    text = torch.randn(prompts, 5, net.spec.text_dim, generator=g)
    flow = kind == "wan"
    kw = {
        "process": FlowMatching() if flow else EDM(),
        "noise": noise,
        "sampler": "unipc" if flow else "edm_heun",
        "steps": STEPS,
        "guidance": 5.0,
        "text": text,
    }
    return net, kw


@torch.no_grad()
def _sample(net: torch.nn.Module, kw: dict[str, Any], **override: Any) -> Tensor:
    args = {**kw, **override}
    return sample_latents(net, args.pop("process"), args.pop("noise"), **args)


def _config(method: str, threshold: float, **kw: Any) -> StepCacheConfig:
    return StepCacheConfig(method=method, threshold=threshold, **kw)


def _drift(x: Tensor, reference: Tensor) -> float:
    return float((x - reference).norm() / reference.norm())


@pytest.mark.parametrize("method", ["first_block", "teacache"])
@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_threshold_zero_gives_exactly_the_uncached_latents(kind: str, method: str) -> None:
    net, kw = _setup(kind)
    dense = _sample(net, kw, steps=6)
    with step_caching(net, _config(method, 0.0, warmup=1)) as cache:
        cached = _sample(net, kw, steps=6)
    assert torch.equal(cached, dense)
    (stats,) = cache.videos
    assert stats.reused == 0 and stats.calls == (6 if kind == "wan" else 11)  # Heun: 2 calls per step but the last


@pytest.mark.parametrize("method", ["first_block", "teacache"])
def test_a_positive_threshold_skips_steps_and_stays_near_the_uncached_latents(method: str) -> None:
    net, kw = _setup("wan")
    dense = _sample(net, kw)
    with step_caching(net, _config(method, 0.05, warmup=2)) as cache:
        cached = _sample(net, kw)
    (stats,) = cache.videos
    assert stats.calls == STEPS and stats.rows == 2 * STEPS  # [cond; uncond] in one forward
    assert stats.skipped_calls >= STEPS // 2, stats  # measured: 13 (first_block), 16 (teacache)
    assert stats.reused >= 2 * stats.skipped_calls
    assert 0 < _drift(cached, dense) < DRIFT


def test_dit_with_edm_heun_skips_steps_too() -> None:
    net, kw = _setup("dit")
    dense = _sample(net, kw)
    with step_caching(net, _config("first_block", 0.05, warmup=2)) as cache:
        cached = _sample(net, kw)
    (stats,) = cache.videos
    assert stats.skipped_calls >= 10, stats  # measured: 31 of 39 calls
    assert 0 < _drift(cached, dense) < DRIFT


@pytest.mark.parametrize("method", ["first_block", "teacache"])
def test_no_reuse_during_warmup(method: str) -> None:
    net, kw = _setup("wan")
    dense = _sample(net, kw, steps=5)
    with step_caching(net, _config(method, 0.5, warmup=5)) as cache:
        assert torch.equal(_sample(net, kw, steps=5), dense)
    assert cache.videos[0].reused == 0


@pytest.mark.parametrize("method", ["first_block", "teacache"])
def test_each_video_starts_afresh(method: str) -> None:
    """Two prompts one after the other under one cache equal each sampled with a cache of its own."""
    net, kw = _setup("wan")
    other = {**kw, "text": -kw["text"], "noise": kw["noise"].flip(-1)}
    config = _config(method, 0.05, warmup=2)
    with step_caching(net, config) as cache:
        first, second = _sample(net, kw), _sample(net, other)
    with step_caching(net, config) as alone:
        second_alone = _sample(net, other)
    assert torch.equal(second, second_alone)
    assert len(cache.videos) == 2 and cache.videos[1] == alone.videos[0]
    with step_caching(net, config) as alone:
        assert torch.equal(_sample(net, kw), first)


def test_an_explicit_reset_starts_a_new_video() -> None:
    net, kw = _setup("wan")
    config = _config("first_block", 0.05, warmup=2)
    with step_caching(net, config) as cache:
        first = _sample(net, kw, steps=10)
        cache.reset()
        assert len(cache.videos) == 1
        again = _sample(net, kw, steps=10)
    assert torch.equal(first, again)
    assert cache.videos[0] == cache.videos[1]


@pytest.mark.parametrize("method", ["first_block", "teacache"])
def test_prompts_batched_in_one_call_equal_each_sampled_alone(method: str) -> None:
    """Per-row decisions and state: a batch of 2 prompts (4 rows with guidance) equals each prompt alone."""
    net, kw = _setup("wan", prompts=2)
    config = _config(method, 0.05, warmup=2)
    with step_caching(net, config) as cache:
        both = _sample(net, kw)
    alone = []
    for i in range(2):
        with step_caching(net, config) as single:
            alone.append(_sample(net, kw, noise=kw["noise"][i : i + 1], text=kw["text"][i : i + 1]))
        alone_stats = single.videos[0]
        assert alone_stats.reused > 0
    torch.testing.assert_close(both, torch.cat(alone), rtol=1e-5, atol=1e-6)
    assert cache.videos[0].rows == 4 * STEPS


def test_rows_that_decide_differently_run_alone_and_equal_their_own_cache() -> None:
    """A row that must run goes through the blocks while the other reuses (the partial path)."""
    net, _ = _setup("wan")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    text = torch.randn(2, 5, 32, generator=g)
    t = torch.tensor([900.0, 900.0])
    step = torch.stack([torch.zeros_like(x[0]), 0.5 * torch.randn(x[0].shape, generator=g)])  # row 1 moves far
    config = _config("first_block", 0.05, warmup=1)

    def run(rows: slice) -> tuple[Tensor, StepCacheStats]:
        with torch.no_grad(), step_caching(net, config) as cache:
            net(x[rows], t[rows], text[rows])
            out = net(x[rows] + step[rows], t[rows] - 10, text[rows])
        return out, cache.videos[0]

    both, stats = run(slice(0, 2))
    assert stats.reused == 1 and stats.skipped_calls == 0  # row 0 reused, row 1 ran
    (a, _), (b, _) = run(slice(0, 1)), run(slice(1, 2))
    torch.testing.assert_close(both, torch.cat([a, b]), rtol=1e-5, atol=1e-6)


def test_teacache_decides_the_same_for_the_conditional_and_unconditional_rows() -> None:
    net, kw = _setup("wan")
    with step_caching(net, _config("teacache", 0.05, warmup=2)) as cache:
        _sample(net, kw)
    stats = cache.videos[0]
    assert stats.reused == 2 * stats.skipped_calls  # the probe depends on the timestep only


def test_installing_and_removing_leaves_the_network_as_it_was() -> None:
    net, kw = _setup("wan")
    dense = _sample(net, kw, steps=4)
    before = dict(net.__dict__)
    with step_caching(net, _config("teacache", 0.3, warmup=1)):
        assert net.run_blocks.__self__.__class__ is StepCache
    assert net.__dict__.keys() == before.keys() and "run_blocks" not in net.__dict__
    assert torch.equal(_sample(net, kw, steps=4), dense)
    with step_caching(net, None) as nothing:
        assert nothing is None and "run_blocks" not in net.__dict__


def test_packed_sequences_run_every_block() -> None:
    net, _ = _setup("wan")
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 2, 4, 6, generator=g)]
    args = (latents, torch.tensor([500.0, 400.0]), torch.randn(2, 5, 32, generator=g))
    with torch.no_grad():
        want = net(*args)
        with step_caching(net, _config("first_block", 0.5, warmup=1)):
            got, again = net(*args), net(*args)
    for w, a, b in zip(want, got, again, strict=True):
        assert torch.equal(w, a) and torch.equal(w, b)


def test_first_block_refuses_a_sequence_shard_without_a_reduction() -> None:
    """Under context parallelism each rank would compare only its shard and decide differently."""
    net, _ = _setup("wan")
    x, t, text = torch.randn(1, 4, 3, 8, 8), torch.tensor([900.0]), torch.randn(1, 5, 32)
    with torch.no_grad(), step_caching(net, _config("first_block", 0.05)) as cache:
        inputs = net.embed(x, t, text)
        half = inputs.tokens.shape[1] // 2
        with pytest.raises(ValueError, match=r"holds a shard of it .* use teacache"):
            cache.run_blocks(inputs.tokens[:, :half], inputs)


def test_first_block_with_a_reduction_decides_on_the_reduced_sums() -> None:
    net, kw = _setup("wan")
    config = _config("first_block", 0.05, warmup=2)
    with step_caching(net, config) as plain:
        want = _sample(net, kw)
    seen: list[Tensor] = []

    def reduce(sums: Tensor) -> Tensor:
        seen.append(sums)
        return sums

    with step_caching(net, config, reduce=reduce) as reduced:
        got = _sample(net, kw)
    assert torch.equal(got, want) and plain.videos == reduced.videos
    assert len(seen) == STEPS - 2 and seen[0].shape == (2, 2)  # after warmup: [rows, (|change|, |reference|)]


def test_a_network_without_stages_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs a WAN or DiT network .* Linear has no embed, run_blocks, blocks"):
        StepCache(torch.nn.Linear(2, 2), _config("teacache", 0.1))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"method": "tea", "threshold": 0.1}, "step cache method must be one of first_block, teacache, got 'tea'"),
        ({"method": "teacache", "threshold": -0.1}, "threshold must be a finite number >= 0, got -0.1"),
        ({"method": "teacache", "threshold": math.nan}, "threshold must be a finite number >= 0, got nan"),
        ({"method": "teacache", "threshold": True}, "threshold must be a finite number >= 0, got True"),
        ({"method": "teacache", "threshold": 0.1, "warmup": 0}, "warmup must be None or an integer >= 1, got 0"),
        ({"method": "teacache", "threshold": 0.1, "coefficients": ()}, "coefficients must be None or finite"),
    ],
)
def test_bad_config_values_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        StepCacheConfig(**kw)


def test_warmup_defaults_follow_the_published_methods() -> None:
    assert _config("teacache", 0.1).warmup_calls == 5  # TeaCache4Wan2.1's ret_steps
    assert _config("first_block", 0.1).warmup_calls == 1
    assert _config("first_block", 0.1, warmup=3).warmup_calls == 3


def test_teacache_takes_the_published_fit_for_wan_1_3b_and_14b_and_the_identity_otherwise() -> None:
    config = _config("teacache", 0.08)
    with torch.device("meta"):
        big, huge = WanTransformer(WAN_1_3B), WanTransformer(WAN_14B)
    assert StepCache(big, config).coefficients == TEACACHE_WAN_COEFFICIENTS[(1536, 30)]
    assert StepCache(huge, config).coefficients == TEACACHE_WAN_COEFFICIENTS[(5120, 40)]
    assert StepCache(tiny_network("wan"), config).coefficients == (1.0, 0.0)
    assert StepCache(big, _config("teacache", 0.08, coefficients=[2.0, 0.0])).coefficients == (2.0, 0.0)


def test_polynomial_is_highest_power_first_and_relative_l1_is_per_row() -> None:
    x = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    assert polynomial((3.0, -1.0, 2.0), x).tolist() == [2.0, 2.25, 12.0]  # 3x^2 - x + 2
    ref = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    got = relative_l1(torch.tensor([[1.5, -1.0], [1.0, 0.0]]), ref)
    assert got.tolist() == [0.25, math.inf]  # (0.5 / 2); an all-zero reference never reuses


@pytest.mark.parametrize("method", ["first_block", "teacache"])
def test_a_bf16_network_keeps_its_dtype_and_caches_in_float32(method: str) -> None:
    net, kw = _setup("wan")
    net = net.to(torch.bfloat16)
    kw = {**kw, "text": kw["text"].to(torch.bfloat16), "noise": kw["noise"].to(torch.bfloat16), "steps": 8}
    dense = _sample(net, kw)
    with step_caching(net, _config(method, 0.0, warmup=1)):
        assert torch.equal(_sample(net, kw), dense)
    with step_caching(net, _config(method, 0.1, warmup=2)) as cache:
        cached = _sample(net, kw)
        assert cache._trajectory is not None and cache._trajectory.residual.dtype == torch.float32
    assert cache.videos[0].reused > 0 and cached.dtype == dense.dtype
    assert _drift(cached.float(), dense.float()) < 0.05
