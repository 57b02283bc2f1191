"""The ``DataSource`` contract, on every source: the batch layout, disjoint ranks, exact resume from a checkpoint.

Each source (``synthetic``, ``mock``, ``energon``, ``hf_datasets``) is built with the same layout: a global
batch of ``G = 8`` samples in micro-batches of ``m = 2`` over ``W`` data-parallel ranks. What every source
must do (what the training service relies on):

- micro-batch ``j`` of rank ``r`` at step ``k`` holds ``m`` samples with global indices in ``[k G + r G / W,
  k G + (r + 1) G / W)`` (:class:`~dfm.domain.batch.BatchLayout`), so the ranks' samples are disjoint and cover
  each global batch;
- the state a checkpoint keeps (:func:`~dfm.app.services.training.checkpoint_data_state` of every rank's JSON
  state) resumes each rank exactly where it stopped, mid-step, mid-epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.shards import make_samples, write_prepared

from dfm.adapters.energon import EnergonSource
from dfm.adapters.hf_datasets import HFDatasetSource, webdataset_to_hf
from dfm.adapters.synthetic.source import MockLatentSource, SyntheticVideoSource
from dfm.app.services.training import checkpoint_data_state
from dfm.domain.batch import Batch
from dfm.ports.data import DataSource

pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
G, M, TEXT_DIM, TEXT_LEN = 8, 2, 8, 7
Make = Callable[..., DataSource]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = make_samples(24, latent_shapes=((4, 2, 4, 6),), text_dim=TEXT_DIM, max_text_len=6)
    return write_prepared(tmp_path_factory.mktemp("contract") / "shards", samples)


@pytest.fixture(scope="module")
def hf(shards: Path) -> Path:
    webdataset_to_hf(shards, shards.parent / "hf")
    return shards.parent / "hf"


@pytest.fixture(params=["synthetic", "mock", "energon", "hf_datasets"])
def make(request: pytest.FixtureRequest) -> Make:
    layout = {"global_batch_size": G, "micro_batch_size": M, "seed": 3}
    if request.param == "synthetic":
        return lambda **kw: SyntheticVideoSource(frames=5, height=16, width=16, text_len=TEXT_LEN, **layout, **kw)
    if request.param == "mock":
        return lambda **kw: MockLatentSource(
            latent_shape=(4, 2, 4, 6), text_len=TEXT_LEN, text_dim=TEXT_DIM, **layout, **kw
        )
    text = {"text_len": TEXT_LEN, "text_dim": TEXT_DIM}
    if request.param == "energon":
        path = request.getfixturevalue("shards")
        return lambda **kw: EnergonSource(path, **layout, **text, num_workers=0, shuffle_buffer=4, **kw)
    path = request.getfixturevalue("hf")
    return lambda **kw: HFDatasetSource(path, **layout, **text, **kw)


def take(source: DataSource, n: int) -> list[Batch]:
    it = iter(source)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("world", [1, 2])
def test_micro_batches_follow_the_batch_layout_and_ranks_are_disjoint(make: Make, world: int) -> None:
    per_step = G // (M * world)  # micro-batches per rank and step
    held: list[set[int]] = []
    for rank in range(world):
        source = make(rank=rank, world=world)
        assert isinstance(source, DataSource)
        batches = take(source, 2 * per_step)
        assert all(b.size == M for b in batches)
        for step in range(2):
            indices = {i for b in batches[step * per_step : (step + 1) * per_step] for i in b.sample_index.tolist()}
            low = step * G + rank * G // world
            assert indices <= set(range(low, low + G // world)) and len(indices) == G // world
        held.append({i for b in batches[:per_step] for i in b.sample_index.tolist()})
    assert set().union(*held) == set(range(G)) and sum(len(h) for h in held) == G


def test_the_checkpointed_state_resumes_every_rank_exactly(make: Make) -> None:
    ranks = [make(rank=r, world=2) for r in range(2)]
    for source in ranks:
        take(source, 3)  # mid-step (2 micro-batches per rank and step)
    saved = json.loads(json.dumps(checkpoint_data_state([s.state_dict() for s in ranks])))
    want = [take(s, 7) for s in ranks]  # into the next epoch of the 24 prepared samples
    for rank in range(2):
        resumed = make(rank=rank, world=2)
        resumed.load_state_dict(saved)
        for a, b in zip(want[rank], take(resumed, 7), strict=True):
            assert a.sample_index.tolist() == b.sample_index.tolist() and a.captions == b.captions
            assert torch.equal(a.latents, b.latents) and torch.equal(a.text, b.text)
    if "ranks" in saved:  # a loader per rank: each state names its rank, and another rank's is refused
        with pytest.raises(ValueError, match="rank=0 but this run has rank=1"):
            make(rank=1, world=2).load_state_dict(saved["ranks"][0])
