"""``data.source: energon``: prepared webdataset shards read with megatron-energon.

Each data-parallel rank reads its own part of the shards (energon's ``WorkerConfig(rank=dp_rank,
world_size=dp_size)``; the tensor/context-parallel ranks of a data-parallel group share ``dp_rank`` and
so get the same samples), shuffled by energon (shard slices of ``max_samples_per_sequence`` samples, then
a buffer of ``shuffle_buffer`` samples, seeded by ``seed``), grouped into micro-batches of one latent
shape (:mod:`dfm.adapters.energon.task_encoder`), forever (energon repeats the data).

Sample indices (DESIGN.md rule 2): with global batch ``G``, micro-batch ``m`` and ``W`` ranks, the
``j``-th micro-batch of rank ``r`` at step ``k`` gets indices ``k G + r G / W + j m + [0, m)``: unique,
and the same position in the global stream under any layout. They key the per-sample noise; the data
order itself is energon's (a function of the seed and the layout).

Bad samples (undecodable, wrong shape, or unreadable from a truncated or corrupt shard) are skipped
with a warning naming the sample and its shard, or raise :class:`~dfm.ports.samples.BadSampleError` with
``strict``. :attr:`EnergonSource.skipped` counts distinct bad samples: energon repeats the data forever,
and a bad sample met again in a later pass is not counted again.

State: the position (``next_step``, ``next_micro``), the bad samples met (``bad_samples``, their
``shard[index]``; ``skipped`` is their number) and energon's loader state of this rank converted to
JSON (:mod:`dfm.adapters.energon.state_codec`, no pickle). Loading it makes
the next batch exactly the one the saving run would have read next. The state is per rank: a checkpoint
must keep every data-parallel rank's state (``load_state_dict`` also accepts ``{"ranks": [state_0,
state_1, ...]}`` and picks its own).
"""

from __future__ import annotations

import json
import tarfile
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
import torch
import yaml
from megatron.energon import SavableDataLoader, get_savable_loader, get_train_dataset

from dfm.adapters.energon import state_codec
from dfm.adapters.energon.task_encoder import (
    SUBFLAVOR,
    DfmTaskEncoder,
    RawBatch,
    worker_config,
)
from dfm.adapters.formats.samples import check_first_sample, header_shapes
from dfm.domain.batch import Batch, BatchLayout, PackedBatch
from dfm.ports.samples import FORMAT_VERSION, TENSORS, TEXT, BadSampleError, ImageCondition

SOURCE = "energon"
PACK_BUFFER = 8
"""With packing, packs formed together from one buffer of samples (so their token totals can be balanced)."""
_LAYOUT_KEYS = ("seed", "global_batch_size", "micro_batch_size", "rank", "world", "packing")
_log = structlog.get_logger(__name__)


