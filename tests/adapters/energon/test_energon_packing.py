"""``EnergonSource(packing=True)``: micro-batches of any latent shapes as packed batches, trained on end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.shards import make_samples, write_prepared

from dfm.adapters.energon import EnergonSource
from dfm.adapters.tracking import read_metrics
from dfm.app.config import ConfigError, resolve_config
from dfm.app.services.training import train
from dfm.domain.batch import PackedBatch
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.objective import batch_loss, training_loss
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import WAN_TINY

pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
SHAPES = ((4, 2, 4, 6), (4, 2, 6, 4), (4, 1, 4, 4))
TEXT_LEN = 8


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    samples = make_samples(12, latent_shapes=SHAPES, text_dim=WAN_TINY.text_dim, max_text_len=6)
    return write_prepared(tmp_path_factory.mktemp("mixed"), samples, samples_per_shard=4)


def _source(path: Path, packing: bool) -> EnergonSource:
    return EnergonSource(
        path, global_batch_size=4, micro_batch_size=4, seed=1, text_len=TEXT_LEN, text_dim=WAN_TINY.text_dim,
        num_workers=0, shuffle_buffer=4, max_samples_per_sequence=4, packing=packing,
    )  # fmt: skip


def test_packed_batches_mix_shapes_and_their_loss_is_the_per_sample_loss(mixed: Path) -> None:
    batches = [next(iter(_source(mixed, packing=True))) for _ in range(1)]
    batch = batches[0]
    assert isinstance(batch, PackedBatch) and batch.size == 4
    assert len({tuple(x.shape) for x in batch.latents}) > 1  # shapes are mixed in one micro-batch
    network = WanTransformer(WAN_TINY, generator=torch.Generator().manual_seed(0))
    process, rng = FlowMatching(), SampleRNG(seed=0, step=0)
    packed = batch_loss(network, batch, process, rng).per_sample
    for b, latents in enumerate(batch.latents):  # each sample alone, unpacked, with its own noise streams
        one = _one(batch, b, latents)
        torch.testing.assert_close(packed[b], training_loss(network, one, process, rng).per_sample[0])


def _one(batch: PackedBatch, b: int, latents: torch.Tensor):
    from dfm.domain.batch import Batch

    mask = None if batch.text_mask is None else batch.text_mask[b : b + 1]
    return Batch(latents=latents[None], text=batch.text[b : b + 1], sample_index=batch.sample_index[b : b + 1],
                 text_mask=mask)  # fmt: skip


def test_training_runs_on_packed_batches_and_refuses_layouts_that_split_them(mixed: Path, tmp_path: Path) -> None:
    overrides = [
        "data.source=energon", f"data.path={mixed}", "data.packing=true",
        "data.num_workers=0", f"data.text_len={TEXT_LEN}", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.max_steps=2", "model.in_channels=4", "model.out_channels=4", "checkpoint.interval=100",
        "logging.level=WARNING",
    ]  # fmt: skip
    losses = {}
    for runtime in ("local", "fsdp2"):  # fsdp2 as one process: FSDP's hooks around the packed forward
        run = tmp_path / runtime
        assert (
            train(resolve_config("wan_tiny_t2v", None, [*overrides, f"run.dir={run}", f"runtime={runtime}"])).step == 2
        )
        losses[runtime] = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert losses["fsdp2"] == pytest.approx(losses["local"], rel=1e-6) and len(losses["local"]) == 2
    with pytest.raises(ConfigError, match=r"data\.packing: packed sequences run on runtime local or fsdp2"):
        train(resolve_config("wan_tiny_t2v", None, [*overrides, f"run.dir={tmp_path / 'm'}", "runtime=megatron"]))


def test_packs_hold_micro_batch_size_samples_and_resume_exactly(mixed: Path) -> None:
    import json

    src = _source(mixed, packing=True)
    it = iter(src)
    first = [next(it) for _ in range(3)]
    volumes = [sorted(int(x[0].numel()) for x in b.latents) for b in first]
    assert all(len(v) == 4 for v in volumes)
    state = json.loads(json.dumps(src.state_dict()))  # as a checkpoint keeps it
    want = [next(it) for _ in range(2)]
    again = _source(mixed, packing=True)
    again.load_state_dict(state)
    it2 = iter(again)
    for expected in want:  # the next packs exactly: same samples, same tensors
        got = next(it2)
        assert got.captions == expected.captions and got.sample_index.tolist() == expected.sample_index.tolist()
        assert all(torch.equal(a, b) for a, b in zip(got.latents, expected.latents, strict=True))
