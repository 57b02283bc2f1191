"""Procedural videos: one coloured shape moving in a straight line, with a caption that says so.

A clip is described by a :class:`VideoSpec` drawn by :func:`describe` from ``(seed, global sample
index)`` alone, and drawn into pixels by :func:`render` at any size. Sizes are fractions of the frame,
so one spec renders the same scene at ``9 x 32 x 32`` or ``17 x 64 x 96``.

Caption grammar (all lower case, single spaces, no punctuation)::

    caption    := article " " colour " " shape " moving " direction " " speed [" on a " background " background"]
    article    := "an" before a vowel ("an orange ..."), else "a"
    colour     := red | orange | yellow | green | cyan | blue | purple | white
    shape      := circle | square | triangle | ring | cross
    direction  := left | right | up | down
    speed      := slowly | quickly
    background := black | grey | navy | brown | teal      (only when backgrounds are enabled)

e.g. ``"a red circle moving left slowly"`` or ``"an orange ring moving up quickly on a navy background"``.
Every attribute varies, so every one is named; the background clause appears only when backgrounds
vary (``describe(..., background=True)``); otherwise the background is plain black and not named.

Motion: over the whole clip (first to last frame) the shape's centre travels a fixed fraction of the
frame along its direction (:data:`TRAVEL`: 1/4 slowly, 1/2 quickly), so motion is visible whatever the
frame count. The start position is chosen so the shape stays inside the frame for the whole clip (no
wrapping): along the motion axis the travelled segment lies within ``[margin, extent - margin]``
(``margin`` = 1.1 x the shape radius), across it the centre lies within the same margins. On frames too
small for that the segment is centred and the shape may leave the frame partly.

Pixels are drawn with signed distance functions (in pixels) and a one-pixel linear edge ramp, which
anti-aliases edges and moves shapes smoothly by sub-pixel amounts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import torch
from attrs import validators as v

from dfm.domain.rng import stream_seed

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.15),
    "orange": (1.0, 0.55, 0.05),
    "yellow": (1.0, 1.0, 0.1),
    "green": (0.15, 1.0, 0.15),
    "cyan": (0.1, 1.0, 1.0),
    "blue": (0.2, 0.35, 1.0),
    "purple": (0.75, 0.25, 1.0),
    "white": (1.0, 1.0, 1.0),
}
"""Shape colours, RGB in ``[0, 1]``; every one has a channel at 1 (bright on any background)."""
BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "black": (0.0, 0.0, 0.0),
    "grey": (0.3, 0.3, 0.3),
    "navy": (0.05, 0.08, 0.35),
    "brown": (0.3, 0.17, 0.05),
    "teal": (0.02, 0.25, 0.25),
}
"""Background colours, RGB in ``[0, 1]``: all dim (no channel above 0.35); drawn with a vertical ramp
from 60 % brightness at the top to 100 % at the bottom."""
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")
"""Shapes; all fit in a circle of the spec's radius (the triangle's tip reaches 1.1 x radius)."""
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Unit motion ``(dx, dy)`` in image coordinates (``y`` grows downwards)."""
TRAVEL: dict[str, float] = {"slowly": 0.25, "quickly": 0.5}
"""Distance the centre travels from the first to the last frame, as a fraction of the frame extent."""
RADIUS_RANGE: tuple[float, float] = (0.14, 0.19)
"""Shape radius, as a fraction of ``min(height, width)``, drawn uniformly."""
MARGIN = 1.1
"""Distance kept between a centre and the frame border, in shape radii."""

CAPTION_STREAM = 0x5EEDC11B
"""Stream id (:func:`dfm.domain.rng.stream_seed`) of the attribute draws; outside :class:`~dfm.domain.rng.Stream`."""
DATA_STEP = -1
"""Step slot of data streams: the data order does not depend on the step, only on the sample index."""

_FIXED_WORDS: tuple[str, ...] = ("a", "an", "moving", "on", "background")


def all_attribute_values() -> dict[str, tuple[str, ...]]:
    """Every value each categorical attribute takes (``background`` only when backgrounds are enabled)."""
    return {
        "shape": SHAPES,
        "colour": tuple(COLOURS),
        "direction": tuple(DIRECTIONS),
        "speed": tuple(TRAVEL),
        "background": tuple(BACKGROUNDS),
    }


VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(_FIXED_WORDS + tuple(w for values in all_attribute_values().values() for w in values))
)
"""Every word a caption may use, without repeats, in a fixed order."""


def _unit_interval(_inst: object, attr: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name} must lie in [0, 1], got {value!r}")


