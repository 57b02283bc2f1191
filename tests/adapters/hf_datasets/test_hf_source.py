"""``HFDatasetSource`` and ``webdataset_to_hf`` on real files: conversion, contents, grouping, rank split, resume."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import torch
from structlog.testing import capture_logs
from support.shards import FakeSample, make_samples, write_prepared

from dfm.adapters.hf_datasets import BadSampleError, HFDatasetSource, webdataset_to_hf
from dfm.domain.batch import Batch
from dfm.ports.data import DataSource
from dfm.ports.samples import META, TENSORS

SHAPE_A, SHAPE_B = (4, 2, 4, 6), (4, 2, 6, 4)
TEXT_DIM, TEXT_LEN = 8, 7
BAD_KEYS = ("000005", "000010")


def source(path: Path, **kw: object) -> HFDatasetSource:
    args: dict = {"global_batch_size": 4, "micro_batch_size": 2, "seed": 3, "text_len": TEXT_LEN, "text_dim": TEXT_DIM}
    args.update(kw)
    return HFDatasetSource(path, **args)


def take(src: HFDatasetSource, n: int) -> list[Batch]:
    it = iter(src)
    return [next(it) for _ in range(n)]


def converted(root: Path, samples: list[FakeSample], **kw: object) -> Path:
    shards = write_prepared(root / "shards", samples, **kw)  # type: ignore[arg-type]
    assert webdataset_to_hf(shards, root / "hf") == len(samples)
    return root / "hf"


@pytest.fixture(scope="module")
def one_shape(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FakeSample]]:
    samples = make_samples(24, latent_shapes=(SHAPE_A,), text_dim=TEXT_DIM, max_text_len=6)
    return converted(tmp_path_factory.mktemp("one"), samples), samples


@pytest.fixture(scope="module")
def two_shapes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FakeSample]]:
    samples = make_samples(24, latent_shapes=(SHAPE_A, SHAPE_B), text_dim=TEXT_DIM, max_text_len=6)
    return converted(tmp_path_factory.mktemp("two"), samples), samples


def corrupt_two(sample: FakeSample, members: dict[str, bytes]) -> dict[str, bytes]:
    if sample.key == BAD_KEYS[0]:
        return {**members, TENSORS: b"definitely not safetensors"}
    if sample.key == BAD_KEYS[1]:
        return {**members, META: b"{not json"}
    return members


@pytest.fixture(scope="module")
def with_bad(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FakeSample]]:
    samples = make_samples(16, latent_shapes=(SHAPE_A,), text_dim=TEXT_DIM, max_text_len=6)
    return converted(tmp_path_factory.mktemp("bad"), samples, corrupt=corrupt_two), samples


def test_conversion_round_trips_every_member(one_shape: tuple[Path, list[FakeSample]]) -> None:
    path, samples = one_shape
    table = datasets.load_from_disk(str(path))
    assert table.column_names == ["__key__", TENSORS, META]
    rows = {row["__key__"]: row for row in table}
    assert sorted(rows) == [s.key for s in samples]
    for s in samples:
        members = s.members()
        assert rows[s.key][TENSORS] == members[TENSORS]
        assert rows[s.key][META] == members[META].decode()
    with pytest.raises(ValueError, match="exists"):
        webdataset_to_hf(path.parent / "shards", path)


def test_batches_hold_the_written_tensors(one_shape: tuple[Path, list[FakeSample]]) -> None:
    path, samples = one_shape
    src = source(path)
    assert isinstance(src, DataSource)
    written = {s.meta.caption: s for s in samples}
    for k, batch in enumerate(take(src, 6)):
        assert batch.latents.shape == (2, *SHAPE_A) and batch.text.shape == (2, TEXT_LEN, TEXT_DIM)
        assert batch.sample_index.tolist() == [2 * k, 2 * k + 1]
        assert batch.captions is not None and batch.text_mask is not None
        for row, caption in enumerate(batch.captions):
            want = written[caption]
            n = want.meta.text_len
            torch.testing.assert_close(batch.latents[row], want.latents, rtol=0, atol=0)
            torch.testing.assert_close(batch.text[row, :n], want.text, rtol=0, atol=0)
            assert not batch.text[row, n:].any()
            assert batch.text_mask[row].tolist() == [i < n for i in range(TEXT_LEN)]


def test_order_is_a_function_of_the_seed(one_shape: tuple[Path, list[FakeSample]]) -> None:
    path, _ = one_shape
    captions = [[b.captions for b in take(source(path, seed=s), 12)] for s in (3, 3, 4)]
    assert captions[0] == captions[1] != captions[2]
    epochs = [c for b in captions[0] for c in (b or ())]
    assert len(set(epochs[:24])) == 24 and epochs[:24] != epochs[24:]  # each epoch a new permutation


def test_latent_shapes_never_share_a_batch(two_shapes: tuple[Path, list[FakeSample]]) -> None:
    path, samples = two_shapes
    shape_of = {s.meta.caption: tuple(s.latents.shape) for s in samples}
    seen = set()
    for batch in take(source(path), 16):
        shapes = {shape_of[c] for c in batch.captions or ()}
        assert shapes == {tuple(batch.latents.shape[1:])}
        seen |= shapes
    assert seen == {SHAPE_A, SHAPE_B}


def test_two_ranks_read_disjoint_samples_covering_the_epoch(one_shape: tuple[Path, list[FakeSample]]) -> None:
    path, samples = one_shape
    per_rank = []
    for rank in range(2):
        batches = take(source(path, rank=rank, world=2), 6)  # 12 samples each: exactly epoch 0
        assert [b.sample_index.tolist() for b in batches[:2]] == [
            [2 * rank, 2 * rank + 1],
            [4 + 2 * rank, 5 + 2 * rank],
        ]
        per_rank.append([c for b in batches for c in (b.captions or ())])
    assert len(set(per_rank[0])) == len(set(per_rank[1])) == 12
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == {s.meta.caption for s in samples}


def test_resume_mid_epoch_reads_exactly_the_next_batches(two_shapes: tuple[Path, list[FakeSample]]) -> None:
    path, _ = two_shapes
    first = source(path, global_batch_size=8, seed=5)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == 0 and state["next_step"] == 1 and state["next_micro"] == 1
    assert [len(rows) for _, rows in state["buckets"]] == [1]  # a sample waits for a partner of its shape
    want = take(first, 12)  # crosses into epoch 1
    resumed = source(path, global_batch_size=8, seed=5)
    resumed.load_state_dict(state)
    got = take(resumed, 12)
    for a, b in zip(want, got, strict=True):
        assert a.captions == b.captions and a.sample_index.tolist() == b.sample_index.tolist()
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
        torch.testing.assert_close(a.text, b.text, rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed=5 but this run has seed=4"):
        source(path, global_batch_size=8, seed=4).load_state_dict(state)


def test_bad_rows_are_skipped_and_counted_once(with_bad: tuple[Path, list[FakeSample]]) -> None:
    path, samples = with_bad
    good = {s.meta.caption for s in samples if s.key not in BAD_KEYS}
    src = source(path)
    seen = {c for b in take(src, 7) for c in (b.captions or ())}  # 14 good rows: all of epoch 0
    assert seen == good
    assert 1 <= src.skipped <= 2
    with capture_logs() as logs:
        take(src, 30)  # epochs 1 to 4 meet the two bad rows again: each still counts once
    assert src.skipped == 2 and src.state_dict()["skipped"] == 2 and len(src.state_dict()["bad_rows"]) == 2
    assert len([log for log in logs if log["event"] == "bad sample skipped"]) <= 1  # only a row not met before
    straight = source(path)
    take(straight, 12)
    half = source(path)
    take(half, 5)
    resumed = source(path)
    resumed.load_state_dict(json.loads(json.dumps(half.state_dict())))
    take(resumed, 7)
    assert resumed.skipped == straight.skipped


def test_bad_row_raises_when_strict(with_bad: tuple[Path, list[FakeSample]]) -> None:
    with pytest.raises(BadSampleError, match=r"not valid safetensors data|not valid JSON"):
        take(source(with_bad[0], strict=True), 8)


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


@pytest.fixture
def two_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A ``save_to_disk`` dataset and a parquet directory, each of two files (rows 0-7, 8-15)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    samples = make_samples(16, latent_shapes=(SHAPE_A,), text_dim=TEXT_DIM, max_text_len=6)
    arrow = converted(tmp_path / "arrow", samples)
    table = datasets.load_from_disk(str(arrow))
    parquet = tmp_path / "parquet"
    parquet.mkdir()
    table.select(range(8)).to_parquet(str(parquet / "part-0.parquet"))
    table.select(range(8, 16)).to_parquet(str(parquet / "part-1.parquet"))
    saved = tmp_path / "saved"
    table.save_to_disk(str(saved), num_shards=2)
    return saved, parquet


@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_an_unreadable_file_is_skipped_with_a_warning_or_raises_when_strict(
    two_files: tuple[Path, Path], kind: str
) -> None:
    path = two_files[0] if kind == "saved" else two_files[1]
    bad = sorted(path.glob("*.arrow" if kind == "saved" else "*.parquet"))[1]
    truncate(bad)
    with pytest.raises(
        BadSampleError, match=rf"^{re.escape(str(bad))} cannot be read \(.+\); the file is truncated or corrupt"
    ):
        source(path, strict=True)
    with capture_logs() as logs:
        src = source(path)
    assert src.unreadable_files == [str(bad)] and src.num_rows == 8
    assert [log["file"] for log in logs if log["event"] == "unreadable file skipped"] == [str(bad)]
    seen = {c for b in take(src, 8) for c in (b.captions or ())}
    assert seen == {f"sample {i}" for i in range(8)}  # the rows of the readable file, none other


def test_reads_parquet_files(one_shape: tuple[Path, list[FakeSample]], tmp_path: Path, monkeypatch) -> None:
    path, _ = one_shape
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "pq").mkdir()
    datasets.load_from_disk(str(path)).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    want = [b.captions for b in take(source(path), 4)]
    assert [b.captions for b in take(source(tmp_path / "pq"), 4)] == want


def test_user_errors(one_shape: tuple[Path, list[FakeSample]], tmp_path: Path) -> None:
    path, _ = one_shape
    with pytest.raises(ValueError, match="8 wide but the model expects text_dim=16"):
        source(path, text_dim=16)
    with pytest.raises(ValueError, match="neither a dataset written by `save_to_disk` nor parquet"):
        source(tmp_path)
    with pytest.raises(ValueError, match="not divisible"):
        source(path, global_batch_size=6, micro_batch_size=4)
