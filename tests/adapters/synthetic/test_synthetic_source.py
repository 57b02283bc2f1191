"""Synthetic and mock data sources: the sample -> rank -> micro-batch mapping, split invariance, resume."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.adapters.synthetic.codecs import HashTextEncoder, IdentityPixelCodec
from dfm.adapters.synthetic.source import MockLatentSource, SyntheticVideoSource
from dfm.adapters.synthetic.videos import describe, render_batch
from dfm.domain.batch import Batch, BatchLayout
from dfm.ports.data import DataSource

G = 8  # global batch size of the layout tests

Factory = Callable[..., SyntheticVideoSource | MockLatentSource]


def synthetic(**kw: Any) -> SyntheticVideoSource:
    args: dict[str, Any] = dict(frames=5, height=16, width=16, text_len=12, global_batch_size=G, micro_batch_size=2)
    args.update(seed=3, background=True)
    return SyntheticVideoSource(**{**args, **kw})


def mock(**kw: Any) -> MockLatentSource:
    args: dict[str, Any] = dict(latent_shape=(4, 3, 6, 10), text_len=7, text_dim=5, global_batch_size=G)
    args.update(micro_batch_size=2, seed=3)
    return MockLatentSource(**{**args, **kw})


SOURCES = pytest.mark.parametrize("make", [synthetic, mock], ids=["synthetic", "mock"])


def _by_index(batches: list[Batch]) -> dict[int, tuple[torch.Tensor, ...]]:
    out: dict[int, tuple[torch.Tensor, ...]] = {}
    for b in batches:
        for row, index in enumerate(b.sample_index.tolist()):
            assert index not in out, f"sample {index} twice"
            mask = b.text_mask[row] if b.text_mask is not None else torch.empty(0)
            out[index] = (b.latents[row], b.text[row], mask)
    return out


def _same(a: Batch, b: Batch) -> bool:
    return (
        torch.equal(a.sample_index, b.sample_index)
        and torch.equal(a.latents, b.latents)
        and torch.equal(a.text, b.text)
        and a.captions == b.captions
    )


# --- the mapping ----------------------------------------------------------------------------------


def test_mapping_example() -> None:
    two = BatchLayout(global_batch_size=8, micro_batch_size=2, world=2)
    assert two.sample_indices(1, rank=0) == [[8, 9], [10, 11]]
    assert two.sample_indices(1, rank=1) == [[12, 13], [14, 15]]
    assert BatchLayout(global_batch_size=6, micro_batch_size=3).sample_indices(0) == [[0, 1, 2], [3, 4, 5]]


@settings(max_examples=60, deadline=None)
@given(
    step=st.integers(0, 1000),
    micro=st.integers(1, 4),
    world=st.sampled_from([1, 2, 3, 4, 8]),
    per_rank=st.integers(1, 3),
)
def test_ranks_partition_the_global_batch(step: int, micro: int, world: int, per_rank: int) -> None:
    g = micro * world * per_rank
    seen = [
        i
        for rank in range(world)
        for mb in BatchLayout(global_batch_size=g, micro_batch_size=micro, world=world).sample_indices(step, rank)
        for i in mb
    ]
    assert sorted(seen) == list(range(step * g, (step + 1) * g))
    assert len(seen) == len(set(seen))


def test_layout_errors_name_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"global_batch_size=8 is not divisible by .* = 3 \* 2 = 6"):
        BatchLayout(global_batch_size=8, micro_batch_size=3, world=2)
    with pytest.raises(ValueError, match="rank=2, world=2"):
        BatchLayout(global_batch_size=8, micro_batch_size=1, world=2).check_rank(2)
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        BatchLayout(global_batch_size=8, micro_batch_size=0)
    with pytest.raises(ValueError, match="not divisible"):
        synthetic(micro_batch_size=3)
    with pytest.raises(ValueError, match="step must be non-negative"):
        BatchLayout(global_batch_size=8, micro_batch_size=1).sample_indices(-1)


# --- split invariance -----------------------------------------------------------------------------


@SOURCES
def test_same_global_batch_under_any_split(make: Factory) -> None:
    step = 3
    reference = _by_index(make(micro_batch_size=8).batches_for_step(step))
    assert sorted(reference) == list(range(step * G, (step + 1) * G))
    for world, micro in ((1, 1), (2, 2), (2, 4), (4, 1), (4, 2), (8, 1)):
        batches = [
            b for r in range(world) for b in make(world=world, rank=r, micro_batch_size=micro).batches_for_step(step)
        ]
        assert all(b.size == micro for b in batches)
        got = _by_index(batches)
        assert got.keys() == reference.keys()
        for index, tensors in reference.items():
            assert all(torch.equal(x, y) for x, y in zip(tensors, got[index], strict=True)), (world, micro, index)


@SOURCES
def test_sample_content_depends_on_seed_and_index_only(make: Factory) -> None:
    source = make()
    one = source.batch_for_indices([21])
    many = source.batch_for_indices([20, 21, 22])
    assert torch.equal(one.latents[0], many.latents[1]) and torch.equal(one.text[0], many.text[1])
    other = make(seed=4).batch_for_indices([21])
    assert not torch.equal(one.latents, other.latents)


# --- iteration and resume -------------------------------------------------------------------------


@SOURCES
def test_iteration_walks_the_steps_in_order(make: Factory) -> None:
    source = make(world=2, rank=1)
    assert isinstance(source, DataSource)
    expected = source.batches_for_step(0) + source.batches_for_step(1)
    got = [next(source) for _ in expected]
    assert all(_same(a, b) for a, b in zip(got, expected, strict=True))
    assert [b.sample_index.tolist() for b in got] == [[4, 5], [6, 7], [12, 13], [14, 15]]
    assert source.state_dict()["next_step"] == 2


@SOURCES
@pytest.mark.parametrize("consumed", [0, 1, 4, 5])
def test_resume_continues_exactly(make: Factory, consumed: int) -> None:
    original = make()
    it = iter(original)
    for _ in range(consumed):
        next(it)
    state = json.loads(json.dumps(original.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for _ in range(5):
        assert _same(next(resumed), next(it))


@SOURCES
def test_resume_between_steps_under_another_world(make: Factory) -> None:
    original = make(micro_batch_size=4)
    for _ in range(2 * 2):  # two steps of two micro-batches
        next(original)
    state = json.loads(json.dumps(original.state_dict()))
    expected = _by_index([next(original), next(original)])
    batches = []
    for rank in range(4):
        resumed = make(world=4, rank=rank, micro_batch_size=1)
        resumed.load_state_dict(state)
        batches += [next(resumed) for _ in range(resumed.micro_batches_per_step)]
    got = _by_index(batches)
    assert got.keys() == expected.keys() == set(range(2 * G, 3 * G))
    assert all(torch.equal(got[i][0], expected[i][0]) for i in got)


@SOURCES
def test_start_step(make: Factory) -> None:
    assert _same(next(make(start_step=5)), make().batches_for_step(5)[0])


@SOURCES
def test_bad_states_are_refused(make: Factory) -> None:
    source = make()
    next(source)  # mid-step: next_micro == 1
    state = source.state_dict()
    with pytest.raises(ValueError, match="seed"):
        make(seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        make(global_batch_size=16).load_state_dict(state)
    with pytest.raises(ValueError, match="middle of step 0"):
        make(world=2).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks keys"):
        make().load_state_dict({"next_step": 1})
    other = mock if make is synthetic else synthetic
    with pytest.raises(ValueError, match="source"):
        other().load_state_dict(state)


# --- synthetic specifics --------------------------------------------------------------------------


def test_synthetic_batch_contents() -> None:
    source = synthetic(frames=9, height=32, width=24, text_len=16, text_dim=32)
    batch = source.batches_for_step(2)[1]
    indices = [18, 19]
    specs = [describe(i, 3, background=True) for i in indices]
    assert batch.sample_index.tolist() == indices and batch.sample_index.dtype == torch.int64
    assert batch.captions == tuple(s.caption for s in specs)
    assert torch.equal(batch.latents, render_batch(specs, 9, 32, 24))
    assert batch.latents.shape == (2, 3, 9, 32, 24)
    text, mask = HashTextEncoder(dim=32).encode(list(batch.captions), 16)
    assert torch.equal(batch.text, text) and torch.equal(batch.text_mask, mask)


def test_synthetic_uses_the_given_codec_and_encoder() -> None:
    class HalfCodec(IdentityPixelCodec):
        def encode(self, pixels: torch.Tensor) -> torch.Tensor:
            return pixels[:, :, :, ::2, ::2]

    source = synthetic(codec=HalfCodec(), text_encoder=HashTextEncoder(dim=8))
    batch = next(source)
    assert batch.latents.shape == (2, 3, 5, 8, 8) and batch.text.shape == (2, 12, 8)
    with pytest.raises(ValueError, match="text_dim=16 differs"):
        synthetic(text_encoder=HashTextEncoder(dim=8), text_dim=16)
    with pytest.raises(ValueError, match="text_len"):
        synthetic(text_len=0)


# --- mock specifics -------------------------------------------------------------------------------


def test_mock_shapes() -> None:
    batch = next(mock(latent_shape=(16, 2, 6, 10), text_len=9, text_dim=11))
    assert batch.latents.shape == (2, 16, 2, 6, 10) and batch.text.shape == (2, 9, 11)
    assert batch.text_mask is not None and batch.text_mask.all() and batch.captions is None
    assert 0.5 < batch.latents.std().item() < 1.5
    with pytest.raises(ValueError, match="latent_shape"):
        mock(latent_shape=(4, 3, 6))
    with pytest.raises(ValueError, match="latent_shape"):
        mock(latent_shape=(4, 0, 6, 6))


def test_mock_draws_the_next_batch_ahead_and_a_jump_discards_it() -> None:
    source = mock()
    first = next(source)
    assert source._ahead is not None and source._ahead[0] == [2, 3]  # the next micro-batch, being drawn
    assert _same(next(source), source.batch_for_indices([2, 3]))
    source.load_state_dict({**source.state_dict(), "next_step": 5, "next_micro": 0})  # e.g. a resume
    jumped = next(source)
    assert jumped.sample_index.tolist() == [40, 41] and _same(jumped, source.batch_for_indices([40, 41]))
    assert not _same(first, jumped)
