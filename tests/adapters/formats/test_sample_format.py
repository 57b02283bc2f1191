"""The prepared-sample format's codec: image-to-video samples round trip, records written before the image fields
still read, and samples (or data sets) that do not fit the format or the model are refused, naming what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from support.shards import make_sample

from dfm.adapters.formats.samples import check_first_sample, decode_sample, encode_sample, stack_condition
from dfm.domain.diffusion.image_condition import frame_mask
from dfm.ports.samples import CONDITION, IMAGE, LATENTS, META, TENSORS, TEXT, BadSampleError, ImageCondition, SampleMeta

SHAPE, TEXT_DIM = (4, 3, 2, 3), 8  # 3 latent frames of 9 pixel frames at temporal stride 4
FIRST = ImageCondition(kind="first", temporal_stride=4, image_dim=12)
FIRST_LAST = ImageCondition(kind="first_last", temporal_stride=4, image_dim=12, image_tokens=5)


def decode(members: dict[str, bytes], image_condition: ImageCondition | None = None):
    return decode_sample(
        members[TENSORS], members[META], text_len=6, text_dim=TEXT_DIM, where="s", image_condition=image_condition
    )


def test_a_text_to_video_record_is_the_one_written_before_the_image_fields() -> None:
    """New text-to-video records hold exactly the old fields (older readers read them); old records read here."""
    sample = make_sample(0, SHAPE, 3, TEXT_DIM)
    record = json.loads(sample.members()[META])
    assert "condition" not in record and "image_encoder" not in record and "image_shape" not in record
    old = json.dumps(record).encode()  # as a dfm before image conditioning wrote it
    decoded = decode({TENSORS: sample.members()[TENSORS], META: old})
    assert torch.equal(decoded.latents, sample.latents) and decoded.condition is None and decoded.image is None


@pytest.mark.parametrize(("want", "last"), [(FIRST, False), (FIRST_LAST, True)])
def test_an_image_to_video_sample_round_trips_with_its_frame_mask_rebuilt(want: ImageCondition, last: bool) -> None:
    sample = make_sample(1, SHAPE, 3, TEXT_DIM, condition=want.kind)
    assert SampleMeta.from_json(sample.members()[META]) == sample.meta
    decoded = decode(sample.members(), want)
    mask = frame_mask(1, 9, (2, 3), 4, last=last)[0]
    assert decoded.condition is not None and decoded.condition.shape == (4 + 4, 3, 2, 3)
    assert torch.equal(decoded.condition[:4], mask) and torch.equal(decoded.condition[4:], sample.condition)
    assert decoded.image is not None and torch.equal(decoded.image, sample.image)
    assert decoded.image.shape == ((2 if last else 1), 5, 12)
    plain = decode(sample.members())  # a text-to-video reader leaves the condition aside
    assert plain.condition is None and plain.image is None and torch.equal(plain.latents, sample.latents)


def _with_tensors(sample, **tensors: torch.Tensor | None) -> dict[str, bytes]:
    named = {LATENTS: sample.latents, TEXT: sample.text, CONDITION: sample.condition, IMAGE: sample.image}
    named |= tensors
    return {TENSORS: save({k: v for k, v in named.items() if v is not None}), META: sample.meta.to_json().encode()}


def test_stored_conditions_that_do_not_match_their_record_are_bad_samples() -> None:
    sample = make_sample(2, SHAPE, 3, TEXT_DIM, condition="first")
    cases = [
        (_with_tensors(sample, condition=torch.zeros(4, 2, 2, 3)), r"condition latents have shape \(4, 2, 2, 3\)"),
        (_with_tensors(sample, image=torch.zeros(1, 6, 12)), r"image features have shape \(1, 6, 12\), the record"),
        (_with_tensors(sample, image=None), "the record names condition 'first' but tensors.safetensors lacks"),
        (_with_tensors(sample, condition=torch.zeros(SHAPE, dtype=torch.int32)), "must be floating tensors"),
    ]
    plain = make_sample(3, SHAPE, 3, TEXT_DIM)
    cases.append((_with_tensors(plain, condition=torch.zeros(SHAPE)), "but its record names no condition"))
    for members, message in cases:
        for reader in (None, FIRST):
            with pytest.raises(BadSampleError, match=message):
                decode(members, reader)


def test_records_with_inconsistent_image_fields_are_bad_samples() -> None:
    record = json.loads(make_sample(4, SHAPE, 3, TEXT_DIM, condition="first").members()[META])
    for change, message in (
        ({"image_encoder": None}, r"go together \(image-to-video\)"),
        ({"condition": "last"}, "condition must be one of"),
        ({"image_shape": [2, 5, 12]}, r"image_shape must be \[1, R, D\] for condition 'first'"),
    ):
        bad = {k: v for k, v in (record | change).items() if v is not None}
        with pytest.raises(BadSampleError, match=message):
            decode({TENSORS: save({LATENTS: torch.zeros(SHAPE)}), META: json.dumps(bad).encode()})
    plain = make_sample(5, SHAPE, 3, TEXT_DIM)
    with pytest.raises(ValueError, match="exactly when the record names its condition"):
        encode_sample(plain.latents, plain.text, plain.meta, condition=torch.zeros(SHAPE), image=torch.zeros(1, 5, 12))


def test_samples_that_do_not_fit_an_image_to_video_model_say_how_to_prepare_them() -> None:
    cases = [
        (make_sample(6, SHAPE, 3, TEXT_DIM), FIRST, r"holds no image condition \(prepared without --image-condition\)"),
        (make_sample(7, SHAPE, 3, TEXT_DIM, condition="first"), FIRST_LAST, "its 'first' frame\\(s\\), but the model"),
        (make_sample(8, SHAPE, 3, TEXT_DIM, condition="first", image_shape=(5, 16)), FIRST, "16 wide, but model.image"),
        (make_sample(9, SHAPE, 3, TEXT_DIM, condition="first_last", image_shape=(7, 12)), FIRST_LAST, "7 image tokens"),
        (make_sample(10, SHAPE, 3, TEXT_DIM, condition="first", temporal_stride=1), FIRST, "temporal stride 4"),
    ]
    for sample, want, message in cases:
        with pytest.raises(BadSampleError, match=message):
            decode(sample.members(), want)
    with pytest.raises(BadSampleError, match=r"--image-condition first_last --image-encoder DIR"):
        decode(make_sample(11, SHAPE, 3, TEXT_DIM, condition="first").members(), FIRST_LAST)


def test_the_first_sample_refuses_a_data_set_before_training(tmp_path: Path) -> None:
    plain = make_sample(12, SHAPE, 3, TEXT_DIM).members()[TENSORS]
    first = make_sample(13, SHAPE, 3, TEXT_DIM, condition="first").members()[TENSORS]
    check_first_sample(plain, tmp_path, text_dim=TEXT_DIM)
    check_first_sample(first, tmp_path, text_dim=TEXT_DIM, image_condition=FIRST)
    check_first_sample(b"garbage", tmp_path, text_dim=TEXT_DIM, image_condition=FIRST)  # read (and skipped) later
    for tensors, want, message in (
        (plain, FIRST, "the samples hold no image condition .* --image-condition first --image-encoder DIR"),
        (first, FIRST_LAST, "conditioned on their 'first' frame\\(s\\), but the model takes 'first_last'"),
        (first, ImageCondition(kind="first", temporal_stride=4, image_dim=7), "12 wide, but model.image_dim is 7"),
    ):
        with pytest.raises(ValueError, match=message):
            check_first_sample(tensors, tmp_path, text_dim=TEXT_DIM, image_condition=want)
    with pytest.raises(ValueError, match="8 wide but the model expects text_dim=16"):
        check_first_sample(first, tmp_path, text_dim=16, image_condition=FIRST)


def test_a_batch_stacks_conditions_sample_by_sample() -> None:
    conditions = [torch.full((8, 3, 2, 3), float(i)) for i in range(2)]
    images = [torch.full((2, 5, 12), float(i)) for i in range(2)]
    condition, image = stack_condition(conditions, images)
    assert condition.shape == (2, 8, 3, 2, 3) and image.shape == (4, 5, 12)
    assert image[:2].eq(0).all() and image[2:].eq(1).all()  # [first, last] of sample 0, then of sample 1
    assert stack_condition([None, None], [None, None]) == (None, None)
    with pytest.raises(BadSampleError, match="the data set mixes image encoders"):
        stack_condition(conditions, [images[0], torch.zeros(2, 6, 12)])