class EnergonSource:
    """This rank's micro-batches from a prepared energon dataset (see the module docstring).

    Args:
        path: Prepared dataset directory (shards + ``.nv-meta/``, as ``python -m dfm.app.prepare`` writes).
        global_batch_size: Samples per step over all ranks and micro-batches, ``G``.
        micro_batch_size: Samples per yielded batch, ``m``.
        seed: Data seed (energon's shuffling).
        rank: This data-parallel rank.
        world: Number of data-parallel ranks ``W``.
        text_len: Text tokens per batch row ``S`` (shorter captions padded, longer ones cut).
        text_dim: Width of the text embeddings; the data set's must match.
        num_workers: Energon loader worker processes (0: read in this process).
        shuffle_buffer: Samples in energon's shuffle buffer (0 or 1: no buffer shuffling).
        max_samples_per_sequence: Samples read in a row from one shard before jumping (energon's slices).
        strict: Raise :class:`~dfm.ports.samples.BadSampleError` on a bad sample (also one that cannot be
            read from its shard) instead of skipping and counting it.
        packing: Yield each micro-batch as one :class:`~dfm.domain.batch.PackedBatch`: ``micro_batch_size``
            samples of any latent shapes, run as one token sequence in which attention never crosses samples.
            Energon hands buffers of :data:`PACK_BUFFER` packs' worth of samples to
            :func:`~dfm.domain.packing.balanced_packs`, which balances the token counts of the packs.
        image_condition: An image-to-video model's condition: batches carry each sample's condition channels
            (its stored condition latents after the rebuilt frame mask) and image features; a sample without
            a fitting condition is a bad sample. ``None``: text-to-video (stored conditions are left aside).

    Raises:
        ValueError: ``path`` is not a prepared dfm data set, its text width is not ``text_dim``, its samples
            hold no image condition that fits ``image_condition``, ``image_condition`` with ``packing``, or the
            layout is invalid (``G`` not a multiple of ``m * W``...).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        text_len: int,
        text_dim: int,
        num_workers: int = 2,
        shuffle_buffer: int = 100,
        max_samples_per_sequence: int = 100,
        strict: bool = False,
        packing: bool = False,
        image_condition: ImageCondition | None = None,
    ) -> None:
        if packing and image_condition is not None:
            raise ValueError(
                "energon data source: packed batches carry no image-to-video condition; read image-to-video "
                "data without packing"
            )
        self.packing, self.image_condition = packing, image_condition
        self.layout = BatchLayout(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, world=world)
        self.layout.check_rank(rank)
        self.micro_batches_per_step = self.layout.micro_batches
        for name, value, low in (
            ("text_len", text_len, 1),
            ("text_dim", text_dim, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("max_samples_per_sequence", max_samples_per_sequence, 1),
        ):
            if value < low:
                raise ValueError(f"energon data source: {name} must be >= {low}, got {value}")
        self.path = Path(path)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.seed, self.rank, self.world = int(seed), rank, world
        self.text_len, self.text_dim, self.strict = text_len, text_dim, strict
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.max_samples_per_sequence = max_samples_per_sequence
        check_prepared(self.path, text_dim=text_dim, image_condition=image_condition)
        self.bad_samples: set[str] = set()
        """The bad samples this rank has skipped so far (``shard[index]``; over the run, carried by the state)."""
        self._next_step, self._next_micro = 0, 0
        self._loader: SavableDataLoader | None = None
        self._iterator: Iterator[RawBatch] | None = None
        self._pending: Any = None  # decoded energon state to restore when the loader is built
        self._finalizer: weakref.finalize | None = None

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch | PackedBatch:
        """The next micro-batch of this rank (a :class:`PackedBatch` of any shapes with ``packing``)."""
        if self._iterator is None:
            self._iterator = iter(self._build_loader())
        try:
            raw = next(self._iterator)
        except BadSampleError as exc:  # from a loader worker, torch wraps the message in the worker's traceback
            raise BadSampleError(worker_message(str(exc), BadSampleError)) from None
        self._note_bad(raw.bad)
        m = self.micro_batch_size
        assert len(raw.latents) == m, f"energon yielded a batch of {len(raw.latents)} samples, expected {m}"
        first = self.layout.first_index(self._next_step, self.rank, self._next_micro)
        self._next_micro += 1
        if self._next_micro == self.micro_batches_per_step:
            self._next_step, self._next_micro = self._next_step + 1, 0
        index = torch.arange(first, first + m, dtype=torch.int64)
        if self.packing:
            return PackedBatch(
                latents=tuple(raw.latents),
                text=raw.text,
                text_mask=raw.text_mask,
                sample_index=index,
                captions=tuple(raw.captions),
            )
        return Batch(
            latents=raw.latents,
            text=raw.text,
            text_mask=raw.text_mask,
            sample_index=index,
            captions=tuple(raw.captions),
            condition=raw.condition,
            image=raw.image,
        )

    @property
    def skipped(self) -> int:
        """Distinct bad samples this rank has skipped (one met again in a later pass over the data counts once)."""
        return len(self.bad_samples)

    def _note_bad(self, bad: Mapping[str, str]) -> None:
        """Count the bad samples a batch reports and warn about each one not met before."""
        for ident, reason in bad.items():
            if ident not in self.bad_samples:
                self.bad_samples.add(ident)
                _log.warning("bad sample skipped", sample=ident, reason=reason, skipped=self.skipped)

    def _build_loader(self) -> SavableDataLoader:
        m = self.micro_batch_size
        encoder = DfmTaskEncoder(
            text_len=self.text_len,
            text_dim=self.text_dim,
            strict=self.strict,
            pack_size=m if self.packing else None,
            image_condition=self.image_condition,
        )
        dataset = get_train_dataset(
            self.path,
            worker_config=worker_config(rank=self.rank, world=self.world, num_workers=self.num_workers, seed=self.seed),
            batch_size=1 if self.packing else m,  # with packing, one pack of m samples per micro-batch
            packing_buffer_size=PACK_BUFFER * m if self.packing else None,
            shuffle_buffer_size=self.shuffle_buffer,
            max_samples_per_sequence=self.max_samples_per_sequence,
            task_encoder=encoder,
        )
        self._loader = get_savable_loader(dataset)
        self._finalizer = weakref.finalize(self, _shutdown, self._loader)
        if self._pending is not None:
            self._loader.restore_state_rank(self._pending)
            self._pending = None
        return self._loader

    def state_dict(self) -> dict[str, Any]:
        """This rank's position (JSON-safe): step, micro-batch, skipped count and energon's loader state."""
        if self._loader is not None:
            loader = state_codec.encode(self._loader.save_state_rank())
        else:
            loader = None if self._pending is None else state_codec.encode(self._pending)
        return {
            "source": SOURCE,
            "path": str(self.path),
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "rank": self.rank,
            "world": self.world,
            "packing": self.packing,
            "next_step": self._next_step,
            "next_micro": self._next_micro,
            "skipped": self.skipped,
            "bad_samples": sorted(self.bad_samples),
            "loader": loader,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` (this rank's, or ``{"ranks": [...]}`` of all ranks) was taken.

        Raises:
            ValueError: The state is of another source or layout (seed, batch sizes, rank, world), or
                its loader state is not one this source wrote.
        """
        if "ranks" in state:
            ranks = state["ranks"]
            if not isinstance(ranks, list) or len(ranks) != self.world:
                raise ValueError(f"energon data state: 'ranks' must list the states of all {self.world} ranks")
            state = ranks[self.rank]
        missing = [k for k in ("source", *_LAYOUT_KEYS, "next_step", "next_micro", "loader") if k not in state]
        if missing:
            raise ValueError(f"energon data state lacks keys {missing}")
        if state["source"] != SOURCE:
            raise ValueError(f"cannot resume data: the checkpoint was written by data source {state['source']!r}")
        for key in _LAYOUT_KEYS:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume energon data: the checkpoint has {key}={state[key]!r} but this run has "
                    f"{key}={getattr(self, key)!r} (energon's loader state belongs to one layout)"
                )
        step, micro = int(state["next_step"]), int(state["next_micro"])
        if step < 0 or not 0 <= micro < self.micro_batches_per_step:
            raise ValueError(f"invalid data position next_step={step}, next_micro={micro}")
        try:
            pending = None if state["loader"] is None else state_codec.decode(state["loader"])
        except state_codec.StateCodecError as exc:
            raise ValueError(f"cannot resume energon data: {exc}") from None
        self.close()
        self._pending = pending
        self._next_step, self._next_micro = step, micro
        self.bad_samples = {str(ident) for ident in state.get("bad_samples", ())}

    def close(self) -> None:
        """Stop the loader's worker processes now (also done when the source is collected or at exit).

        Take :meth:`state_dict` first to continue later: a later ``next`` builds a fresh loader, starting
        from the loaded state not yet iterated, else from the beginning of the data.
        """
        if self._finalizer is not None:
            self._finalizer()
        self._iterator, self._loader, self._finalizer = None, None, None


