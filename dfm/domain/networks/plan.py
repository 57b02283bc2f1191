"""The parallel plan a network declares beside its architecture (DESIGN.md rule 4).

A network never parallelizes itself. It states, as data, what a runtime needs to know: which
linears split their output (column-parallel) or their input (row-parallel) over tensor-parallel
ranks, which modules stay whole on every rank, which module list holds the repeated blocks (the
unit of FSDP wrapping, activation checkpointing and pipeline stages), which attention modules may
shard their sequence over context-parallel ranks, and which norms normalise across all heads (and
so need a cross-rank reduction when heads are split), and which linears read the text rather than the
video tokens. Runtime adapters apply the plan with their
engine's own machinery.
"""

from __future__ import annotations

import fnmatch

import attrs
from torch import Tensor, nn


@attrs.frozen(kw_only=True)
class ParallelPlan:
    """Where a network may be split. Patterns are ``fnmatch`` globs over ``named_modules`` names.

    Attributes:
        blocks: Dotted name of the ``nn.ModuleList`` of repeated transformer blocks.
        column_parallel: Linears whose output features split over tensor-parallel ranks.
        row_parallel: Linears whose input features split over tensor-parallel ranks (output reduced).
        replicated: Modules (and all their linears) kept whole on every tensor-parallel rank.
        sequence_parallel_attention: Self-attention modules whose sequence may be sharded over
            context-parallel ranks (their attention kernel is swapped for a sequence-parallel one).
        head_norms: Norms over the concatenation of all heads (e.g. WAN's q/k RMSNorm): under tensor
            parallelism their statistics must be reduced over the tensor-parallel group.
        first_stage: Modules (or parameters) used before the blocks (``embed``): a pipeline's first stage
            holds them.
        last_stage: Modules (or parameters) used after the blocks (``project``): the last stage holds them.
        text_linears: Tensor-parallel linears whose input is the conditioning text rather than the video
            tokens (cross-attention keys and values): a runtime that shards the tokens over the sequence
            between blocks (Megatron's sequence parallelism) must not gather their input.
        no_weight_decay: Parameters never decayed whatever their rank, as globs over the end of their names
            (so engine prefixes do not matter): learned offsets such as WAN's adaLN ``scale_shift_table`` s,
            which act like biases (shrinking them would bias the conditioning). 1-D parameters (biases,
            norm scales) are never decayed anyway (:meth:`decays`).
    """

    blocks: str
    column_parallel: tuple[str, ...] = ()
    row_parallel: tuple[str, ...] = ()
    replicated: tuple[str, ...] = ()
    sequence_parallel_attention: tuple[str, ...] = ()
    head_norms: tuple[str, ...] = ()
    first_stage: tuple[str, ...] = ()
    last_stage: tuple[str, ...] = ()
    text_linears: tuple[str, ...] = ()
    no_weight_decay: tuple[str, ...] = ()

    def decays(self, name: str, param: Tensor) -> bool:
        """Whether the parameter ``name`` gets weight decay: matrices and kernels (``ndim >= 2``) not named in
        :attr:`no_weight_decay`."""
        return param.ndim >= 2 and not any(_matches(name, (p, f"*.{p}")) for p in self.no_weight_decay)

    def linear_role(self, name: str) -> str | None:
        """``"column"``, ``"row"``, ``"replicated"`` or ``None`` for the module named ``name``."""
        if _matches(name, self.column_parallel):
            return "column"
        if _matches(name, self.row_parallel):
            return "row"
        if _matches(name, self.replicated) or any(name.startswith(p + ".") for p in self.replicated):
            return "replicated"
        return None

    def unassigned_linears(self, model: nn.Module) -> list[str]:
        """Names of the ``nn.Linear`` modules of ``model`` that the plan does not name."""
        return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and self.linear_role(n) is None]

    def modules_matching(self, model: nn.Module, patterns: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
        """The ``(name, module)`` pairs of ``model`` whose names match one of ``patterns``."""
        return [(n, m) for n, m in model.named_modules() if _matches(n, patterns)]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
