"""Sequence packing: many samples of different latent shapes in one token sequence (DESIGN.md, "packing").

A packed sequence concatenates the tokens of ``N`` samples, ``[1, sum_i L_i, h]``; attention stays
inside each sample (the networks attend segment by segment; a varlen kernel is fed :attr:`PackedLayout.cu_seqlens`,
the cumulative lengths ``[0, L_0, L_0 + L_1, ...]`` flash-attention's varlen interface expects).
Which samples share a sequence is planned from token counts alone: :func:`bucket_by_shape` groups
samples of equal latent shape, :func:`first_fit_decreasing` fills bins of a token capacity (Johnson,
"Near-optimal bin packing algorithms", 1973). Every sample keeps its own ``sigma``, noise and text (see
:func:`dfm.domain.objective.packed_training_loss`).

Notation: ``N`` samples, ``L_i`` tokens of sample ``i`` (``F_i * H_i * W_i`` after patchifying), ``h``
features per token, ``S`` text tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch

Grid = tuple[int, int, int]
"""Token grid ``(F, H, W)`` of one sample after patchifying."""

__all__ = [
    "Grid",
    "PackedLayout",
    "balanced_packs",
    "bucket_by_shape",
    "cu_seqlens",
    "first_fit_decreasing",
    "pack_tokens",
    "pad_text",
    "token_grid",
    "unpack_tokens",
]


def token_grid(latent_shape: Sequence[int], patch: Grid) -> Grid:
    """Token grid of one latent ``[C, F, H, W]`` (or ``[F, H, W]``) cut into ``patch`` patches.

    Raises:
        ValueError: If a size is not divisible by its patch size.
    """
    sizes = tuple(int(n) for n in latent_shape[-3:])
    if len(sizes) != 3 or any(n <= 0 or n % p for n, p in zip(sizes, patch, strict=True)):
        raise ValueError(f"latent shape {tuple(latent_shape)} is not divisible by patch {tuple(patch)}")
    f, h, w = (n // p for n, p in zip(sizes, patch, strict=True))
    return f, h, w


def bucket_by_shape(shapes: Sequence[Sequence[int]]) -> dict[tuple[int, ...], list[int]]:
    """Group sample positions by latent shape.

    Args:
        shapes: One latent shape per sample.

    Returns:
        ``{shape: [positions]}``; buckets in order of first appearance, positions ascending.
    """
    buckets: dict[tuple[int, ...], list[int]] = {}
    for position, shape in enumerate(shapes):
        buckets.setdefault(tuple(int(n) for n in shape), []).append(position)
    return buckets


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of item sizes (token counts) into bins of ``capacity`` tokens.

    Items are taken largest first (ties by position, so the result is a function of ``sizes`` alone);
    each goes into the first open bin it fits, or opens a new bin. FFD uses at most
    ``11/9 OPT + 6/9`` bins (Dósa, 2007).

    Args:
        sizes: Positive item sizes.
        capacity: Bin capacity, at least the largest size.

    Returns:
        Bins as lists of item positions, in placement order (each bin's items by decreasing size).

    Raises:
        ValueError: If ``capacity`` or a size is not positive, or an item exceeds ``capacity``.
    """
    if capacity <= 0:
        raise ValueError(f"packing capacity must be positive, got {capacity}")
    bad = [(i, s) for i, s in enumerate(sizes) if not 0 < s <= capacity]
    if bad:
        i, s = bad[0]
        raise ValueError(
            f"sample {i} has {s} tokens, which does not fit a pack of {capacity} tokens; "
            "raise the packing capacity or drop samples that large"
        )
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        slot = next((b for b, free in enumerate(room) if sizes[i] <= free), len(bins))
        if slot == len(bins):
            bins.append([])
            room.append(capacity)
        bins[slot].append(i)
        room[slot] -= sizes[i]
    return bins


def balanced_packs(sizes: Sequence[int], per_pack: int) -> list[list[int]]:
    """Packs of exactly ``per_pack`` items with balanced token totals (largest first, worst-fit decreasing).

    The packs a data loader feeds as micro-batches must hold the same number of samples, so the packs'
    number is fixed (``n = len(sizes) // per_pack``) and only their balance is chosen: items are taken
    largest first (ties by position), each into the least-loaded pack with a free slot (Graham's LPT rule
    with a cardinality limit). :func:`first_fit_decreasing` is the packer for a token budget instead,
    when the number of packs may vary. Items beyond ``n * per_pack`` (the smallest, then the latest) are
    left out.

    Args:
        sizes: Positive item sizes (token counts).
        per_pack: Items per pack (>= 1).

    Returns:
        ``n`` packs as lists of item positions, in placement order.

    Raises:
        ValueError: If ``per_pack`` or a size is not positive, or fewer than ``per_pack`` items are given.
    """
    if per_pack < 1 or any(s <= 0 for s in sizes) or len(sizes) < per_pack:
        raise ValueError(f"need >= {per_pack} positive sizes and per_pack >= 1, got {list(sizes)} and {per_pack}")
    n = len(sizes) // per_pack
    order = sorted(range(len(sizes)), key=lambda j: (-sizes[j], j))[: n * per_pack]
    packs: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in order:
        p = min((p for p in range(n) if len(packs[p]) < per_pack), key=lambda k: (load[k], k))
        packs[p].append(i)
        load[p] += sizes[i]
    return packs


