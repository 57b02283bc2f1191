"""Step caching: skip the transformer blocks at a sampling step whose input barely changed, reusing the residual
``blocks(x) - x`` of the last step that ran them.

Two published decision rules, both training-free:

- ``teacache`` (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model", 2024):
  accumulate ``sum_k f(||m_k - m_{k-1}||_1 / ||m_{k-1}||_1)`` over the steps since the blocks last ran, where ``m``
  is the timestep-modulated input and ``f`` a polynomial fitted offline to map its change onto the change of the
  blocks' output; while the sum stays under the threshold, reuse the last residual (output of all blocks minus
  their input), else run the blocks and restart the sum. For WAN 2.1, as in the authors' TeaCache4Wan2.1
  ("ret_steps" mode, whose fits we use), ``m`` is the six timestep modulations ``time_proj(silu(temb))``, and the
  first 5 calls always run. For other networks ``m`` is the timestep embedding and ``f`` the identity.
- ``first_block`` (First-Block Cache, ParaAttention; diffusers' ``FirstBlockCacheConfig``): always run the first
  block; when its residual ``r_1 = block_1(x) - x`` differs from the one of the last step that ran every block by
  less than the threshold in relative L1 (``||r_1 - r_1'||_1 / ||r_1'||_1``), add the cached residual of the
  remaining blocks to the first block's output instead of running them.

Decisions are per batch row with per-row state, so the conditional and unconditional halves of a batched
classifier-free-guidance forward (and different prompts in one batch) keep separate caches, as TeaCache's WAN
port keeps one for each pass; a sample's result does not depend on what else is in the batch. Rows that must
run go through the blocks together; the others reuse their residuals. A threshold of 0 never reuses and gives
exactly the network's own output.

The cache replaces the network's ``embed`` and ``run_blocks`` on the instance (:func:`step_caching`), so
anything that drives the network's stages keeps working: a context-parallel runtime hands ``run_blocks`` its
shard of the tokens and caches that shard (``teacache`` decides from the timestep alone, the same on every
rank; ``first_block`` needs its L1 sums reduced over the shards), and a classifier-free-guidance-parallel
wrapper hands each rank its half of the batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple

import attrs
import torch
from torch import Tensor

from dfm.domain.networks.dit import DiTInputs
from dfm.domain.networks.wan import WanInputs
from dfm.domain.specs import WanSpec

CacheMethod = Literal["first_block", "teacache"]
CACHE_METHODS: tuple[str, ...] = ("first_block", "teacache")
"""The step-cache decision rules (see the module docstring)."""

TEACACHE_WAN_COEFFICIENTS: dict[tuple[int, int], tuple[float, ...]] = {
    (1536, 30): (-5.21862437e04, 9.23041404e03, -5.28275948e02, 1.36987616e01, -4.99875664e-02),
    (5120, 40): (-3.03318725e05, 4.90537029e04, -2.65530556e03, 5.87365115e01, -3.15583525e-01),
}
"""TeaCache4Wan2.1's fitted rescaling polynomials (ret_steps mode, T2V), highest power first, keyed by WAN's
``(hidden_size, num_layers)``: 1.3B and 14B."""

TEACACHE_WAN_WARMUP = 5
"""Calls that always run every block under ``teacache`` (TeaCache4Wan2.1's ret_steps)."""


def _threshold(_inst: object, _attr: attrs.Attribute[float], value: float) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    if not ok:
        raise ValueError(f"step cache threshold must be a finite number >= 0, got {value!r}")


def _method(_inst: object, _attr: attrs.Attribute[str], value: str) -> None:
    if value not in CACHE_METHODS:
        raise ValueError(f"step cache method must be one of {', '.join(CACHE_METHODS)}, got {value!r}")


def _warmup(_inst: object, _attr: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"step cache warmup must be None or an integer >= 1, got {value!r}")


def _coefficients(_inst: object, _attr: attrs.Attribute[object], value: tuple[float, ...] | None) -> None:
    if value is not None and (not value or not all(math.isfinite(c) for c in value)):
        raise ValueError(f"step cache coefficients must be None or finite numbers, got {value!r}")


@attrs.frozen(kw_only=True)
class StepCacheConfig:
    """Which decision rule a :class:`StepCache` applies, and how eagerly it reuses."""

    method: CacheMethod = attrs.field(validator=_method)
    """``first_block`` or ``teacache``."""
    threshold: float = attrs.field(validator=_threshold)
    """Reuse while the (accumulated, rescaled) relative L1 change stays under this; 0 never reuses. Larger is
    faster and drifts further from the dense result (First-Block Cache's default is 0.05)."""
    warmup: int | None = attrs.field(default=None, validator=_warmup)
    """Calls after a reset that always run every block; ``None``: 5 for ``teacache`` (TeaCache4Wan2.1), 1 for
    ``first_block`` (the first call has nothing to reuse)."""
    coefficients: tuple[float, ...] | None = attrs.field(
        default=None, converter=attrs.converters.optional(tuple), validator=_coefficients
    )
    """``teacache``'s rescaling polynomial, highest power first; ``None``: the published fit for WAN 2.1 1.3B or
    14B, the identity otherwise."""

    @property
    def warmup_calls(self) -> int:
        """:attr:`warmup` with its default filled in."""
        if self.warmup is not None:
            return self.warmup
        return TEACACHE_WAN_WARMUP if self.method == "teacache" else 1


@attrs.frozen(kw_only=True)
class StepCacheStats:
    """What a :class:`StepCache` did for one video; a row evaluation is one batch row of one network call."""

    calls: int
    """Network calls."""
    rows: int
    """Row evaluations (``calls`` times the batch, 2 per prompt under classifier-free guidance)."""
    reused: int
    """Row evaluations that reused the cached residual instead of running the (remaining) blocks."""
    skipped_calls: int
    """Calls in which every row reused (no block, or only the first, ran)."""


class _Trajectory(NamedTuple):
    """Per-row state of the video being sampled (leading dimension: the batch)."""

    reference: Tensor
    """``teacache``: the last call's probe; ``first_block``: the first block's residual when all blocks last ran."""
    accumulated: Tensor
    """``teacache``: the rescaled change accumulated since the blocks last ran; ``first_block``: the last change.
    ``[B]`` float64."""
    residual: Tensor
    """The float32 residual of the blocks (``teacache``: all; ``first_block``: all but the first) when they last
    ran."""


SumsReduce = Callable[[Tensor], Tensor]
"""Sums ``[B, 2]`` over the ranks holding the other parts of the sequence (an all-reduce over a context-parallel
group); returns the totals."""

_HOOKS = ("embed", "run_blocks")
"""The network methods a :class:`StepCache` replaces on the instance while installed."""


class StepCache:
    """Step caching for a WAN or DiT network (see the module docstring), installed on the network instance.

    While installed (:func:`step_caching`, or :meth:`install` / :meth:`remove`), the network's ``embed`` and
    ``run_blocks`` are this cache's: ``embed`` notes the timestep, ``run_blocks`` decides per batch row whether
    to run the blocks or add the cached residual. The network is still called as itself, so the samplers, and
    wrappers that drive its stages (context-parallel :class:`StagedForward`, classifier-free-guidance
    parallelism), are unchanged. A new video starts on :meth:`reset`, or by itself when a call's timestep is
    above the previous call's (samplers run ``t`` downwards) or the batch or video shape changes.

    Args:
        network: A network with ``embed``, ``run_blocks``, ``blocks``, ``project`` and ``unpatchify`` stages
            (:class:`~dfm.domain.networks.wan.WanTransformer`, :class:`~dfm.domain.networks.dit.DiT`).
        config: The decision rule.
        reduce: For ``first_block`` when ``run_blocks`` sees a sequence shard (context parallelism): sums the
            per-row L1 sums over the shards so that every rank takes the same decision. ``None``: the whole
            sequence is here (a sharded call is then refused rather than letting ranks decide differently).

    Raises:
        ValueError: A network without those stages.
    """

    def __init__(self, network: torch.nn.Module, config: StepCacheConfig, *, reduce: SumsReduce | None = None) -> None:
        missing = [s for s in ("embed", "run_blocks", "blocks", "project", "unpatchify") if not hasattr(network, s)]
        if missing:
            raise ValueError(
                "step caching needs a WAN or DiT network (stages embed, run_blocks, blocks, project, unpatchify); "
                f"{type(network).__name__} has no {', '.join(missing)}"
            )
        self.network = network
        self.config = config
        self.reduce = reduce
        self.coefficients = config.coefficients or _default_coefficients(network, config.method)
        self._embed = network.embed
        self._run_blocks = network.run_blocks
        self._saved: dict[str, object] | None = None
        self._videos: list[StepCacheStats] = []
        self._counts = [0, 0, 0, 0]  # calls, rows, reused, skipped calls of the current video
        self._trajectory: _Trajectory | None = None
        self._shape: tuple[int, ...] = ()
        self._timestep: list[float] = []

    def install(self) -> None:
        """Replace the network's ``embed`` and ``run_blocks`` by this cache's (on the instance)."""
        assert self._saved is None, "the step cache is already installed"
        self._saved = {name: self.network.__dict__.get(name) for name in _HOOKS}
        self._embed, self._run_blocks = self.network.embed, self.network.run_blocks
        self.network.embed = self.embed
        self.network.run_blocks = self.run_blocks

    def remove(self) -> None:
        """Give the network its own ``embed`` and ``run_blocks`` back."""
        assert self._saved is not None, "the step cache is not installed"
        for name, saved in self._saved.items():
            if saved is None:
                delattr(self.network, name)
            else:
                setattr(self.network, name, saved)
        self._saved = None

    def reset(self) -> None:
        """Drop the cached state: the next call starts a new video (its statistics go to :attr:`videos`)."""
        if self._counts[0]:
            self._videos.append(self._stats())
        self._counts = [0, 0, 0, 0]
        self._trajectory = None
        self._shape, self._timestep = (), []

    @property
    def videos(self) -> tuple[StepCacheStats, ...]:
        """What the cache did for each video so far (the current one last)."""
        return (*self._videos, self._stats()) if self._counts[0] else tuple(self._videos)

    def embed(
        self, x: Tensor, timestep: Tensor, text: Tensor, text_mask: Tensor | None = None, *conditions: Tensor | None
    ) -> WanInputs | DiTInputs:
        """The network's ``embed`` (``conditions``: what else it takes, e.g. WAN I2V's image features); a timestep
        above the previous call's (or a new shape) starts a new video."""
        t = timestep.detach().float().reshape(-1).tolist()
        shape = tuple(x.shape)
        if self._timestep and (shape != self._shape or any(a > b for a, b in zip(t, self._timestep, strict=False))):
            self.reset()
        self._shape, self._timestep = shape, t
        return self._embed(x, timestep, text, text_mask, *conditions)

    def run_blocks(self, tokens: Tensor, inputs: WanInputs | DiTInputs) -> Tensor:
        """The network's ``run_blocks``, with the blocks skipped in rows whose input barely changed.

        A packed sequence runs every block (no caching).

        Raises:
            ValueError: ``first_block`` on a sequence shard without ``reduce`` (ranks would decide differently).
        """
        if not isinstance(inputs, WanInputs | DiTInputs):
            return self._run_blocks(tokens, inputs)
        state = self._trajectory
        if state is not None and state.residual.shape != tokens.shape:
            self.reset()
        if self.config.method == "teacache":
            return self._teacache(tokens, inputs)
        if tokens.shape[1] != inputs.tokens.shape[1] and self.reduce is None:
            raise ValueError(
                "first_block step caching compares the first block's residual over the whole sequence, but this "
                "rank holds a shard of it (context parallelism) and no reduction over the shards was given; "
                "use teacache, whose decision needs only the timestep"
            )
        return self._first_block(tokens, inputs)

    def _stats(self) -> StepCacheStats:
        calls, rows, reused, skipped = self._counts
        return StepCacheStats(calls=calls, rows=rows, reused=reused, skipped_calls=skipped)

    def _teacache(self, tokens: Tensor, inputs: WanInputs | DiTInputs) -> Tensor:
        """TeaCache: reuse while the accumulated rescaled change of the modulated input is under the threshold."""
        probe = (inputs.modulation if isinstance(inputs, WanInputs) else inputs.temb).float()
        state = self._trajectory
        accumulated = torch.zeros(probe.shape[0], dtype=torch.float64, device=probe.device)
        if state is not None and not self._warming_up():
            accumulated = state.accumulated + polynomial(self.coefficients, relative_l1(probe, state.reference))
        reuse = self._decide(accumulated)
        if not bool(reuse.any()):  # every row runs: the network's own run_blocks, bit for bit
            out = self._run_blocks(tokens, inputs)
            residual = out.float() - tokens.float()
        else:
            out, residual = self._run(reuse, inputs, tokens, start=0)
        self._trajectory = _Trajectory(probe, torch.where(reuse, accumulated, 0.0), residual)
        return out

    def _first_block(self, tokens: Tensor, inputs: WanInputs | DiTInputs) -> Tensor:
        """First-Block Cache: reuse the other blocks' residual while the first block's residual barely changed."""
        first = self._blocks(tokens, inputs, 0, 1)
        first_residual = first.float() - tokens.float()
        state = self._trajectory
        change = torch.full((tokens.shape[0],), math.inf, dtype=torch.float64, device=tokens.device)
        if state is not None and not self._warming_up():
            change = relative_l1(first_residual, state.reference, self.reduce)
        reuse = self._decide(change)
        out, residual = self._run(reuse, inputs, first, start=1)
        reference = first_residual if state is None else _where_rows(reuse, state.reference, first_residual)
        self._trajectory = _Trajectory(reference, change, residual)
        return out

    def _warming_up(self) -> bool:
        """Whether this call is one of the first ``warmup`` of the video (they run every block)."""
        return self._counts[0] < self.config.warmup_calls

    def _decide(self, change: Tensor) -> Tensor:
        """Which rows reuse (``change < threshold``; none during warmup, at threshold 0, or before a residual
        exists); counts the call."""
        threshold = self.config.threshold
        if self._trajectory is None or threshold == 0 or self._warming_up():
            reuse = torch.zeros_like(change, dtype=torch.bool)
        else:
            reuse = change < threshold
        reused = int(reuse.sum())
        counts = self._counts
        counts[0] += 1
        counts[1] += reuse.numel()
        counts[2] += reused
        counts[3] += int(reused == reuse.numel())
        return reuse

    def _run(
        self, reuse: Tensor, inputs: WanInputs | DiTInputs, tokens: Tensor, *, start: int
    ) -> tuple[Tensor, Tensor]:
        """Blocks ``start..`` on ``tokens``: their output and float32 residual, the cached residual added where
        ``reuse``; the other rows run together as one smaller batch (the whole batch, unchanged, when all run)."""
        if not bool(reuse.any()):
            out = self._blocks(tokens, inputs, start)
            return out, out.float() - tokens.float()
        assert self._trajectory is not None  # reuse is only decided once a residual exists
        cached = self._trajectory.residual
        out = (tokens.float() + cached).type_as(tokens)
        if bool(reuse.all()):
            return out, cached
        run = (~reuse).nonzero().squeeze(1)
        fresh = self._blocks(tokens[run], _select_rows(inputs, run, tokens.shape[0]), start)
        residual = cached.index_copy(0, run, fresh.float() - tokens[run].float())
        return out.index_copy(0, run, fresh), residual

    def _blocks(self, tokens: Tensor, inputs: WanInputs | DiTInputs, start: int, stop: int | None = None) -> Tensor:
        """Blocks ``start..stop`` of the network on ``tokens``, each called as the network's ``run_blocks`` does."""
        for block in self.network.blocks[start:stop]:
            if isinstance(inputs, WanInputs):
                tokens = block(tokens, inputs.context, inputs.modulation, inputs.rope, inputs.mask)
            else:
                tokens = block(tokens, inputs.temb, inputs.context, inputs.rope, inputs.mask)
        return tokens


@contextlib.contextmanager
def step_caching(
    network: torch.nn.Module, config: StepCacheConfig | None, *, reduce: SumsReduce | None = None
) -> Iterator[StepCache | None]:
    """A :class:`StepCache` installed on ``network`` for the ``with`` block (``None`` and nothing for ``None``).

    Example::

        with step_caching(network, StepCacheConfig(method="first_block", threshold=0.05)) as cache:
            latents = [sample_latents(network, process, noise, ...) for noise in noises]
        cache.videos  # per video: calls, reused rows, calls that skipped the blocks
    """
    if config is None:
        yield None
        return
    cache = StepCache(network, config, reduce=reduce)
    cache.install()
    try:
        yield cache
    finally:
        cache.remove()


def relative_l1(x: Tensor, reference: Tensor, reduce: SumsReduce | None = None) -> Tensor:
    """Per row ``b``: ``sum|x_b - ref_b| / sum|ref_b|`` (= the ratio of the means), float64, ``inf`` where the
    reference is all zero; ``reduce`` totals the two sums ``[B, 2]`` over the shards of a split sequence."""
    dims = tuple(range(1, x.ndim))
    sums = torch.stack([(x.float() - reference.float()).abs().sum(dims), reference.float().abs().sum(dims)], 1)
    sums = sums.double() if reduce is None else reduce(sums.double())
    change, scale = sums.unbind(1)
    return torch.where(scale > 0, change / scale, math.inf)


def polynomial(coefficients: Sequence[float], x: Tensor) -> Tensor:
    """``c_0 x^n + c_1 x^(n-1) + ... + c_n`` (highest power first, as ``numpy.poly1d``) by Horner's rule."""
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + c
    return out


def _default_coefficients(network: torch.nn.Module, method: str) -> tuple[float, ...]:
    """TeaCache4Wan2.1's fit for a WAN 2.1 1.3B or 14B network; the identity ``f(x) = x`` otherwise."""
    spec = getattr(network, "spec", None)
    if method == "teacache" and isinstance(spec, WanSpec):
        return TEACACHE_WAN_COEFFICIENTS.get((spec.hidden_size, spec.num_layers), (1.0, 0.0))
    return (1.0, 0.0)


def _select_rows(inputs: WanInputs | DiTInputs, rows: Tensor, batch: int) -> WanInputs | DiTInputs:
    """``inputs`` of the given batch rows: every per-sample tensor indexed, RoPE tables and grid shared."""
    return type(inputs)(*(f[rows] if isinstance(f, Tensor) and f.shape[:1] == (batch,) else f for f in inputs))


def _where_rows(rows: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Row ``i`` of ``a`` where ``rows[i]``, else of ``b``."""
    return torch.where(rows.view(-1, *([1] * (a.ndim - 1))), a, b)
