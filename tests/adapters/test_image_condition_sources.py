"""Image-to-video data through the prepared-data sources (``energon`` shards and their ``hf_datasets`` copy): batches
carry each sample's stored condition latents after its rebuilt frame mask (``Batch.condition``) and its image
features (``Batch.image``); data without a fitting condition are refused up front, or sample by sample."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support.shards import FakeSample, make_samples, write_prepared

from dfm.adapters.energon import EnergonSource
from dfm.adapters.hf_datasets import HFDatasetSource, webdataset_to_hf
from dfm.domain.batch import Batch
from dfm.domain.diffusion.image_condition import frame_mask
from dfm.ports.samples import BadSampleError, ImageCondition

pytest.importorskip("megatron.energon")
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")
SHAPE, TEXT_DIM, TEXT_LEN = (4, 3, 2, 3), 8, 7
FIRST = ImageCondition(kind="first", temporal_stride=4, image_dim=12)
FIRST_LAST = ImageCondition(kind="first_last", temporal_stride=4, image_dim=12, image_tokens=5)
Open = Callable[..., EnergonSource | HFDatasetSource]


def _write(root: Path, samples: list[FakeSample]) -> dict[str, Path]:
    shards = write_prepared(root / "shards", samples, samples_per_shard=4)
    webdataset_to_hf(shards, root / "hf")
    return {"energon": shards, "hf_datasets": root / "hf"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict[str, Path], list[FakeSample]]]:
    root = tmp_path_factory.mktemp("i2v_sources")
    out = {}
    for kind in ("first", "first_last", None):
        samples = make_samples(8, latent_shapes=(SHAPE,), text_dim=TEXT_DIM, condition=kind)
        out[str(kind)] = (_write(root / str(kind), samples), samples)
    mixed = make_samples(8, latent_shapes=(SHAPE,), text_dim=TEXT_DIM, condition="first")
    mixed[5] = make_samples(6, latent_shapes=(SHAPE,), text_dim=TEXT_DIM)[5]  # one sample without a condition
    out["mixed"] = (_write(root / "mixed", mixed), mixed)
    return out


@pytest.fixture(params=["energon", "hf_datasets"])
def open_source(request: pytest.FixtureRequest) -> Callable[[dict[str, Path]], Open]:
    layout = {"global_batch_size": 2, "micro_batch_size": 2, "seed": 3, "text_len": TEXT_LEN, "text_dim": TEXT_DIM}

    def opener(paths: dict[str, Path]) -> Open:
        if request.param == "energon":
            return lambda **kw: EnergonSource(paths["energon"], **layout, num_workers=0, shuffle_buffer=2, **kw)
        return lambda **kw: HFDatasetSource(paths["hf_datasets"], **layout, **kw)

    return opener


def take(source: EnergonSource | HFDatasetSource, n: int) -> list[Batch]:
    it = iter(source)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("want", [FIRST, FIRST_LAST], ids=lambda w: w.kind)
def test_batches_carry_the_stored_condition_and_image_features(data, open_source, want: ImageCondition) -> None:
    paths, samples = data[want.kind]
    written = {s.meta.caption: s for s in samples}
    mask = frame_mask(1, 9, (2, 3), 4, last=want.kind == "first_last")[0]
    images = want.images
    for batch in take(open_source(paths)(image_condition=want), 4):
        assert batch.condition is not None and batch.condition.shape == (2, 4 + 4, 3, 2, 3)
        assert batch.image is not None and batch.image.shape == (2 * images, 5, 12)
        for row, caption in enumerate(batch.captions or ()):
            sample = written[caption]
            assert torch.equal(batch.latents[row], sample.latents)
            assert torch.equal(batch.condition[row, :4], mask) and torch.equal(
                batch.condition[row, 4:], sample.condition
            )
            assert torch.equal(batch.image[row * images : (row + 1) * images], sample.image)
    plain = take(open_source(paths)(), 1)[0]  # a text-to-video model reads the latents and text only
    assert plain.condition is None and plain.image is None


def test_data_without_a_fitting_condition_are_refused_before_reading(data, open_source) -> None:
    with pytest.raises(ValueError, match=r"hold no image condition .*--image-condition first --image-encoder DIR"):
        open_source(data["None"][0])(image_condition=FIRST)
    with pytest.raises(ValueError, match="conditioned on their 'first' frame\\(s\\), but the model takes 'first_last'"):
        open_source(data["first"][0])(image_condition=FIRST_LAST)


def test_a_sample_without_a_condition_is_a_bad_sample(data, open_source) -> None:
    paths, _ = data["mixed"]
    source = open_source(paths)(image_condition=FIRST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = take(source, 4)
    assert all(b.condition is not None for b in batches) and source.skipped == 1
    assert "sample 5" not in {c for b in batches for c in b.captions or ()}
    strict = open_source(paths)(image_condition=FIRST, strict=True)
    with pytest.raises(BadSampleError, match="holds no image condition"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        take(strict, 8)


def test_energon_packing_refuses_image_conditions(data) -> None:
    paths, _ = data["first"]
    with pytest.raises(ValueError, match="packed batches carry no image-to-video condition"):
        EnergonSource(
            paths["energon"],
            global_batch_size=2,
            micro_batch_size=2,
            seed=0,
            text_len=TEXT_LEN,
            text_dim=TEXT_DIM,
            packing=True,
            image_condition=FIRST,
        )