def cu_seqlens(lengths: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Cumulative sequence lengths ``[0, L_0, L_0 + L_1, ..., sum L]`` as int32 ``[N + 1]`` (flash-attention varlen)."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + int(n))
    return torch.tensor(offsets, dtype=torch.int32, device=device)


@attrs.frozen(kw_only=True)
class PackedLayout:
    """Where each sample's tokens lie in one packed sequence.

    Attributes:
        grids: Per-sample token grids ``(F_i, H_i, W_i)``, in packed order.
        sample_order: Per packed slot, the sample it holds (e.g. the position in the source list, or
            the global sample index); ``range(N)`` by default.
    """

    grids: tuple[Grid, ...] = attrs.field(converter=lambda gs: tuple(tuple(int(n) for n in g) for g in gs))
    sample_order: tuple[int, ...] = attrs.field(converter=lambda xs: tuple(int(x) for x in xs))

    @sample_order.default
    def _default_order(self) -> tuple[int, ...]:
        return tuple(range(len(self.grids)))

    def __attrs_post_init__(self) -> None:
        if not self.grids:
            raise ValueError("a packed sequence needs at least one sample")
        if any(len(g) != 3 or min(g) <= 0 for g in self.grids):
            raise ValueError(f"token grids must be positive (F, H, W), got {self.grids}")
        if len(self.sample_order) != len(self.grids):
            raise ValueError(f"sample_order has {len(self.sample_order)} entries for {len(self.grids)} grids")

    @classmethod
    def from_shapes(
        cls, latent_shapes: Sequence[Sequence[int]], patch: Grid, sample_order: Sequence[int] | None = None
    ) -> PackedLayout:
        """The layout of latents ``[C, F_i, H_i, W_i]`` patchified with ``patch``."""
        grids = tuple(token_grid(s, patch) for s in latent_shapes)
        return cls(grids=grids) if sample_order is None else cls(grids=grids, sample_order=sample_order)

    @property
    def num_samples(self) -> int:
        """``N``."""
        return len(self.grids)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Tokens per sample ``L_i = F_i H_i W_i``."""
        return tuple(math.prod(g) for g in self.grids)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Token offsets ``[0, L_0, L_0 + L_1, ..., sum L]`` (``N + 1`` entries)."""
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        """``sum_i L_i``."""
        return self.offsets[-1]

    @property
    def max_seqlen(self) -> int:
        """``max_i L_i`` (flash-attention varlen's ``max_seqlen``)."""
        return max(self.lengths)

    def cu_seqlens(self, device: torch.device | str | None = None) -> torch.Tensor:
        """:attr:`offsets` as int32 ``[N + 1]``, as flash-attention's varlen kernels expect."""
        return cu_seqlens(self.lengths, device)

    def segment_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The packed slot of every token, int64 ``[sum L]``."""
        lengths = torch.tensor(self.lengths, device=device)
        return torch.repeat_interleave(torch.arange(self.num_samples, device=device), lengths)

    def block_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Block-diagonal self-attention mask ``[sum L, sum L]`` bool: ``True`` where both tokens share a sample."""
        ids = self.segment_ids(device)
        return ids[:, None] == ids[None, :]


def pack_tokens(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-sample tokens ``[L_i, ...]`` into one packed sequence ``[1, sum L_i, ...]``."""
    if not tokens:
        raise ValueError("nothing to pack: no samples")
    return torch.cat(list(tokens), dim=0).unsqueeze(0)


def unpack_tokens(packed: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
    """Split packed ``[1, sum L_i, ...]`` into per-sample views ``[L_i, ...]``; undoes :func:`pack_tokens`."""
    if packed.shape[:2] != (1, layout.total_tokens):
        raise ValueError(f"packed tokens must be [1, {layout.total_tokens}, ...], got {tuple(packed.shape)}")
    return list(packed[0].split(list(layout.lengths), dim=0))


def pad_text(texts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad per-sample text embeddings ``[S_i, D]`` to ``[N, max S_i, D]`` with zeros, and their mask ``[N, max S_i]``.

    Returns:
        ``(text, text_mask)``, ``text_mask`` ``True`` for real tokens.
    """
    if not texts:
        raise ValueError("nothing to pad: no samples")
    width = max(t.shape[0] for t in texts)
    text = texts[0].new_zeros((len(texts), width, texts[0].shape[-1]))
    mask = torch.zeros((len(texts), width), dtype=torch.bool, device=texts[0].device)
    for i, t in enumerate(texts):
        text[i, : t.shape[0]] = t
        mask[i, : t.shape[0]] = True
    return text, mask