def _shutdown(loader: SavableDataLoader) -> None:
    """Stop ``loader``'s workers now.

    Energon's workers run a command thread that only ends on a ``None`` command; without it each worker
    outlives torch's 5 s join timeout, so dropping a loader would stall ``5 s x num_workers``.
    """
    if loader.num_workers == 0:
        return
    for queue in getattr(loader, "cmd_queues", ()):
        queue.put((None,))
    epoch = getattr(loader, "_epoch_iterator", None)
    if epoch is not None:
        epoch.close()
    inner = getattr(loader, "_iterator", None)  # torch keeps the persistent workers' iterator here
    if inner is not None and hasattr(inner, "_shutdown_workers"):
        inner._shutdown_workers()
    loader._iterator = None


def worker_message(text: str, kind: type[Exception]) -> str:
    """The original message of a ``kind`` error that torch's data loader re-raised from a worker process.

    Torch re-raises ``Caught X in DataLoader worker process N.\nOriginal Traceback ...: message``; this
    returns ``message`` (``text`` unchanged when it is not such a wrapper).
    """
    if not text.startswith(f"Caught {kind.__name__} in DataLoader worker"):
        return text
    _, found, message = text.rpartition(f"{kind.__name__}: ")
    return message.strip() if found else text


def check_prepared(path: Path, *, text_dim: int | None = None, image_condition: ImageCondition | None = None) -> None:
    """Check that ``path`` is a prepared dfm data set (and, given ``text_dim``, that its text width matches; given
    ``image_condition``, that its samples hold an image condition that fits it).

    Raises:
        ValueError: What is missing or different, and how to fix it.
    """
    meta = path / ".nv-meta"
    if not (meta / "dataset.yaml").is_file() or not (meta / ".info.json").is_file():
        raise ValueError(
            f"{path} is not a prepared energon data set (no .nv-meta/dataset.yaml or .info.json); "
            "write one with `python -m dfm.app.prepare`"
        )
    declared = yaml.safe_load((meta / "dataset.yaml").read_text()) or {}
    subflavors = declared.get("subflavors") or {}
    if declared.get("__class__") != "CrudeWebdataset" or subflavors.get(SUBFLAVOR) != FORMAT_VERSION:
        raise ValueError(
            f"{meta / 'dataset.yaml'} must declare a CrudeWebdataset with subflavors {{{SUBFLAVOR}: {FORMAT_VERSION}}} "
            f"(dfm sample format {FORMAT_VERSION}); found {declared!r}. Prepare the data with this dfm."
        )
    if text_dim is not None or image_condition is not None:
        first = _first_tensors(path, json.loads((meta / ".info.json").read_text()).get("shard_counts", {}))
        check_first_sample(first, path, text_dim=text_dim, image_condition=image_condition)


def _first_tensors(path: Path, shard_counts: Mapping[str, int]) -> bytes | None:
    """The :data:`~dfm.ports.samples.TENSORS` bytes of the first sample (``None`` if unreadable)."""
    for shard, count in shard_counts.items():
        if count <= 0:
            continue
        try:
            with tarfile.open(path / shard) as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith("." + TENSORS):
                        data = tar.extractfile(member)
                        return data.read() if data is not None else b""
        except (tarfile.TarError, OSError, EOFError):
            continue  # an unreadable shard is reported (or skipped) when its samples are read
    return None


def text_width(tensors: bytes) -> int | None:
    """``D`` of the ``text`` tensor named in a safetensors header; ``None`` when the bytes are not readable.

    (A bad sample is skipped or raises when it is read; only a readable one can prove a mismatch.)
    """
    shape = (header_shapes(tensors) or {}).get(TEXT)
    return int(shape[1]) if shape is not None and len(shape) == 2 else None
