"""``EnergonSource`` on real prepared shards: contents, shape grouping, rank split, exact resume, bad samples."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs
from support.shards import FakeSample, make_samples, write_prepared

from dfm.adapters.energon import BadSampleError, EnergonSource
from dfm.adapters.energon.source import worker_message
from dfm.domain.batch import Batch
from dfm.ports.data import DataSource
from dfm.ports.samples import META, TENSORS

pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
SHAPE_A, SHAPE_B = (4, 2, 4, 6), (4, 2, 6, 4)
TEXT_DIM, TEXT_LEN = 8, 7


def source(path: Path, **kw: object) -> EnergonSource:
    args: dict = {
        "global_batch_size": 4,
        "micro_batch_size": 2,
        "seed": 3,
        "text_len": TEXT_LEN,
        "text_dim": TEXT_DIM,
        "num_workers": 0,
        "shuffle_buffer": 4,
        "max_samples_per_sequence": 4,
    }
    args.update(kw)
    return EnergonSource(path, **args)


def by_caption(samples: list[FakeSample]) -> dict[str, FakeSample]:
    return {s.meta.caption: s for s in samples}


def take(src: EnergonSource, n: int) -> list[Batch]:
    it = iter(src)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def one_shape(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FakeSample]]:
    samples = make_samples(24, latent_shapes=(SHAPE_A,), text_dim=TEXT_DIM, max_text_len=6)
    return write_prepared(tmp_path_factory.mktemp("one_shape"), samples), samples


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FakeSample]]:
    samples = make_samples(24, latent_shapes=(SHAPE_A, SHAPE_B), text_dim=TEXT_DIM, max_text_len=6)
    return write_prepared(tmp_path_factory.mktemp("two_shapes"), samples), samples


def test_batches_hold_the_written_tensors(one_shape: tuple[Path, list[FakeSample]]) -> None:
    path, samples = one_shape
    src = source(path)
    assert isinstance(src, DataSource)
    written = by_caption(samples)
    for k, batch in enumerate(take(src, 6)):
        assert batch.latents.shape == (2, *SHAPE_A) and batch.text.shape == (2, TEXT_LEN, TEXT_DIM)
        assert batch.sample_index.tolist() == [2 * k, 2 * k + 1]  # G=4, m=2, W=1: the global stream
        assert batch.captions is not None and batch.text_mask is not None
        for row, caption in enumerate(batch.captions):
            want = written[caption]
            n = want.meta.text_len
            torch.testing.assert_close(batch.latents[row], want.latents, rtol=0, atol=0)
            torch.testing.assert_close(batch.text[row, :n], want.text, rtol=0, atol=0)
            assert not batch.text[row, n:].any()
            assert batch.text_mask[row].tolist() == [i < n for i in range(TEXT_LEN)]


def test_latent_shapes_never_share_a_batch(two_shapes: tuple[Path, list[FakeSample]]) -> None:
    path, samples = two_shapes
    written = by_caption(samples)
    seen = set()
    for batch in take(source(path, num_workers=2), 16):
        assert batch.captions is not None
        shapes = {tuple(written[c].latents.shape) for c in batch.captions}
        assert shapes == {tuple(batch.latents.shape[1:])}
        seen |= shapes
    assert seen == {SHAPE_A, SHAPE_B}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_read_disjoint_samples_covering_the_data(
    one_shape: tuple[Path, list[FakeSample]], num_workers: int
) -> None:
    path, samples = one_shape
    per_rank: list[set[str]] = []
    for rank in range(2):
        src = source(path, rank=rank, world=2, num_workers=num_workers)
        batches = take(src, 18)  # 3 epochs of this rank's 12 samples
        first = batches[0].sample_index.tolist()
        assert first == [2 * rank, 2 * rank + 1]  # step 0: rank r holds [r G/W, (r+1) G/W)
        assert batches[1].sample_index.tolist() == [4 + 2 * rank, 5 + 2 * rank]  # one micro-batch per step
        per_rank.append({c for b in batches for c in (b.captions or ())})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == set(by_caption(samples))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_reads_exactly_the_next_batches(
    two_shapes: tuple[Path, list[FakeSample]], num_workers: int
) -> None:
    path, _ = two_shapes
    first = source(path, num_workers=num_workers, global_batch_size=8)
    head = take(first, 5)  # mid-step (4 micro-batches per step) and mid-epoch
    state = json.loads(json.dumps(first.state_dict()))
    want = take(first, 6)
    assert state["next_step"] == 1 and state["next_micro"] == 1 and head[-1].sample_index.tolist() == [8, 9]

    resumed = source(path, num_workers=num_workers, global_batch_size=8)
    resumed.load_state_dict(state)
    assert resumed.state_dict()["loader"] == state["loader"]  # not iterated yet: the loaded state
    got = take(resumed, 6)
    for a, b in zip(want, got, strict=True):
        assert a.captions == b.captions
        assert a.sample_index.tolist() == b.sample_index.tolist()
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
        torch.testing.assert_close(a.text, b.text, rtol=0, atol=0)


def corrupt_two(sample: FakeSample, members: dict[str, bytes]) -> dict[str, bytes]:
    if sample.key == "000005":
        return {**members, TENSORS: b"definitely not safetensors"}
    if sample.key == "000010":
        return {**members, META: b"{not json"}
    return members


@pytest.fixture(scope="module")
def with_bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FakeSample]]:
    samples = make_samples(16, latent_shapes=(SHAPE_A,), text_dim=TEXT_DIM, max_text_len=6)
    return write_prepared(tmp_path_factory.mktemp("bad"), samples, corrupt=corrupt_two), samples


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_once(with_bad: tuple[Path, list[FakeSample]], num_workers: int) -> None:
    path, samples = with_bad
    good = {s.meta.caption for s in samples if s.key not in ("000005", "000010")}
    src = source(path, num_workers=num_workers, shuffle_buffer=1)
    with capture_logs() as logs:
        seen = {c for b in take(src, 28) for c in (b.captions or ())}  # 4 passes over the 14 good samples
    assert seen == good  # the bad ones never appear
    # each bad sample counts once, however often energon's endless repetition meets it again
    assert src.skipped == 2 and src.state_dict()["skipped"] == 2
    assert len(src.state_dict()["bad_samples"]) == 2
    warned = [log for log in logs if log["event"] == "bad sample skipped"]
    assert len(warned) == 2 and {w["sample"] for w in warned} == set(src.state_dict()["bad_samples"])
    assert all(w["sample"].startswith(("shard_000000.tar[", "shard_000001.tar[")) for w in warned)


@pytest.fixture(scope="module")
def truncated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FakeSample]]:
    """Four shards of 4 samples; the first (also the one the text width is read from) cut after 1 KiB."""
    samples = make_samples(16, latent_shapes=(SHAPE_A,), text_dim=TEXT_DIM, max_text_len=6)
    path = write_prepared(tmp_path_factory.mktemp("truncated"), samples, samples_per_shard=4)
    shard = path / "shard_000000.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    return path, samples


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_truncated_shard_is_skipped_and_counted(truncated: tuple[Path, list[FakeSample]], num_workers: int) -> None:
    path, samples = truncated
    src = source(path, num_workers=num_workers, shuffle_buffer=1)
    with capture_logs() as logs:
        seen = {c for b in take(src, 18) for c in (b.captions or ())}  # 3 passes over the 12 readable samples
    assert seen == {s.meta.caption for s in samples[4:]}
    assert src.skipped == 4 and all(b.startswith("shard_000000.tar[") for b in src.bad_samples)
    warned = [log for log in logs if log["event"] == "bad sample skipped"]
    assert len(warned) == 4
    assert all("of shard_000000.tar cannot be read" in w["reason"] for w in warned)
    assert all("the shard is truncated or corrupt" in w["reason"] for w in warned)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_truncated_shard_raises_naming_it_when_strict(
    truncated: tuple[Path, list[FakeSample]], num_workers: int
) -> None:
    path, _ = truncated
    it = iter(source(path, strict=True, shuffle_buffer=1, num_workers=num_workers))
    with pytest.raises(BadSampleError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(20):
            next(it)
    message = str(caught.value)
    assert re.fullmatch(
        r"the sample at byte \d+ of shard_000000\.tar cannot be read \(ReadError: .*\); the shard is truncated or "
        r"corrupt: prepare it again with `python -m dfm\.app\.prepare`",
        message,
    ), message  # the message alone, also from a loader worker process (no traceback text)


def test_worker_message_unwraps_torch_loader_errors() -> None:
    wrapped = (
        "Caught BadSampleError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\ndfm.ports.samples.BadSampleError: shard_000001.tar: bad\n'
    )
    assert worker_message(wrapped, BadSampleError) == "shard_000001.tar: bad"
    assert worker_message("plain", BadSampleError) == "plain"


def test_the_skip_count_survives_resumption_exactly(with_bad: tuple[Path, list[FakeSample]]) -> None:
    path, _ = with_bad
    straight = source(path, num_workers=2)
    take(straight, 12)
    first = source(path, num_workers=2)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = source(path, num_workers=2)
    resumed.load_state_dict(state)
    take(resumed, 7)
    assert resumed.skipped == straight.skipped == 2
    assert resumed.bad_samples == straight.bad_samples


@pytest.mark.parametrize("num_workers", [0, 1])
def test_bad_sample_raises_when_strict(with_bad: tuple[Path, list[FakeSample]], num_workers: int) -> None:
    path, _ = with_bad
    it = iter(source(path, strict=True, shuffle_buffer=1, num_workers=num_workers))
    with pytest.raises(BadSampleError, match=r"not valid safetensors data|not valid JSON"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(20):
            next(it)


def test_wrong_text_width_and_unprepared_directories_are_user_errors(
    one_shape: tuple[Path, list[FakeSample]], tmp_path: Path
) -> None:
    path, _ = one_shape
    with pytest.raises(ValueError, match="8 wide but the model expects text_dim=16"):
        source(path, text_dim=16)
    with pytest.raises(ValueError, match="not a prepared energon data set"):
        source(tmp_path)
    with pytest.raises(ValueError, match="not divisible"):
        source(path, global_batch_size=6, micro_batch_size=4)


def test_order_is_a_function_of_the_seed(two_shapes: tuple[Path, list[FakeSample]]) -> None:
    path, _ = two_shapes
    orders = [[b.captions for b in take(source(path, seed=s), 8)] for s in (3, 3, 4)]
    assert orders[0] == orders[1] != orders[2]


def test_shuffle_buffer_zero_means_no_buffer(one_shape: tuple[Path, list[FakeSample]]) -> None:
    """``data.shuffle_buffer=0`` (the config allows it) reads like a buffer of 1 (it was a ``data.path`` error)."""
    path, _ = one_shape
    orders = [[b.captions for b in take(source(path, shuffle_buffer=size), 4)] for size in (0, 1)]
    assert orders[0] == orders[1]
