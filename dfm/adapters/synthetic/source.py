"""Data sources that need no data: procedural videos (the embedded default) and mock latents (benchmarks).

Sample -> rank -> micro-batch mapping (DESIGN.md rule 2). With global batch size ``G``, micro-batch
size ``m`` and ``W`` data-parallel ranks (``G`` divisible by ``m * W``; ``n = G / (m W)`` micro-batches
per rank and step), step ``k`` consumes global samples ``[k G, (k + 1) G)``:

- rank ``r`` takes the contiguous block ``[k G + r G / W, k G + (r + 1) G / W)``;
- its micro-batch ``j`` (``0 <= j < n``) is ``[k G + r G / W + j m, k G + r G / W + (j + 1) m)``.

So at every step the ranks hold disjoint samples whose union is the same global batch for any ``W``
and ``m``, and a sample's content is a function of ``(seed, global sample index)`` only: any layout
of the same global batch sees identical tensors. :class:`~dfm.domain.batch.BatchLayout` is that mapping.

Iteration yields this rank's micro-batches of step ``k`` in order (``j = 0 .. n - 1``), then those of
step ``k + 1``, forever. The state is ``{"next_step", "next_micro", ...}`` (JSON-safe, the same on every
rank between steps); a source that loads it yields exactly what the saving source would have yielded
next, also under another ``W`` or ``m`` as long as the state was taken between steps.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

import torch

from dfm.adapters.synthetic.codecs import HashTextEncoder, IdentityPixelCodec
from dfm.adapters.synthetic.videos import DATA_STEP, RADIUS_RANGE, describe, render_batch
from dfm.domain.batch import Batch, BatchLayout
from dfm.domain.diffusion.image_condition import condition_channels, condition_pixels, frame_mask
from dfm.domain.rng import stream_seed
from dfm.ports.codecs import ImageEncoder, LatentCodec, TextEncoder

MOCK_LATENT_STREAM = 0x5EED1A7E
"""Stream id of a mock sample's latents (outside :class:`~dfm.domain.rng.Stream`)."""
MOCK_TEXT_STREAM = 0x5EED7E47
"""Stream id of a mock sample's text embeddings."""
MOCK_CONDITION_STREAM = 0x5EEDC0DE
"""Stream of the condition channels of a mock image-to-video sample."""
MOCK_IMAGE_STREAM = 0x5EED1A6E
"""Stream of the image features of a mock image-to-video sample."""


