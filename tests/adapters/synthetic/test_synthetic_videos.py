"""Procedural videos: deterministic per (seed, index), and the caption says what the pixels show."""

from __future__ import annotations

import colorsys
import re

import attrs
import pytest
import torch

from dfm.adapters.synthetic.videos import (
    VOCABULARY,
    VideoSpec,
    all_attribute_values,
    describe,
    render,
    render_batch,
)

CAPTION = re.compile(
    r"^(a|an) (\w+) (\w+) moving (left|right|up|down) (slowly|quickly)( on a (\w+) background)?$",
)
# Hue ranges in degrees (HSV) a plain-language reader would accept for each colour word; white: low saturation.
HUES = {
    "red": (-15, 15),
    "orange": (20, 45),
    "yellow": (50, 70),
    "green": (100, 140),
    "cyan": (170, 195),
    "blue": (205, 250),
    "purple": (260, 300),
}


def _specs(n: int, seed: int = 0, background: bool = False) -> list[VideoSpec]:
    return [describe(i, seed, background=background) for i in range(n)]


def _brightness(video: torch.Tensor) -> torch.Tensor:
    """Max channel in [0, 1], [T, H, W]: on black, the shape's coverage (every colour has a channel at 1)."""
    return ((video + 1) / 2).amax(dim=0)


def _centroid(weight: torch.Tensor) -> torch.Tensor:
    """(x, y) in pixels of a [H, W] weight map."""
    ys, xs = torch.meshgrid(torch.arange(weight.shape[0]), torch.arange(weight.shape[1]), indexing="ij")
    total = weight.sum()
    return torch.stack([(weight * xs).sum() / total, (weight * ys).sum() / total])


def test_same_index_same_clip_and_caption() -> None:
    for i in (0, 7, 123456):
        a, b = describe(i, seed=3), describe(i, seed=3)
        assert a == b and a.caption == b.caption
        assert torch.equal(render(a, 9, 32, 32), render(b, 9, 32, 32))


def test_other_seed_other_clips() -> None:
    a, b = _specs(32, seed=0), _specs(32, seed=1)
    assert sum(x.caption != y.caption for x, y in zip(a, b, strict=True)) > 16
    assert not torch.equal(render_batch(a, 5, 16, 16), render_batch(b, 5, 16, 16))


def test_background_flag_changes_only_the_background() -> None:
    for plain, coloured in zip(_specs(50), _specs(50, background=True), strict=True):
        assert plain.background is None and coloured.background is not None
        assert attrs.evolve(coloured, background=None) == plain
        assert coloured.caption.startswith(plain.caption + " on a ")


def test_render_batch_equals_render_one_by_one() -> None:
    specs = _specs(6, background=True)
    batch = render_batch(specs, 9, 32, 32)
    assert batch.shape == (6, 3, 9, 32, 32) and batch.dtype == torch.float32
    for spec, clip in zip(specs, batch, strict=True):
        assert torch.equal(render(spec, 9, 32, 32), clip)


@pytest.mark.parametrize("size", [(1, 4, 4), (9, 32, 32), (17, 24, 40), (4, 40, 16)])
def test_any_size_in_range(size: tuple[int, int, int]) -> None:
    video = render_batch(_specs(4, background=True), *size)
    assert video.shape == (4, 3, *size)
    assert video.min() >= -1 and video.max() <= 1
    assert torch.isfinite(video).all()


def test_captions_follow_the_grammar_and_vocabulary() -> None:
    values = all_attribute_values()
    for spec in _specs(200, background=True) + _specs(50):
        m = CAPTION.match(spec.caption)
        assert m, spec.caption
        article, colour, shape, direction, speed, _, background = m.groups()
        assert (colour, shape, direction, speed, background) == (
            spec.colour,
            spec.shape,
            spec.direction,
            spec.speed,
            spec.background,
        )
        assert article == ("an" if colour[0] in "aeiou" else "a")
        assert colour in values["colour"] and shape in values["shape"]
        assert set(spec.caption.split()) <= set(VOCABULARY)
    assert len(VOCABULARY) == len(set(VOCABULARY))


def test_every_attribute_value_occurs() -> None:
    specs = _specs(400, background=True)
    for name, options in all_attribute_values().items():
        seen = {getattr(s, name) for s in specs}
        assert seen == set(options), name