@attrs.frozen(kw_only=True)
class VideoSpec:
    """What one synthetic clip shows; independent of the size it is rendered at."""

    shape: str = attrs.field(validator=v.in_(SHAPES))
    """One of :data:`SHAPES`."""
    colour: str = attrs.field(validator=v.in_(tuple(COLOURS)))
    """One of :data:`COLOURS`."""
    direction: str = attrs.field(validator=v.in_(tuple(DIRECTIONS)))
    """One of :data:`DIRECTIONS`."""
    speed: str = attrs.field(validator=v.in_(tuple(TRAVEL)))
    """One of :data:`TRAVEL` (the caption word itself: ``slowly`` or ``quickly``)."""
    background: str | None = attrs.field(default=None, validator=v.optional(v.in_(tuple(BACKGROUNDS))))
    """One of :data:`BACKGROUNDS`, named in the caption; ``None``: plain black, not named."""
    radius: float = attrs.field(default=0.16, validator=v.and_(v.gt(0.0), v.le(0.5)))
    """Shape radius as a fraction of ``min(height, width)``."""
    start_along: float = attrs.field(default=0.5, validator=_unit_interval)
    """Where the travelled segment lies within its allowed range along the motion axis (0: first possible)."""
    start_across: float = attrs.field(default=0.5, validator=_unit_interval)
    """Where the centre lies within its allowed range across the motion axis (0: top or left)."""

    @property
    def caption(self) -> str:
        """The caption, following the grammar in the module docstring."""
        article = "an" if self.colour[0] in "aeiou" else "a"
        text = f"{article} {self.colour} {self.shape} moving {self.direction} {self.speed}"
        return text if self.background is None else f"{text} on a {self.background} background"


def describe(
    index: int,
    seed: int,
    *,
    background: bool = False,
    placement: float = 1.0,
    radius: tuple[float, float] = RADIUS_RANGE,
) -> VideoSpec:
    """The clip of global sample ``index``: a function of ``(seed, index)`` only.

    Args:
        index: Global sample index (non-negative).
        seed: The data seed.
        background: Draw and name a background colour; otherwise the background is plain black.
            The other attributes do not depend on this flag.
        placement: How far the start position varies, as a fraction of the free range centred on its
            middle: 1.0 anywhere the shape stays inside the frame, 0.0 always centred (the clip is then a
            function of its caption and radius alone, which a small model learns much sooner).
        radius: ``(low, high)`` range of the shape radius, fractions of ``min(height, width)``.
    """
    if index < 0:
        raise ValueError(f"sample index must be non-negative, got {index}")
    if not 0.0 <= placement <= 1.0:
        raise ValueError(f"placement must lie in [0, 1], got {placement!r}")
    if not 0.0 < radius[0] <= radius[1] <= 0.5:
        raise ValueError(f"radius must be a range (low, high) with 0 < low <= high <= 0.5, got {radius!r}")
    g = torch.Generator(device="cpu")
    g.manual_seed(stream_seed(seed, DATA_STEP, index, CAPTION_STREAM))
    values = all_attribute_values()
    picks = {name: opts[int(torch.randint(len(opts), (), generator=g))] for name, opts in values.items()}
    u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    low, high = radius
    return VideoSpec(
        shape=picks["shape"],
        colour=picks["colour"],
        direction=picks["direction"],
        speed=picks["speed"],
        background=picks["background"] if background else None,
        radius=low + (high - low) * u[0],
        start_along=0.5 + placement * (u[1] - 0.5),
        start_across=0.5 + placement * (u[2] - 0.5),
    )


def render(spec: VideoSpec, frames: int, height: int, width: int) -> torch.Tensor:
    """Draw one clip: ``[3, frames, height, width]`` float32 in ``[-1, 1]`` (see :func:`render_batch`)."""
    return render_batch([spec], frames, height, width)[0]


def render_batch(specs: Sequence[VideoSpec], frames: int, height: int, width: int) -> torch.Tensor:
    """Draw clips together: ``[B, 3, frames, height, width]`` float32 in ``[-1, 1]``.

    Args:
        specs: What each clip shows.
        frames: Frames ``T`` (>= 1); the shape travels its whole distance from frame 0 to frame ``T - 1``.
        height: Frame height ``H`` in pixels (>= 4).
        width: Frame width ``W`` in pixels (>= 4).

    Raises:
        ValueError: the size is too small.
    """
    _check_size(frames, height, width)
    if not specs:
        return torch.empty((0, 3, frames, height, width))
    cov = coverage(specs, frames, height, width)[:, None]  # [B, 1, T, H, W]
    colour = torch.tensor([COLOURS[s.colour] for s in specs])[:, :, None, None, None]
    bg = _background(specs, height, width)  # [B, 3, 1, H, W]
    return (bg + (colour - bg) * cov) * 2.0 - 1.0


