"""Multi-process sampling: classifier-free-guidance (CFG) parallel x context parallel over the video tokens.

Under ``torchrun`` every rank holds the whole network and the same inputs: the same noise (drawn from the
same seed) and the same text. A sampler's guided denoiser runs the network once per step on the doubled
batch ``[cond; uncond]`` (:func:`dfm.domain.samplers.guidance.guided`). A :class:`SamplingLayout` of
``cfg x context`` ranks splits that forward without touching the samplers:

- CFG parallel (``cfg = 2``): :class:`CfgParallel` runs the conditional half of the batch on one rank of
  a CFG group and the unconditional half on the other, then all-gathers the two outputs;
- context parallel (``context = c``): each rank of a context group runs the blocks on ``1/c`` of the
  video tokens (:class:`~dfm.adapters.torch_dist.staged.StagedForward`), self-attention seeing the whole
  sequence through Ulysses all-to-all over heads (:class:`~dfm.adapters.torch_dist.UlyssesAttention`),
  and the projected tokens are gathered.

An image-to-video network is called through
:class:`~dfm.domain.diffusion.image_condition.ImageConditioned` around the parallel model: the condition
channels join the full ``x`` before the CFG split, :class:`CfgParallel` hands each rank its samples' image
features, and context parallelism shards the tokens after the patch embedding (which reads ``x`` and the
condition channels together), every rank's cross-attention reading all the image tokens (as the text's).

Every rank thus ends each forward with the same full prediction (the gathers hand every rank the same
bytes), takes the same sampler step and finishes with the same latents, equal to one process's up to
float rounding. Ranks are numbered CFG-major, ``rank = cfg_index * context + context_index``: a context
group, which exchanges activations in every block, is a run of neighbouring ranks (one host's NVLink);
a CFG group exchanges only the prediction, once per forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from dfm.adapters.torch_dist.process_group import DistEnv, destroy, init_process_group
from dfm.adapters.torch_dist.sequence import gather_sequence, use_ulysses_attention
from dfm.adapters.torch_dist.staged import StagedForward
from dfm.domain.specs import ModelSpec

LAUNCH = "torchrun --nproc-per-node {n} -m dfm.app.generate ..."
"""How to launch ``n`` generation processes (filled in by the error messages)."""

MESH_DIMS = ("cfg", "context")
"""The sampling mesh's dimensions, outermost first."""


@attrs.frozen(kw_only=True)
class SamplingLayout:
    """How the processes of a generation job share each forward: ``cfg x context`` ranks."""

    cfg: int = attrs.field(default=1, validator=attrs.validators.in_((1, 2)))
    """2: the conditional and unconditional passes of classifier-free guidance run on different ranks."""
    context: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    """Ranks that split each video's tokens (Ulysses attention over heads)."""

    @property
    def world(self) -> int:
        """The number of processes the layout spans."""
        return self.cfg * self.context

    def __str__(self) -> str:
        return f"cfg {self.cfg} x context {self.context}"


