"""``data.source: hf_datasets``: prepared samples in a local Hugging Face dataset (or parquet files).

The dataset has the columns ``tensors.safetensors`` (bytes) and ``meta.json`` (string) of
:mod:`dfm.ports.samples` (:func:`~dfm.adapters.hf_datasets.convert.webdataset_to_hf` makes one from
prepared shards). It is read with ``datasets.load_from_disk`` (a ``save_to_disk`` directory) or as
parquet files (``datasets.load_dataset("parquet")``, offline).

Order (DESIGN.md rule 2): an endless stream of rows, epoch ``e`` being the permutation of the ``N`` rows
drawn from ``(seed, e)``. Global position ``p`` holds row ``perm_e[p mod N]`` with ``e = p div N``;
data-parallel rank ``r`` of ``W`` reads positions ``p = q W + r`` (``q = 0, 1, ...``), so within every
epoch the ranks read disjoint rows that together cover it. Each rank puts its rows into one bucket per
latent shape and yields a bucket when it holds ``micro_batch_size`` samples (shapes never mix, only text
is padded). Sample indices: micro-batch ``j`` of rank ``r`` at step ``k`` is ``k G + r G / W + j m + [0, m)``.

State (JSON-safe): ``position`` ``q``, the rows waiting in each bucket, the step/micro-batch position
and the bad rows met (``bad_rows``; ``skipped`` is their number). Loading it reproduces exactly the
batches the saving source would have yielded next. The state is per rank (ranks consume their streams
at different paces: buckets, bad rows): a checkpoint must keep every data-parallel rank's state
(``load_state_dict`` also accepts ``{"ranks": [state_0, state_1, ...]}`` and picks its own).

Bad rows are skipped with a warning and counted, or raise
:class:`~dfm.adapters.hf_datasets.samples.BadSampleError` when ``strict``. ``skipped`` is the number of
distinct bad rows this rank has met (the stream repeats the rows every epoch; a row counts once). A
file of the dataset that cannot be read at all (truncated, corrupt) is skipped with a warning at start,
or raises when ``strict`` (:func:`~dfm.adapters.hf_datasets.table.load_table`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import structlog
import torch

from dfm.adapters.formats.samples import check_first_sample
from dfm.adapters.hf_datasets.samples import BadSampleError, Decoded, decode_row, pad_text, stack_condition
from dfm.adapters.hf_datasets.table import read_table
from dfm.domain.batch import Batch, BatchLayout
from dfm.domain.rng import stream_seed
from dfm.ports.samples import TENSORS, ImageCondition

SOURCE = "hf_datasets"
ORDER_STREAM = 0x5EED0D3E
"""Stream id (:func:`dfm.domain.rng.stream_seed`) of the per-epoch row permutations."""
MAX_CONSECUTIVE_BAD = 100
"""Bad rows in a row after which a lenient reader gives up (the data set is likely broken)."""
_LAYOUT_KEYS = ("seed", "global_batch_size", "micro_batch_size", "rank", "world", "num_rows")
_log = structlog.get_logger(__name__)


class HFDatasetSource:
    """This rank's micro-batches from a local Hugging Face dataset of prepared samples (module docstring).

    Args:
        path: ``save_to_disk`` directory, parquet file, or directory of parquet files.
        global_batch_size: Samples per step over all ranks and micro-batches, ``G``.
        micro_batch_size: Samples per yielded batch, ``m``.
        seed: Data seed (row order).
        rank: This data-parallel rank.
        world: Number of data-parallel ranks ``W``.
        text_len: Text tokens per batch row ``S`` (shorter captions padded, longer ones cut).
        text_dim: Width of the text embeddings; the data set's must match.
        strict: Raise :class:`~dfm.adapters.hf_datasets.samples.BadSampleError` on a bad row (or a file
            that cannot be read) instead of skipping and counting it.
        image_condition: An image-to-video model's condition: batches carry each sample's condition channels
            (its stored condition latents after the rebuilt frame mask) and image features; a row without a
            fitting condition is a bad row. ``None``: text-to-video (stored conditions are left aside).

    Raises:
        ValueError: Unreadable data set (with ``strict``, any unreadable file: a ``BadSampleError``), text
            width other than ``text_dim``, rows without an image condition that fits ``image_condition``, or an
            invalid layout.
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
        strict: bool = False,
        image_condition: ImageCondition | None = None,
    ) -> None:
        layout = BatchLayout(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, world=world)
        layout.check_rank(rank)
        self.micro_batches_per_step = layout.micro_batches
        if text_len < 1 or text_dim < 1:
            raise ValueError(f"hf_datasets data source: text_len and text_dim must be >= 1, got {text_len}, {text_dim}")
        self.path = Path(path)
        self.table, self.unreadable_files = read_table(self.path, strict=strict)
        """The rows of the readable files; ``unreadable_files``: those skipped (truncated, corrupt)."""
        self.num_rows = len(self.table)
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.seed, self.rank, self.world = int(seed), rank, world
        self.text_len, self.text_dim, self.strict = text_len, text_dim, strict
        self.image_condition = image_condition
        check_first_sample(self.table[0][TENSORS], self.path, text_dim=text_dim, image_condition=image_condition)
        self.bad_rows: set[int] = set()
        """The bad rows this rank has skipped so far (over the run, carried through the state)."""
        self._position = 0  # q: next position in this rank's stream
        self._buckets: dict[str, list[tuple[int, Decoded]]] = {}
        self._next_step, self._next_micro = 0, 0
        self._consecutive_bad = 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.int64)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        """The next micro-batch of this rank."""
        m = self.micro_batch_size
        while True:
            row = self._row_at(self._position)
            self._position += 1
            sample = self._decode(row)
            if sample is None:
                continue
            bucket = self._buckets.setdefault(sample.shape_key, [])
            bucket.append((row, sample))
            if len(bucket) == m:
                del self._buckets[sample.shape_key]
                return self._batch([s for _, s in bucket])

    def _row_at(self, q: int) -> int:
        """Row of this rank's stream position ``q`` (global position ``q W + r``)."""
        p = q * self.world + self.rank
        epoch, i = divmod(p, self.num_rows)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(stream_seed(self.seed, epoch, 0, ORDER_STREAM))
            self._perm_epoch, self._perm = epoch, torch.randperm(self.num_rows, generator=g)
        return int(self._perm[i])

    def _decode(self, row: int) -> Decoded | None:
        where = f"{self.path} row {row}"
        try:
            sample = decode_row(
                self.table[row],
                text_len=self.text_len,
                text_dim=self.text_dim,
                where=where,
                image_condition=self.image_condition,
            )
        except BadSampleError as exc:
            if self.strict:
                raise
            self._consecutive_bad += 1
            if row not in self.bad_rows:
                self.bad_rows.add(row)
                _log.warning("bad sample skipped", error=str(exc), skipped=self.skipped)
            if self._consecutive_bad >= MAX_CONSECUTIVE_BAD:
                raise BadSampleError(
                    f"{self._consecutive_bad} bad rows in a row (last: {exc}); the data set looks broken"
                ) from None
            return None
        self._consecutive_bad = 0
        return sample

    def _batch(self, samples: list[Decoded]) -> Batch:
        m, first = self.micro_batch_size, self._first_index()
        self._next_micro += 1
        if self._next_micro == self.micro_batches_per_step:
            self._next_step, self._next_micro = self._next_step + 1, 0
        text, mask = pad_text([s.text for s in samples], self.text_len)
        condition, image = stack_condition([s.condition for s in samples], [s.image for s in samples])
        return Batch(
            latents=torch.stack([s.latents for s in samples]),
            text=text,
            text_mask=mask,
            sample_index=torch.arange(first, first + m, dtype=torch.int64),
            captions=tuple(s.caption for s in samples),
            condition=condition,
            image=image,
        )

    def _first_index(self) -> int:
        g, w, m = self.global_batch_size, self.world, self.micro_batch_size
        return self._next_step * g + self.rank * (g // w) + self._next_micro * m

    @property
    def skipped(self) -> int:
        """Distinct bad rows this rank has skipped (a row met again in a later epoch counts once)."""
        return len(self.bad_rows)

    @property
    def epoch(self) -> int:
        """Epoch of the next position this rank reads."""
        return (self._position * self.world + self.rank) // self.num_rows

    def state_dict(self) -> dict[str, Any]:
        """The position (JSON-safe): stream position, rows waiting in buckets, step and micro-batch."""
        return {
            "source": SOURCE,
            "path": str(self.path),
            **{key: getattr(self, key) for key in _LAYOUT_KEYS},
            "epoch": self.epoch,
            "position": self._position,
            "buckets": [[key, [row for row, _ in bucket]] for key, bucket in self._buckets.items()],
            "next_step": self._next_step,
            "next_micro": self._next_micro,
            "skipped": self.skipped,
            "bad_rows": sorted(self.bad_rows),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` (this rank's, or ``{"ranks": [...]}`` of all ranks) was taken.

        Raises:
            ValueError: The state is of another source or layout (seed, batch sizes, rank, world, rows).
        """
        if "ranks" in state:
            ranks = state["ranks"]
            if not isinstance(ranks, list) or len(ranks) != self.world:
                raise ValueError(f"hf_datasets data state: 'ranks' must list the states of all {self.world} ranks")
            state = ranks[self.rank]
        missing = [
            k for k in ("source", *_LAYOUT_KEYS, "position", "buckets", "next_step", "next_micro") if k not in state
        ]
        if missing:
            raise ValueError(f"hf_datasets data state lacks keys {missing}")
        if state["source"] != SOURCE:
            raise ValueError(f"cannot resume data: the checkpoint was written by data source {state['source']!r}")
        for key in _LAYOUT_KEYS:
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume hf_datasets data: the checkpoint has {key}={state[key]!r} "
                    f"but this run has {key}={getattr(self, key)!r}"
                )
        step, micro = int(state["next_step"]), int(state["next_micro"])
        if step < 0 or not 0 <= micro < self.micro_batches_per_step or int(state["position"]) < 0:
            raise ValueError(f"invalid data position {state['position']}, next_step={step}, next_micro={micro}")
        buckets: dict[str, list[tuple[int, Decoded]]] = {}
        for key, rows in state["buckets"]:
            decoded = [(int(r), self._decode(int(r))) for r in rows]
            buckets[str(key)] = [(r, s) for r, s in decoded if s is not None]
        self._buckets = buckets
        self._position, self._next_step, self._next_micro = int(state["position"]), step, micro
        self.bad_rows = {int(row) for row in state.get("bad_rows", ())}