@functools.cache
def _drawer() -> ThreadPoolExecutor:
    """The one background thread that draws mock batches ahead (torch's kernels run without the GIL)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="dfm-mock-data")


_STATE_KEYS = ("source", "seed", "global_batch_size", "micro_batch_size", "world", "next_step", "next_micro")


class _SteppedSource:
    """Layout, iteration and resumable state shared by the sources; subclasses build one batch."""

    source_name: ClassVar[str]

    def __init__(
        self, *, global_batch_size: int, micro_batch_size: int, seed: int, rank: int, world: int, start_step: int
    ) -> None:
        self.layout = BatchLayout(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, world=world)
        self.layout.check_rank(rank)
        self.micro_batches_per_step = self.layout.micro_batches
        if start_step < 0:
            raise ValueError(f"start_step must be non-negative, got {start_step}")
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.seed, self.rank, self.world = int(seed), rank, world
        self._next_step, self._next_micro = start_step, 0

    def batch_for_indices(self, indices: Sequence[int]) -> Batch:
        """The batch of the given global sample indices (a function of seed and indices only)."""
        raise NotImplementedError

    def _check_indices(self, indices: Sequence[int]) -> list[int]:
        ix = [int(i) for i in indices]
        if not ix or min(ix) < 0:
            raise ValueError(f"need at least one non-negative sample index, got {ix}")
        return ix

    def batches_for_step(self, step: int) -> list[Batch]:
        """This rank's micro-batches of ``step``, in order. Pure: does not move the iterator."""
        return [self.batch_for_indices(ix) for ix in self._indices(step)]

    def _indices(self, step: int) -> list[list[int]]:
        return self.layout.sample_indices(step, self.rank)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        """The next micro-batch; the position advances past it."""
        indices = self._indices(self._next_step)[self._next_micro]
        self._next_micro += 1
        if self._next_micro == self.micro_batches_per_step:
            self._next_step, self._next_micro = self._next_step + 1, 0
        return self._batch(indices)

    def _batch(self, indices: list[int]) -> Batch:
        """:meth:`batch_for_indices` (subclasses may draw it ahead)."""
        return self.batch_for_indices(indices)

    def state_dict(self) -> dict[str, Any]:
        """The position (JSON-safe): next step and micro-batch, with the layout it refers to."""
        return {
            "source": self.source_name,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "world": self.world,
            "next_step": self._next_step,
            "next_micro": self._next_micro,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` was taken.

        Raises:
            ValueError: a key is missing, the state is of another source, seed or global batch size, or
                it was taken in the middle of a step under another micro-batch size or world size.
        """
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{self.source_name} data state lacks keys {missing}; expected keys {list(_STATE_KEYS)}")
        for key, mine in (
            ("source", self.source_name),
            ("seed", self.seed),
            ("global_batch_size", self.global_batch_size),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"cannot resume data: the checkpoint has {key}={state[key]!r} but this run has {key}={mine!r}"
                )
        step, micro = int(state["next_step"]), int(state["next_micro"])
        same_split = (state["micro_batch_size"], state["world"]) == (self.micro_batch_size, self.world)
        if micro and not same_split:
            raise ValueError(
                f"cannot resume data in the middle of step {step} (micro-batch {micro}) under another split: "
                f"saved micro_batch_size={state['micro_batch_size']}, world={state['world']}; "
                f"now {self.micro_batch_size}, {self.world}"
            )
        if step < 0 or not 0 <= micro < self.micro_batches_per_step:
            raise ValueError(f"invalid data position next_step={step}, next_micro={micro}")
        self._next_step, self._next_micro = step, micro


class SyntheticVideoSource(_SteppedSource):
    """Procedural captioned videos (:mod:`dfm.adapters.synthetic.videos`), encoded by a codec.

    Args:
        frames: Frames per clip.
        height: Frame height in pixels.
        width: Frame width in pixels.
        text_len: Text tokens per caption (padded or truncated), ``S``.
        global_batch_size: Samples per step over all ranks and micro-batches, ``G``.
        micro_batch_size: Samples per yielded batch, ``m``.
        seed: Data seed: sample ``i`` is a function of ``(seed, i)``.
        rank: This data-parallel rank.
        world: Number of data-parallel ranks ``W``.
        codec: Pixels -> latents; default :class:`IdentityPixelCodec` (latents are pixels).
        text_encoder: Captions -> embeddings; default :class:`HashTextEncoder` of width ``text_dim``.
        text_dim: Width of the default text encoder (64 when not given); must equal the encoder's ``dim``
            when both are given.
        background: Dim coloured backgrounds, named in captions; otherwise plain black.
        placement: How far start positions vary (see :func:`~dfm.adapters.synthetic.videos.describe`).
        radius: Range of shape radii (see :func:`~dfm.adapters.synthetic.videos.describe`).
        start_step: The step the iterator starts at.
        image_encoder: Image-to-video data: each clip's first frame conditions it (the condition channels of
            :mod:`dfm.domain.diffusion.image_condition`, encoded by ``codec``, and this encoder's features of the
            frame); ``None``: text-to-video.
    """

    source_name: ClassVar[str] = "synthetic"

    def __init__(
        self,
        *,
        frames: int,
        height: int,
        width: int,
        text_len: int,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        codec: LatentCodec | None = None,
        text_encoder: TextEncoder | None = None,
        text_dim: int | None = None,
        background: bool = False,
        placement: float = 1.0,
        radius: tuple[float, float] = RADIUS_RANGE,
        start_step: int = 0,
        image_encoder: ImageEncoder | None = None,
    ) -> None:
        super().__init__(
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            seed=seed,
            rank=rank,
            world=world,
            start_step=start_step,
        )
        describe(0, 0, placement=placement, radius=radius)  # validates the scene options
        if frames < 1 or height < 4 or width < 4 or text_len < 1:
            raise ValueError(
                f"need frames >= 1, height, width >= 4 and text_len >= 1; got frames={frames}, "
                f"height={height}, width={width}, text_len={text_len}"
            )
        if text_encoder is not None and text_dim is not None and text_encoder.dim != text_dim:
            raise ValueError(f"text_dim={text_dim} differs from the text encoder's dim={text_encoder.dim}")
        self.frames, self.height, self.width, self.text_len = frames, height, width, text_len
        self.codec: LatentCodec = codec if codec is not None else IdentityPixelCodec()
        self.text_encoder: TextEncoder = (
            text_encoder if text_encoder is not None else HashTextEncoder(dim=text_dim if text_dim else 64)
        )
        self.background, self.placement, self.radius = background, placement, (float(radius[0]), float(radius[1]))
        self.image_encoder = image_encoder

    def batch_for_indices(self, indices: Sequence[int]) -> Batch:
        """Render, encode and caption the given global samples."""
        ix = self._check_indices(indices)
        scene = {"background": self.background, "placement": self.placement, "radius": self.radius}
        specs = [describe(i, self.seed, **scene) for i in ix]
        captions = tuple(s.caption for s in specs)
        with torch.no_grad():
            pixels = render_batch(specs, self.frames, self.height, self.width)
            latents = self.codec.encode(pixels)
            condition, image = self._image_condition(pixels, latents) if self.image_encoder else (None, None)
        text, mask = self.text_encoder.encode(captions, self.text_len)
        if tuple(text.shape[:2]) != (len(ix), self.text_len):
            raise ValueError(
                f"text encoder returned embeddings of shape {tuple(text.shape)}, "
                f"expected [{len(ix)}, {self.text_len}, D]"
            )
        index = torch.tensor(ix, dtype=torch.int64)
        return Batch(
            latents=latents,
            text=text,
            sample_index=index,
            text_mask=mask,
            captions=captions,
            condition=condition,
            image=image,
        )

    def _image_condition(self, pixels: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The first frames' condition channels (as WanImageToVideoPipeline builds them) and image features."""
        assert self.image_encoder is not None
        first = pixels[:, :, 0]
        condition = self.codec.encode(condition_pixels(first, self.frames))
        mask = frame_mask(len(first), self.frames, tuple(latents.shape[-2:]), self.codec.latent_spec.temporal_stride)
        frames = ((first + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return condition_channels(mask, condition), self.image_encoder.encode(list(frames))


class MockLatentSource(_SteppedSource):
    """Random latents and text embeddings of any shape, for benchmarks (``data.source: mock``).

    Sample ``i`` holds standard normal latents ``[C, F, H, W]`` and text ``[S, D]`` drawn from generators
    seeded by ``(seed, i)``; every text token is real (mask all ``True``); no captions. For an image-to-video
    model, also standard normal condition channels ``[C', F, H, W]`` and image features (``image_shape``: rows
    per sample, ``[n, R, D]``, ``n = 2`` for first-last-frame).

    Args:
        latent_shape: ``(C, F, H, W)`` of one sample's latents.
        text_len: Text tokens ``S``.
        text_dim: Text width ``D``.
        global_batch_size: Samples per step over all ranks and micro-batches, ``G``.
        micro_batch_size: Samples per yielded batch, ``m``.
        seed: Data seed.
        rank: This data-parallel rank.
        world: Number of data-parallel ranks ``W``.
        start_step: The step the iterator starts at.
        condition_channels: Image-to-video: channels ``C'`` of the condition (frame mask and condition latents).
        image_shape: Image-to-video: ``(n, R, D)`` image features per sample.
    """

    source_name: ClassVar[str] = "mock"

    def __init__(
        self,
        *,
        latent_shape: Sequence[int],
        text_len: int,
        text_dim: int,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        start_step: int = 0,
        condition_channels: int | None = None,
        image_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__(
            global_batch_size=global_batch_size,
            micro_batch_size=micro_batch_size,
            seed=seed,
            rank=rank,
            world=world,
            start_step=start_step,
        )
        if (condition_channels is None) != (image_shape is None):
            raise ValueError("condition_channels and image_shape come together (image-to-video)")
        self.condition_channels, self.image_shape = condition_channels, image_shape
        shape = tuple(int(n) for n in latent_shape)
        if len(shape) != 4 or min(shape) < 1:
            raise ValueError(f"latent_shape must be four positive ints (C, F, H, W), got {tuple(latent_shape)}")
        if text_len < 1 or text_dim < 1:
            raise ValueError(f"text_len and text_dim must be >= 1, got {text_len}, {text_dim}")
        self.latent_shape, self.text_len, self.text_dim = shape, text_len, text_dim
        self._ahead: tuple[list[int], Future[Batch]] | None = None

    def _batch(self, indices: list[int]) -> Batch:
        """The batch of ``indices``, drawn on a background thread while the caller's step ran; the next position's
        batch is then started. Mock batches of a large micro-batch are costly to draw (128 x 32 x 4096 text numbers
        take ~0.1 s), and a benchmark's device should not wait for them. Batches and state are those of drawing in
        line: a batch is a function of its indices, and the position only moves in :meth:`__next__`."""
        ahead, self._ahead = self._ahead, None
        batch = ahead[1].result() if ahead is not None and ahead[0] == indices else self.batch_for_indices(indices)
        upcoming = self._indices(self._next_step)[self._next_micro]
        self._ahead = (upcoming, _drawer().submit(self.batch_for_indices, upcoming))
        return batch

    def batch_for_indices(self, indices: Sequence[int]) -> Batch:
        """Draw the given global samples."""
        ix = self._check_indices(indices)
        latents = torch.stack([torch.randn(self.latent_shape, generator=self._gen(i, MOCK_LATENT_STREAM)) for i in ix])
        shape = (self.text_len, self.text_dim)
        text = torch.stack([torch.randn(shape, generator=self._gen(i, MOCK_TEXT_STREAM)) for i in ix])
        mask = torch.ones((len(ix), self.text_len), dtype=torch.bool)
        condition = image = None
        if self.condition_channels is not None and self.image_shape is not None:
            c_shape = (self.condition_channels, *self.latent_shape[1:])
            condition = torch.stack([torch.randn(c_shape, generator=self._gen(i, MOCK_CONDITION_STREAM)) for i in ix])
            image = torch.cat([torch.randn(self.image_shape, generator=self._gen(i, MOCK_IMAGE_STREAM)) for i in ix])
        index = torch.tensor(ix, dtype=torch.int64)
        return Batch(latents=latents, text=text, sample_index=index, text_mask=mask, condition=condition, image=image)

    def _gen(self, index: int, stream: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(stream_seed(self.seed, DATA_STEP, index, stream))
        return g