def choose_layout(
    world: int,
    *,
    guidance: float,
    spec: ModelSpec,
    latent_shape: Sequence[int],
    cfg_parallel: bool | None = None,
    context: int | None = None,
) -> SamplingLayout:
    """The layout of ``world`` processes for sampling ``latent_shape`` with ``spec``, checked against the model.

    Automatic choice (``cfg_parallel`` and ``context`` ``None``): CFG parallel when guidance runs both passes
    (``guidance`` neither 1 nor 0) and ``world`` is even; every other factor is context parallel. Given
    ``context``, CFG parallel takes the factor left over (which must be 1, or 2 with guidance on). Given
    ``cfg_parallel``, the context size is what it leaves.

    Args:
        world: The number of processes launched (1 without ``torchrun``).
        guidance: The classifier-free guidance scale of the sampling.
        spec: The network's architecture (heads, patch size).
        latent_shape: One video's latent ``(C, F, H, W)``.
        cfg_parallel: ``True``/``False`` to force CFG parallelism on/off; ``None``: automatic.
        context: The context-parallel size; ``None``: automatic.

    Raises:
        ValueError: A layout the processes, the guidance or the model cannot take: a product other than
            ``world``, CFG parallel without guidance or on an odd count, a context size that does not divide
            the attention heads or the video tokens. The message names the options and what would fit.
    """
    both_passes = guidance not in (0.0, 1.0)
    if context is not None and context < 1:
        raise ValueError(f"--context-parallel must be an integer >= 1, got {context}")
    cfg = _cfg_size(world, guidance, both_passes, cfg_parallel, context)
    ctx = world // cfg if context is None else context
    layout = SamplingLayout(cfg=cfg, context=ctx)
    if layout.world != world:
        raise ValueError(
            f"the sampling layout {_options(cfg_parallel, context)} needs {layout.world} processes (CFG {cfg} x "
            f"context {ctx}), but {_launched(world)}; launch `{LAUNCH.format(n=layout.world)}`, or change the options"
        )
    if ctx > 1:
        _check_context(ctx, spec, latent_shape)
    return layout


