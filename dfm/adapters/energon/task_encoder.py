"""The energon ``TaskEncoder`` of prepared dfm samples (:mod:`dfm.ports.samples`).

Pipeline (energon runs it in each loader worker): a ``CrudeWebdataset`` sample (a dict of raw member
bytes) -> :meth:`DfmTaskEncoder.cook` decodes ``tensors.safetensors`` and ``meta.json`` and checks them
-> shuffle buffer -> grouping by latent shape (:meth:`~DfmTaskEncoder.batch_group_criterion`, energon's
``GroupBatchDataset``: samples of different shapes never share a batch, nothing is padded but the text)
-> :meth:`DfmTaskEncoder.batch` stacks latents and pads text to ``text_len`` with a mask. For an
image-to-video model (``image_condition``) each sample's stored condition is checked and completed with its
frame mask, and the batch stacks the condition channels and image features too.

Bad samples (undecodable bytes, bad JSON, wrong shapes, and samples that cannot be read at all from a
truncated or corrupt shard, see :mod:`dfm.adapters.energon.reading`) raise :class:`BadSampleError` when
``strict``; otherwise they are skipped (energon's ``SkipSample``, or ``None`` from the reader) and
reported. The reports travel with the batches: each batch carries ``bad``, the samples its worker
skipped since its previous batch (``shard[index]`` -> reason), so the reader sees every one across
worker processes, prefetching and resumption, and can count each bad sample once however often energon
repeats the data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from megatron.energon import Batch as EnergonBatch
from megatron.energon import Cooker, Sample, SkipSample, TaskEncoder, reraise_exception, stateless
from megatron.energon.worker import WorkerConfig

from dfm.adapters.energon.reading import guard_reads, sample_id
from dfm.adapters.formats.samples import decode_sample, pad_text, stack_condition
from dfm.domain.packing import balanced_packs
from dfm.ports.samples import FORMAT_VERSION, META, TENSORS, BadSampleError, ImageCondition

SUBFLAVOR = "dfm_format"
"""Subflavor that ``dataset.yaml`` of a prepared dataset declares (value :data:`FORMAT_VERSION`)."""
MAX_CONSECUTIVE_BAD = 100
"""Bad samples in a row after which a lenient reader gives up (the data set is likely broken)."""


@dataclasses.dataclass
class DecodedSample(Sample):
    """One checked sample: ``latents [C, F, H, W]`` and ``text [L, D]`` with ``L <= text_len``; image-to-video:
    the condition channels ``[T + C, F, H, W]`` and image features ``[n, R, D']`` (else ``None``)."""

    latents: torch.Tensor
    text: torch.Tensor
    caption: str
    condition: torch.Tensor | None
    image: torch.Tensor | None


@dataclasses.dataclass
class PackedSample(Sample):
    """Samples selected to run as one packed sequence (``data.packing``)."""

    samples: list[DecodedSample]


@dataclasses.dataclass
class RawBatch(EnergonBatch):
    """A micro-batch as it leaves a loader worker.

    Attributes:
        latents: ``[B, C, F, H, W]`` (one latent shape per batch); with packing a list of ``B`` latents
            ``[C, F_i, H_i, W_i]`` of any shapes.
        text: ``[B, S, D]`` zero-padded to ``S = text_len``.
        text_mask: ``[B, S]``, ``True`` on real tokens.
        captions: One caption per sample.
        condition: Image-to-video: the condition channels ``[B, T + C, F, H, W]``; else ``None``.
        image: Image-to-video: the image features ``[nB, R, D']``; else ``None``.
        bad: The bad samples the producing worker skipped since its previous batch: ``shard[index]`` ->
            what is wrong with it.
    """

    latents: torch.Tensor | list[torch.Tensor]
    text: torch.Tensor
    text_mask: torch.Tensor
    captions: list[str]
    condition: torch.Tensor | None
    image: torch.Tensor | None
    bad: dict[str, str]


def decode_members(
    tensors: Any,
    meta: Any,
    *,
    text_len: int,
    text_dim: int,
    where: str,
    image_condition: ImageCondition | None = None,
) -> dict[str, Any]:
    """Decode and check the two members of one sample (:func:`dfm.adapters.formats.samples.decode_sample`).

    Returns:
        ``{"latents", "text", "caption", "condition", "image"}`` (text cut to ``text_len`` tokens; the last two
        ``None`` without ``image_condition``).

    Raises:
        BadSampleError: Naming ``where``, for anything that does not match :mod:`dfm.ports.samples`.
    """
    sample = decode_sample(
        tensors, meta, text_len=text_len, text_dim=text_dim, where=where, image_condition=image_condition
    )
    return {
        "latents": sample.latents,
        "text": sample.text,
        "caption": sample.caption,
        "condition": sample.condition,
        "image": sample.image,
    }


class DfmTaskEncoder(TaskEncoder[DecodedSample, DecodedSample, RawBatch, RawBatch]):
    """Cooks prepared dfm samples and batches them by latent shape (see the module docstring).

    Args:
        text_len: Text tokens per batch row ``S`` (longer captions are cut).
        text_dim: Width ``D`` every sample's text must have.
        strict: Raise :class:`BadSampleError` on a bad sample instead of skipping it.
        pack_size: With packing, the samples of a pack: energon's packing buffer is handed to
            :meth:`select_samples_to_pack`, which forms packs of ``pack_size`` samples of any latent shapes
            with balanced token counts (largest first into the lightest pack); one pack is one micro-batch. ``None``: no
            packing, batches grouped by latent shape.
        image_condition: An image-to-video model's condition, which every sample must carry (a sample without one
            is a bad sample); ``None``: text-to-video. Not with packing.
    """

    decoder = None  # members stay raw bytes: the cooker decodes them

    def __init__(
        self,
        *,
        text_len: int,
        text_dim: int,
        strict: bool,
        pack_size: int | None = None,
        image_condition: ImageCondition | None = None,
    ) -> None:
        if pack_size is not None and image_condition is not None:
            raise ValueError("packed batches carry no image-to-video condition: packing takes text-to-video models")
        self.text_len, self.text_dim, self.strict, self.pack_size = text_len, text_dim, strict, pack_size
        self.image_condition = image_condition
        self.cookers = [Cooker(self.cook, has_subflavors={SUBFLAVOR: FORMAT_VERSION})]
        self._bad_since_batch: dict[str, str] = {}
        self._consecutive_bad = 0

    def build_cook_crude_sample(self, dataset: Any, **kwargs: Any) -> Any:
        """Energon's hook that cooks the raw samples; first routes read errors to :meth:`unreadable`."""
        guard_reads(dataset, self.unreadable)
        return super().build_cook_crude_sample(dataset, **kwargs)

    def unreadable(self, ident: str, where: str, exc: Exception) -> None:
        """A sample energon cannot read from its shard (truncated, corrupt or missing): raise or skip it."""
        reason = (
            f"{where} cannot be read ({type(exc).__name__}: {exc}); the shard is truncated or corrupt: "
            "prepare it again with `python -m dfm.app.prepare`"
        )
        self._record(ident, BadSampleError(reason))

    @stateless
    def cook(self, raw: dict[str, Any]) -> DecodedSample:
        """Decode one crude sample (member name -> bytes); skips or raises on a bad one."""
        ident, where = _origin(raw)
        try:
            fields = decode_members(
                raw.get(TENSORS),
                raw.get(META),
                text_len=self.text_len,
                text_dim=self.text_dim,
                where=where,
                image_condition=self.image_condition,
            )
        except BadSampleError as exc:
            self._record(ident, exc)
            raise SkipSample() from None
        self._consecutive_bad = 0
        base = {f.name: raw[f.name] for f in dataclasses.fields(Sample) if f.name in raw}
        return DecodedSample(**base, **fields)

    def _record(self, ident: str, exc: BadSampleError) -> None:
        """Raise ``exc`` when strict; else note the bad sample for the next batch (too many in a row raise)."""
        if self.strict:
            raise exc
        self._bad_since_batch[ident] = str(exc)
        self._consecutive_bad += 1
        if self._consecutive_bad >= MAX_CONSECUTIVE_BAD:
            raise BadSampleError(
                f"{self._consecutive_bad} bad samples in a row (last: {exc}); the data set looks broken. "
                "Prepare it again with `python -m dfm.app.prepare`."
            )

    def batch_group_criterion(self, sample: DecodedSample) -> tuple[str, None]:
        """Group key: the latent shape ``CxFxHxW`` (the batch size is the loader's); one group with packing."""
        if self.pack_size is not None:
            return "packed", None
        return "x".join(str(s) for s in sample.latents.shape), None

    def select_samples_to_pack(self, samples: list[DecodedSample]) -> list[list[DecodedSample]]:
        """Energon's pre-packing: packs of ``pack_size`` samples with balanced token counts (the latent
        volume ``F x H x W``, proportional to the tokens), largest first into the lightest pack
        (:func:`dfm.domain.packing.balanced_packs`)."""
        assert self.pack_size is not None
        sizes = [int(s.latents[0].numel()) for s in samples]
        return [[samples[i] for i in pack] for pack in balanced_packs(sizes, self.pack_size)]

    @stateless
    def pack_selected_samples(self, samples: list[DecodedSample]) -> PackedSample:
        """Energon's final packing: the selected samples, kept apart (the network packs their tokens)."""
        base = {f.name: getattr(samples[0], f.name) for f in dataclasses.fields(Sample)}
        base["__key__"] = "+".join(s.__key__ for s in samples)
        return PackedSample(**base, samples=list(samples))

    @stateless
    def batch(self, samples: list[DecodedSample] | list[PackedSample]) -> RawBatch:
        """Stack one shape group: latents ``[B, C, F, H, W]``, text padded to ``text_len`` with its mask.

        With packing, ``samples`` is one pack, whose latents stay a list."""
        if self.pack_size is not None:
            assert len(samples) == 1, "with packing a micro-batch is one pack"
            samples = samples[0].samples  # type: ignore[union-attr]
        text, mask = pad_text([s.text for s in samples], self.text_len)
        condition, image = stack_condition([s.condition for s in samples], [s.image for s in samples])
        bad, self._bad_since_batch = self._bad_since_batch, {}
        return RawBatch.from_samples(
            samples,
            latents=[s.latents for s in samples] if self.pack_size else torch.stack([s.latents for s in samples]),
            text=text,
            text_mask=mask,
            captions=[s.caption for s in samples],
            condition=condition,
            image=image,
            bad=bad,
        )


def _origin(raw: dict[str, Any]) -> tuple[str, str]:
    """``(identity, description)`` of a crude sample: ``shard[index]`` and ``sample 'key' (shard[index])``."""
    key = raw.get("__key__")
    for source in raw.get("__sources__") or ():
        shard = getattr(source, "shard_name", None)
        if shard is not None:
            ident = sample_id(shard, getattr(source, "index", "?"))
            return ident, f"sample {key!r} ({ident})"
    return f"{raw.get('__shard__', '?')}/{key}", f"sample {key!r}"


def worker_config(*, rank: int, world: int, num_workers: int, seed: int) -> WorkerConfig:
    """Energon's worker layout of one data-parallel rank; errors other than bad samples always propagate."""
    return WorkerConfig(
        rank=rank,
        world_size=world,
        num_workers=num_workers,
        seed_offset=seed,
        global_error_handler=reraise_exception,
    )