def test_colour_word_matches_the_pixels() -> None:
    for spec in _specs(80, seed=5, background=True):
        video = (render(spec, 9, 32, 32) + 1) / 2
        shape_pixels = video.amax(dim=0) > 0.9  # backgrounds are dim (< 0.35), colours have a channel at 1
        assert shape_pixels.sum() > 20, spec
        r, g, b = (video[c][shape_pixels].mean().item() for c in range(3))
        hue, sat, _ = colorsys.rgb_to_hsv(r, g, b)
        hue = hue * 360 if hue * 360 <= 345 else hue * 360 - 360
        if spec.colour == "white":
            assert sat < 0.15, spec.caption
        else:
            low, high = HUES[spec.colour]
            assert sat > 0.5 and low <= hue <= high, (spec.caption, hue, sat)


def test_shape_moves_in_the_captioned_direction_at_the_captioned_speed() -> None:
    expected = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for spec in _specs(80, seed=7):
        video = _brightness(render(spec, 9, 32, 32))
        shift = _centroid(video[-1]) - _centroid(video[0])
        dx, dy = expected[spec.direction]
        along = float(shift[0] * dx + shift[1] * dy)
        across = float(shift[1] * dx + shift[0] * dy)
        assert abs(across) < 0.5, (spec.caption, shift)
        # slowly: a quarter of the frame (8 px), quickly: half (16 px); the boundary is 12 px.
        assert (along > 12) if spec.speed == "quickly" else (4 < along < 12), (spec.caption, along)


def test_shape_stays_in_frame() -> None:
    for spec in _specs(80, seed=11):
        area = _brightness(render(spec, 9, 32, 32)).sum(dim=(1, 2))
        assert area.min() > 0.9 * area.max(), (spec.caption, area)


def _classify(mask: torch.Tensor) -> str:
    """Shape of a [H, W] bool mask from robust features: hole, fill ratio, widths at 1/4 and 3/4 height."""
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    height, width = bottom - top + 1, right - left + 1
    fill = mask.sum().item() / (height * width)
    width_at = lambda frac: int(mask[top + round(frac * (height - 1))].sum())
    if not mask[(top + bottom) // 2, (left + right) // 2]:
        return "ring"
    if width_at(0.75) > 1.8 * width_at(0.25):
        return "triangle"
    if fill > 0.9:
        return "square"
    return "circle" if fill > 0.68 else "cross"


def test_shape_word_matches_the_pixels() -> None:
    for spec in _specs(100, seed=13):
        mask = _brightness(render(spec, 1, 64, 64))[0] > 0.5
        assert _classify(mask) == spec.shape, spec


def test_invalid_inputs_raise_value_errors() -> None:
    spec = describe(0, 0)
    with pytest.raises(ValueError, match="frames"):
        render(spec, 0, 32, 32)
    with pytest.raises(ValueError, match="height"):
        render_batch([spec], 4, 2, 32)
    with pytest.raises(ValueError, match="non-negative"):
        describe(-1, 0)
    with pytest.raises(ValueError):
        VideoSpec(shape="hexagon", colour="red", direction="left", speed="slowly")
    with pytest.raises(ValueError):
        VideoSpec(shape="circle", colour="red", direction="left", speed="slowly", start_along=1.5)


def test_placement_zero_centres_every_clip_and_radius_range_is_honoured() -> None:
    for i in range(50):
        spec = describe(i, 4, placement=0.0, radius=(0.2, 0.24))
        assert (spec.start_along, spec.start_across) == (0.5, 0.5)
        assert 0.2 <= spec.radius <= 0.24
        # the categorical attributes do not depend on the scene options
        other = describe(i, 4)
        assert (spec.shape, spec.colour, spec.direction, spec.speed) == (
            other.shape,
            other.colour,
            other.direction,
            other.speed,
        )
    spread = [describe(i, 4, placement=0.5) for i in range(200)]
    assert all(0.25 <= s.start_along <= 0.75 and 0.25 <= s.start_across <= 0.75 for s in spread)
    assert max(s.start_along for s in spread) > 0.7 and min(s.start_along for s in spread) < 0.3


def test_invalid_scene_options_raise_value_errors() -> None:
    with pytest.raises(ValueError, match=r"placement must lie in \[0, 1\], got 1.5"):
        describe(0, 0, placement=1.5)
    with pytest.raises(ValueError, match="radius must be a range"):
        describe(0, 0, radius=(0.3, 0.2))
