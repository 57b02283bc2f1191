"""Packing plans and layouts (DESIGN.md, "packing"): first-fit-decreasing places every sample once
within capacity, deterministically; layouts, cu_seqlens and pack/unpack agree."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.domain.packing import (
    PackedLayout,
    bucket_by_shape,
    cu_seqlens,
    first_fit_decreasing,
    pack_tokens,
    pad_text,
    token_grid,
    unpack_tokens,
)

sizes_and_capacity = st.integers(1, 64).flatmap(
    lambda cap: st.tuples(st.lists(st.integers(1, cap), max_size=40), st.just(cap))
)
grids = st.lists(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(sizes_and_capacity)
def test_ffd_places_every_sample_once_within_capacity(case: tuple[list[int], int]) -> None:
    sizes, capacity = case
    bins = first_fit_decreasing(sizes, capacity)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(sizes)))
    assert all(b and sum(sizes[i] for i in b) <= capacity for b in bins)
    # first fit never leaves two bins that would fit into one, so fewer than 2 * sum / capacity + 1 bins
    assert len(bins) < 2 * sum(sizes) / capacity + 1


@settings(max_examples=200, deadline=None)
@given(sizes_and_capacity)
def test_ffd_is_deterministic_and_decreasing(case: tuple[list[int], int]) -> None:
    sizes, capacity = case
    bins = first_fit_decreasing(sizes, capacity)
    assert bins == first_fit_decreasing(list(sizes), capacity)
    for b in bins:  # within a bin, items in placement order: by size, then position
        keys = [(-sizes[i], i) for i in b]
        assert keys == sorted(keys)
    # the first bin's first item is the largest (ties: lowest position)
    if sizes:
        assert bins[0][0] == min(range(len(sizes)), key=lambda j: (-sizes[j], j))


@settings(max_examples=100, deadline=None)
@given(sizes_and_capacity)
def test_ffd_never_opens_a_bin_an_earlier_one_could_take(case: tuple[list[int], int]) -> None:
    """Replaying the placements: each item went to the first bin with room at that moment."""
    sizes, capacity = case
    bins = first_fit_decreasing(sizes, capacity)
    where = {i: b for b, items in enumerate(bins) for i in items}
    load = [0] * len(bins)
    for i in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        first = next(b for b in range(len(bins)) if load[b] + sizes[i] <= capacity or b == where[i])
        assert first == where[i]
        load[where[i]] += sizes[i]


def test_ffd_known_example_and_errors() -> None:
    assert first_fit_decreasing([4, 8, 1, 4, 2, 1], 10) == [[1, 4], [0, 3, 2, 5]]
    assert first_fit_decreasing([], 10) == []
    with pytest.raises(ValueError, match="does not fit"):
        first_fit_decreasing([3, 11], 10)
    with pytest.raises(ValueError, match="capacity"):
        first_fit_decreasing([1], 0)


def test_bucket_by_shape_groups_in_first_appearance_order() -> None:
    shapes = [(4, 2, 8, 8), (4, 1, 4, 4), (4, 2, 8, 8), (4, 1, 4, 4), (4, 3, 2, 2)]
    assert bucket_by_shape(shapes) == {(4, 2, 8, 8): [0, 2], (4, 1, 4, 4): [1, 3], (4, 3, 2, 2): [4]}


@settings(max_examples=100, deadline=None)
@given(grids)
def test_layout_offsets_and_cu_seqlens_agree(gs: list[tuple[int, int, int]]) -> None:
    layout = PackedLayout(grids=gs)
    lengths = [f * h * w for f, h, w in gs]
    assert layout.lengths == tuple(lengths)
    cu = layout.cu_seqlens()
    assert cu.dtype == torch.int32 and cu.shape == (len(gs) + 1,)
    assert cu.tolist() == list(layout.offsets) == [0, *torch.tensor(lengths).cumsum(0).tolist()]
    assert torch.equal(cu, cu_seqlens(lengths))
    assert layout.total_tokens == sum(lengths) and layout.max_seqlen == max(lengths)
    ids = layout.segment_ids()
    assert torch.equal(torch.bincount(ids, minlength=len(gs)), torch.tensor(lengths))
    mask = layout.block_mask()
    assert torch.equal(mask.sum(1), torch.tensor(lengths).repeat_interleave(torch.tensor(lengths)))
    assert layout.sample_order == tuple(range(len(gs)))


@settings(max_examples=100, deadline=None)
@given(grids, st.integers(1, 5))
def test_pack_unpack_round_trip(gs: list[tuple[int, int, int]], width: int) -> None:
    layout = PackedLayout(grids=gs)
    g = torch.Generator().manual_seed(0)
    tokens = [torch.randn(n, width, generator=g) for n in layout.lengths]
    packed = pack_tokens(tokens)
    assert packed.shape == (1, layout.total_tokens, width)
    back = unpack_tokens(packed, layout)
    assert all(torch.equal(a, b) for a, b in zip(back, tokens, strict=True))
    start, end = layout.offsets[-2], layout.offsets[-1]
    assert torch.equal(packed[0, start:end], tokens[-1])


def test_layout_from_shapes_and_errors() -> None:
    layout = PackedLayout.from_shapes([(4, 2, 8, 6), (4, 1, 2, 2)], (1, 2, 2), sample_order=[7, 3])
    assert layout.grids == ((2, 4, 3), (1, 1, 1)) and layout.sample_order == (7, 3)
    assert token_grid((4, 3, 4, 4), (1, 2, 2)) == (3, 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        token_grid((4, 1, 3, 4), (1, 2, 2))
    with pytest.raises(ValueError, match="at least one"):
        PackedLayout(grids=[])
    with pytest.raises(ValueError, match="sample_order"):
        PackedLayout(grids=[(1, 1, 1)], sample_order=[0, 1])
    with pytest.raises(ValueError, match="packed tokens"):
        unpack_tokens(torch.zeros(1, 5, 2), layout)


def test_pad_text_pads_and_masks() -> None:
    texts = [torch.ones(3, 2), 2 * torch.ones(1, 2)]
    text, mask = pad_text(texts)
    assert text.shape == (2, 3, 2)
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    assert torch.equal(text[1, 0], torch.full((2,), 2.0)) and not text[1, 1:].any()


@given(
    st.lists(st.integers(min_value=1, max_value=500), min_size=1, max_size=40),
    st.integers(min_value=1, max_value=6),
)
@settings(max_examples=100, deadline=None)
def test_balanced_packs_fill_every_pack_with_the_largest_items_within_one_item(sizes: list[int], per_bin: int) -> None:
    from dfm.domain.packing import balanced_packs

    if len(sizes) < per_bin:
        with pytest.raises(ValueError):
            balanced_packs(sizes, per_bin)
        return
    bins = balanced_packs(sizes, per_bin)
    n = len(sizes) // per_bin
    placed = [i for b in bins for i in b]
    assert len(bins) == n and all(len(b) == per_bin for b in bins) and len(set(placed)) == len(placed)
    kept = sorted(sizes[i] for i in placed)
    assert kept == sorted(sizes)[len(sizes) - n * per_bin :]  # the largest items are the ones packed
    assert bins == balanced_packs(sizes, per_bin)  # deterministic
    loads = [sum(sizes[i] for i in b) for b in bins]
    assert max(loads) - min(loads) <= max(sizes)  # balanced to within one item