def _cfg_size(world: int, guidance: float, both_passes: bool, cfg_parallel: bool | None, context: int | None) -> int:
    """The CFG-parallel size (1 or 2) that :func:`choose_layout` picks or is told."""
    one_pass = (
        f"--guidance {guidance:g} runs one pass per step ({'conditional' if guidance == 1 else 'unconditional'} "
        "only), so there is no second pass to run on another rank"
    )
    if cfg_parallel is True:
        if not both_passes:
            raise ValueError(
                f"--cfg-parallel runs the conditional and unconditional passes on two ranks, but {one_pass}"
            )
        if world % 2:
            raise ValueError(
                f"--cfg-parallel splits the processes into pairs, but {_launched(world)}; launch an even number "
                f"(`{LAUNCH.format(n=2 * world)}`) or drop --cfg-parallel"
            )
        return 2
    if cfg_parallel is False:
        return 1
    if context is None:
        return 2 if both_passes and world % 2 == 0 else 1
    if world % context:
        divisor = f"a divisor of {world} ({_divisors(world)})" if world > 1 else "no --context-parallel"
        raise ValueError(
            f"--context-parallel {context} needs a multiple of {context} processes, but {_launched(world)}; launch "
            f"`{LAUNCH.format(n=context)}` (twice that many with CFG parallel), or use {divisor}"
        )
    cfg = world // context
    if cfg > 2 or (cfg == 2 and not both_passes):
        why = one_pass if cfg == 2 else "CFG parallelism splits only the 2 passes of classifier-free guidance"
        fits = " or ".join(str(c) for c in (world, world // 2) if c == world or (both_passes and world % 2 == 0))
        raise ValueError(
            f"--context-parallel {context} on {world} processes leaves a factor of {cfg} for CFG parallelism, but "
            f"{why}; use --context-parallel {fits}"
        )
    return cfg


def _check_context(context: int, spec: ModelSpec, latent_shape: Sequence[int]) -> None:
    heads = spec.num_attention_heads
    if heads % context:
        raise ValueError(
            f"context parallelism over {context} ranks splits the model's {heads} attention heads (Ulysses), but "
            f"{heads} is not divisible by {context}; use --context-parallel with a divisor of {heads} "
            f"({_divisors(heads)}) and launch that many processes (times 2 with --cfg-parallel)"
        )
    tokens = video_tokens(latent_shape, spec.patch_size)
    if tokens % context:
        grid = "x".join(str(n // p) for n, p in zip(latent_shape[1:], spec.patch_size, strict=True))
        raise ValueError(
            f"context parallelism over {context} ranks splits each video's {tokens} tokens (latent grid {grid} after "
            f"patchifying), but {tokens} is not divisible by {context}; choose --frames/--height/--width whose token "
            f"count divides, or a --context-parallel among {_divisors(math.gcd(tokens, heads))}"
        )


def video_tokens(latent_shape: Sequence[int], patch_size: Sequence[int]) -> int:
    """The number of tokens of a latent ``(C, F, H, W)`` after patchifying with ``patch_size`` ``(pt, ph, pw)``."""
    return math.prod(n // p for n, p in zip(latent_shape[1:], patch_size, strict=True))


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def _launched(world: int) -> str:
    return "1 process was launched (no torchrun)" if world == 1 else f"{world} processes were launched"


def _options(cfg_parallel: bool | None, context: int | None) -> str:
    given = [] if cfg_parallel is None else ["--cfg-parallel" if cfg_parallel else "--no-cfg-parallel"]
    given += [] if context is None else [f"--context-parallel {context}"]
    return " ".join(given) or "(automatic)"


class CfgParallel(nn.Module):
    """The network on this rank's share of the batch; the shares' outputs all-gathered in rank order.

    The guided denoiser's batch is ``[cond; uncond]``, so over a CFG group of 2 the first rank runs the
    conditional pass and the second the unconditional one. Tensor arguments whose first dimension is the
    batch are split; others (a shared timestep, ``None``) are passed whole.

    Args:
        network: ``network(x, timestep, text, text_mask) -> prediction`` (possibly context parallel itself;
            with ``image=`` for an image-to-video network).
        group: The CFG process group.
    """

    def __init__(self, network: nn.Module, group: dist.ProcessGroup) -> None:
        super().__init__()
        self.network = network
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The prediction for the whole batch ``x`` ``[B, ...]``, this rank having computed ``B / size`` of it.

        ``image``: an image-to-video network's image features, ``k`` rows per sample (``[k B, R, d]``; first-last-
        frame models: ``k = 2``), split with their samples and passed on as ``image=``.

        Raises:
            ValueError: If the batch does not split evenly over the group, or ``image`` has no whole number of rows
                per sample.
        """
        batch = x.shape[0]
        if batch % self.size:
            raise ValueError(
                f"CFG parallelism splits each forward's batch over {self.size} ranks, but this batch has {batch} "
                "samples; it needs classifier-free guidance (the doubled batch [cond; uncond])"
            )
        n = batch // self.size

        def share(t: Any) -> Any:
            fits = isinstance(t, torch.Tensor) and t.ndim > 0 and t.shape[0] == batch
            return t.narrow(0, self.rank * n, n) if fits else t

        args = (share(x), share(timestep), share(text), share(text_mask))
        if image is None:
            out = self.network(*args)
        else:
            rows, rest = divmod(image.shape[0], batch)
            if rest or not rows:
                raise ValueError(f"image features of {image.shape[0]} rows do not divide among {batch} samples")
            out = self.network(*args, image=image.narrow(0, self.rank * n * rows, n * rows))
        return gather_sequence(out.contiguous(), 0, self.group)

    def __repr__(self) -> str:
        return f"CfgParallel(size={self.size}, network={type(self.network).__name__})"


def parallelize_for_sampling(network: nn.Module, layout: SamplingLayout, *, attention_backend: str) -> nn.Module:
    """``network`` run over the default process group in ``layout``. Collective: every rank calls it.

    Context parallelism changes ``network`` in place (its self-attention kernels become Ulysses kernels and
    its ``forward`` a :class:`StagedForward`); CFG parallelism wraps it in :class:`CfgParallel`.

    Args:
        network: A network with a ``parallel_plan`` and the ``embed``/``run_blocks``/``project``/``unpatchify``
            stages (WAN, DiT), on this rank's device.
        layout: The layout; its ``world`` must be the default group's size.
        attention_backend: The SDPA backend of the Ulysses kernels' inner attention.

    Raises:
        ValueError: If the network cannot be split over the sequence (no plan, no stages).
    """
    return _parallelize(network, layout, attention_backend)[0]


def _parallelize(
    network: nn.Module, layout: SamplingLayout, attention_backend: str
) -> tuple[nn.Module, dist.ProcessGroup | None]:
    """:func:`parallelize_for_sampling`, and the context-parallel group (``None`` without one)."""
    assert dist.get_world_size() == layout.world, f"{layout} needs {layout.world} ranks, not {dist.get_world_size()}"
    mesh = init_device_mesh(_device_of(network).type, (layout.cfg, layout.context), mesh_dim_names=MESH_DIMS)
    group = None
    if layout.context > 1:
        plan = getattr(network, "parallel_plan", None)
        stages = ("embed", "run_blocks", "project", "unpatchify")
        if plan is None or not all(hasattr(network, s) for s in stages):
            raise ValueError(
                f"{type(network).__name__} has no parallel plan or staged forward, so it cannot run context parallel; "
                "launch without --context-parallel (CFG parallelism alone, or one process)"
            )
        group = mesh["context"].get_group()
        use_ulysses_attention(network, plan, group, attention_backend)
        network.forward = StagedForward(network, cp_group=group, compute_dtype=None)
    model = CfgParallel(network, mesh["cfg"].get_group()) if layout.cfg > 1 else network
    return model, group


@attrs.frozen(kw_only=True)
class SamplingRanks:
    """The network to sample with on this rank, and whether this rank writes the results."""

    model: nn.Module
    """The (parallelized) network: call it as the network."""
    layout: SamplingLayout
    """How the ranks share each forward."""
    rank: int
    """This process's global rank."""
    context_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
    """Sums a tensor over the ranks that hold the other parts of the same sequence (a new tensor; the context
    group's all-reduce), for statistics a rank computes on its shard (e.g. a step cache's L1 norms);
    ``None`` without context parallelism (each rank holds whole sequences)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that decodes and writes."""
        return self.rank == 0


def use_local_device(env: DistEnv | None = None) -> None:
    """Make ``cuda:LOCAL_RANK`` the current CUDA device of a ``torchrun`` rank (nothing without one or CUDA).

    Call it before the network is built: the ``"auto"`` device then resolves to this rank's own GPU.
    """
    env = DistEnv.from_env() if env is None else env
    if env.launched and torch.cuda.is_available() and env.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(env.local_rank)


@contextlib.contextmanager
def sampling_ranks(network: nn.Module, layout: SamplingLayout, *, attention_backend: str) -> Iterator[SamplingRanks]:
    """Join the ranks of ``layout`` (starting the default process group if none exists) and parallelize.

    With ``layout.world == 1`` the network is used as it is, with no process group. A process group this
    function starts is destroyed on exit.

    Args:
        network: The network (see :func:`parallelize_for_sampling`), on this rank's device.
        layout: The layout from :func:`choose_layout`.
        attention_backend: The SDPA backend of the Ulysses kernels.

    Raises:
        ValueError: If the launch does not fit the layout, or the network sits on another rank's GPU.
    """
    if layout.world == 1:
        yield SamplingRanks(model=network, layout=layout, rank=0)
        return
    device = _device_of(network)
    env = DistEnv.from_env()
    if device.type == "cuda" and device.index != env.local_rank:
        raise ValueError(
            f"rank {env.rank} (LOCAL_RANK={env.local_rank}) holds the network on {device}: each rank needs its own "
            "GPU; set train.device=auto (the checkpoint's config names one device for every rank)"
        )
    started = not (dist.is_available() and dist.is_initialized())
    env = init_process_group(device, min_world_size=layout.world, env=env)
    try:
        if env.world_size != layout.world:
            raise ValueError(f"the layout {layout} needs {layout.world} processes, but {_launched(env.world_size)}")
        model, group = _parallelize(network, layout, attention_backend)
        total = None if group is None else _summing(group)
        yield SamplingRanks(model=model, layout=layout, rank=env.rank, context_sum=total)
    finally:
        if started:
            destroy()


def _summing(group: dist.ProcessGroup) -> Callable[[torch.Tensor], torch.Tensor]:
    def total(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    return total


def _device_of(network: nn.Module) -> torch.device:
    for p in network.parameters():
        return p.device
    return torch.device("cpu")