def first_frame(spec: VideoSpec, height: int, width: int) -> torch.Tensor:
    """The clip's first frame as uint8 ``[height, width, 3]`` (it does not depend on the clip's frame count), rounded
    as the synthetic source rounds the frame its image-to-video samples are conditioned on."""
    frame = render_batch([spec], 1, height, width)[0, :, 0]  # [3, H, W] in [-1, 1]
    return ((frame + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)


def coverage(specs: Sequence[VideoSpec], frames: int, height: int, width: int) -> torch.Tensor:
    """Fraction of each pixel the shape covers, ``[B, frames, height, width]`` in ``[0, 1]``."""
    _check_size(frames, height, width)
    cx, cy, r = _centres(specs, frames, height, width)  # [B, T], [B, T], [B]
    px = (torch.arange(width) + 0.5)[None, None, None, :] - cx[:, :, None, None]  # [B, T, 1, W]
    py = (torch.arange(height) + 0.5)[None, None, :, None] - cy[:, :, None, None]  # [B, T, H, 1]
    out = torch.zeros((len(specs), frames, height, width))
    for shape, sdf in _SDFS.items():
        idx = torch.tensor([i for i, s in enumerate(specs) if s.shape == shape], dtype=torch.long)
        if idx.numel():
            dist = sdf(px[idx], py[idx], r[idx][:, None, None, None])
            out[idx] = (0.5 - dist).clamp(0.0, 1.0)
    return out


def _check_size(frames: int, height: int, width: int) -> None:
    if frames < 1 or height < 4 or width < 4:
        raise ValueError(f"synthetic clips need frames >= 1 and height, width >= 4; got {frames}x{height}x{width}")


def _centres(
    specs: Sequence[VideoSpec], frames: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre ``x, y`` per frame ``[B, T]`` and radius ``[B]``, in pixels."""
    progress = torch.linspace(0.0, 1.0, frames) if frames > 1 else torch.zeros(1)
    xs, ys, rs = [], [], []
    for s in specs:
        r = s.radius * min(height, width)
        dx, dy = DIRECTIONS[s.direction]
        along_extent, across_extent = (width, height) if dx else (height, width)
        travel = TRAVEL[s.speed] * along_extent
        low = _place(s.start_along, r * MARGIN, along_extent - r * MARGIN - travel, (along_extent - travel) / 2)
        start = low if dx + dy > 0 else low + travel
        along = start + (dx + dy) * travel * progress
        across = torch.full_like(progress, _place(s.start_across, r * MARGIN, across_extent - r * MARGIN))
        xs.append(along if dx else across)
        ys.append(across if dx else along)
        rs.append(r)
    return torch.stack(xs), torch.stack(ys), torch.tensor(rs)


def _place(u: float, low: float, high: float, fallback: float | None = None) -> float:
    """``low + u (high - low)``; the midpoint (or ``fallback``) when the range is empty."""
    if high < low:
        return (low + high) / 2 if fallback is None else fallback
    return low + u * (high - low)


def _background(specs: Sequence[VideoSpec], height: int, width: int) -> torch.Tensor:
    """Background image ``[B, 3, 1, H, W]`` in ``[0, 1]``: the colour under a vertical brightness ramp."""
    colour = torch.tensor([BACKGROUNDS[s.background or "black"] for s in specs])
    ramp = 0.6 + 0.4 * (torch.arange(height) + 0.5) / height  # [H]
    return (colour[:, :, None, None] * ramp[None, None, :, None]).expand(-1, -1, -1, width)[:, :, None]


# Signed distance functions (negative inside), in pixels, of shapes centred at the origin -------------


def _sdf_circle(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(px * px + py * py) - r


def _sdf_box(px: torch.Tensor, py: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    qx, qy = px.abs() - hx, py.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sdf_square(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return _sdf_box(px, py, 0.85 * r, 0.85 * r)


def _sdf_cross(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return torch.minimum(_sdf_box(px, py, r, 0.35 * r), _sdf_box(px, py, 0.35 * r, r))


def _sdf_ring(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (torch.sqrt(px * px + py * py) - 0.7 * r).abs() - 0.3 * r


def _sdf_triangle(px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Equilateral triangle pointing up, centroid at the origin, circumradius ``1.1 r`` (Quilez's SDF)."""
    k = math.sqrt(3.0)
    half_side = 1.1 * r * k / 2
    x = px.abs() - half_side
    y = -py + half_side / k  # flip: image y grows downwards
    fold = x + k * y > 0
    x, y = torch.where(fold, (x - k * y) / 2, x), torch.where(fold, (-k * x - y) / 2, y)
    x = x - torch.minimum(torch.maximum(x, -2 * half_side), torch.zeros_like(x))
    return -torch.sqrt(x * x + y * y) * torch.sign(y)


_SDFS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "circle": _sdf_circle,
    "square": _sdf_square,
    "triangle": _sdf_triangle,
    "ring": _sdf_ring,
    "cross": _sdf_cross,
}
assert set(_SDFS) == set(SHAPES)
