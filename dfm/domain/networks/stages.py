"""The stage protocol of dfm's networks, and what travels between pipeline stages.

A :class:`StagedNetwork` (WAN 2.1, DiT) computes ``forward(x, timestep, text, text_mask)`` as four stages:
:meth:`~StagedNetwork.embed` (patch embedding, conditioning, RoPE tables, text mask) ->
:meth:`~StagedNetwork.run_blocks` -> :meth:`~StagedNetwork.project` (every parameterised op after the blocks,
token by token) -> :meth:`~StagedNetwork.unpatchify`. Parallel engines run these stages apart: context
parallelism splits the tokens between ``embed`` and ``project``; a pipeline hands the blocks' tokens and the
conditioning they read from one stage to the next as a :class:`StageCarry`, whose fields the network declares
in :attr:`~StagedNetwork.carried` (their rows along the sequence), while positions (RoPE, mask, grid) carry no
gradient and are rebuilt from the batch on every stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs
import torch

TEXT_ROWS = None
"""The row count of a carried field as long as the text (``S`` tokens)."""


@runtime_checkable
class StagedNetwork(Protocol):
    """A network computed as embed -> blocks -> project -> unpatchify (see the module docstring)."""

    inputs_type: ClassVar[type]
    """The ``NamedTuple`` :meth:`embed` returns: ``tokens``, ``rope``, ``mask``, ``grid`` and the carried fields."""
    carried: ClassVar[tuple[tuple[str, int | None], ...]]
    """The fields of :attr:`inputs_type` a pipeline stage hands on besides the tokens, with their rows
    (``None``: the text length); each is ``[B, rows, h]``, or ``[B, h]`` when its rows are 1."""

    def embed(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> Any:
        """Everything before the blocks, as :attr:`inputs_type`."""
        ...

    def run_blocks(self, tokens: torch.Tensor, inputs: Any) -> torch.Tensor:
        """Every block on ``tokens`` (a sequence shard matching ``inputs.rope`` under context parallelism)."""
        ...

    def project(self, tokens: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """Every parameterised op after the blocks, token by token: ``[B, L, h] -> [B, L, patch values]``."""
        ...

    def unpatchify(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Fold all tokens' patches into ``[B, C, F, H, W]``."""
        ...


@attrs.frozen(kw_only=True, eq=False)
class StageCarry:
    """What one pipeline stage hands to the next: the blocks' tokens and the conditioning they read.

    Attributes:
        tokens: ``[B, L, h]`` (this rank's share of the sequence under context or sequence parallelism).
        fields: The network's :attr:`~StagedNetwork.carried` fields by name, in their declared order.
    """

    tokens: torch.Tensor
    fields: Mapping[str, torch.Tensor]

    @classmethod
    def of(cls, network: StagedNetwork, tokens: torch.Tensor, inputs: Any) -> StageCarry:
        """The carry of ``tokens`` and the carried fields of ``inputs`` (an :attr:`~StagedNetwork.inputs_type`)."""
        return cls(tokens=tokens, fields={name: getattr(inputs, name) for name, _ in network.carried})

    def pack(self) -> torch.Tensor:
        """One tensor ``[B, L + rows..., h]`` in the tokens' dtype (an engine's point-to-point transfer sends one)."""
        parts = [self.tokens] + [
            (v.unsqueeze(1) if v.ndim == 2 else v).to(self.tokens.dtype) for v in self.fields.values()
        ]
        return torch.cat(parts, dim=1)

    @classmethod
    def unpack(cls, network: StagedNetwork, packed: torch.Tensor, length: int, text_len: int) -> StageCarry:
        """The carry :meth:`pack` made, given the tokens' ``length`` and the text's ``text_len``.

        Raises:
            ValueError: If ``packed`` does not hold ``length`` tokens and the declared fields.
        """
        rows = [text_len if r is TEXT_ROWS else r for _, r in network.carried]
        if packed.shape[1] != length + sum(rows):
            raise ValueError(
                f"a pipeline stage received {packed.shape[1]} rows, expected {length} tokens + {rows} carried rows"
            )
        pieces = packed.split([length, *rows], dim=1)
        fields = {
            name: piece.squeeze(1) if r == 1 else piece
            for (name, r), piece in zip(network.carried, pieces[1:], strict=True)
        }
        return cls(tokens=pieces[0], fields=fields)

    def inputs(self, network: StagedNetwork, positions: Sequence[Any]) -> Any:
        """The blocks' inputs (:attr:`~StagedNetwork.inputs_type`) from the carry and ``(rope, mask, grid)``; a field
        neither carried nor a position keeps its default (WAN's ``image``: pipelines run text-to-video models)."""
        rope, mask, grid = positions
        known = {"tokens": self.tokens, "rope": rope, "mask": mask, "grid": grid, **self.fields}
        return network.inputs_type(**{name: known[name] for name in network.inputs_type._fields if name in known})
