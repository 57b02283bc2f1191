"""The ``CheckpointStore`` on torch Distributed Checkpoint (DCP), with atomic publish and verified loads.

Layout of a checkpoint root::

    root/
      step_0000100/          # one published checkpoint (layout version 2)
        tensors/             # the CheckpointIO's files: one safetensors file of chunks per rank
          shard-00001-model-00001-of-00001.safetensors ...
        state.json           # the state's plain values (step counters, optimizer settings...) by dotted key
        state.safetensors    # plain tensors the IO does not take (e.g. the RNG state under megatron), if any
        meta.json            # {"format", "version", "step", "meta": <the caller's JSON-safe meta>}
        manifest.json        # written last: every other file's path, size and sha256
      latest                 # text: "step_0000100", replaced atomically after publishing
      .tmp-step_0000200-ab12cd34/   # being written (or left by a crash; removed by a later save)

A save writes everything into a ``.tmp-*`` directory, fsyncs it, renames it to ``step_XXXXXXX`` and only
then moves the ``latest`` pointer, so a crash at any moment leaves the previous checkpoint loadable.
With a process group initialised, every rank calls ``save``/``load`` together (DCP is collective);
rank 0 alone writes ``meta.json``, the plain values, the manifest and the pointer, and every rank hashes
its own files. Nothing in a checkpoint is a pickle: loading one cannot run code. Checkpoints of layout
version 1 (DCP's pickled ``.metadata``, ``.distcp`` files) are read through the IO's refusing readers.
"""

from __future__ import annotations

import errno
import secrets
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import torch
from torch.distributed.checkpoint.api import CheckpointException

from dfm.adapters.checkpoint import _dcp_io, _layout, _plain, _tree
from dfm.adapters.checkpoint._layout import FileEntry, VerifyMode
from dfm.adapters.torch_dist.collectives import (
    RemoteRankError,
    is_distributed,
    on_every_rank,
    on_rank_zero,
    process_rank,
    world_size,
)
from dfm.ports.checkpoint import (
    CheckpointCandidate,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInfo,
    CheckpointIO,
)

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DCPCheckpointStore:
    """Checkpoints under ``root`` as DCP directories (implements the ``CheckpointStore`` port).

    Args:
        root: The run's checkpoint directory (created on the first save).
        keep_last: Keep this many checkpoints (by step, the one just written always kept); None keeps all.
        rank: This process's rank; rank 0 writes ``meta.json``/``manifest.json`` and publishes. Default:
            the ``torch.distributed`` rank when a process group is initialised, else 0.
        verify: What ``load`` checks of every file the manifest lists before loading: ``"size"`` or
            ``"hash"`` (size and sha256, about 1.4 GB/s per rank; each rank hashes its own files).
        io: How the tensors are written and read (default: torch DCP; the megatron runtime passes
            ``megatron.core.dist_checkpointing``'s).

    Raises:
        ValueError: For ``keep_last < 1``, a negative ``rank`` or an unknown ``verify``.
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int | None = None,
        rank: int | None = None,
        verify: VerifyMode = "hash",
        io: CheckpointIO | None = None,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 (or None to keep all), got {keep_last}")
        if rank is not None and rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        if verify not in get_args(VerifyMode):
            raise ValueError(f"verify must be one of {get_args(VerifyMode)}, got {verify!r}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.verify: VerifyMode = verify
        self._rank = rank
        self._io: CheckpointIO = io or _dcp_io.DCP_IO
        self._started = time.time()

    # ----------------------------------------------------------------------------------------- save

    def save(self, step: int, state: Mapping[str, Any], meta: Mapping[str, Any]) -> CheckpointInfo:
        """Writes ``state`` and ``meta`` as ``root/step_XXXXXXX`` and publishes it atomically.

        Collective: with a process group initialised, every rank calls it with its own ``state`` (plain
        tensors under the same key are taken as replicated; DTensors are saved sharded).

        Args:
            step: The optimizer step (>= 0); a checkpoint of the same step is replaced.
            state: Nested mappings of tensors and plain values (see ``_dcp_io`` for what DCP accepts).
            meta: JSON-safe values (config text, data-source state...), returned by ``load``.

        Returns:
            The published checkpoint.

        Raises:
            CheckpointError: For meta that is not JSON-safe, or any failure while writing (out of disk space
                included); the temp directory is removed and earlier checkpoints and ``latest`` are untouched.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        rank = self._this_rank()
        own: dict[str, _tree.Leaves] = {}

        def check() -> tuple[str, dict[str, Any], dict[str, Any]]:
            own["leaves"] = self._leaves(state)
            return (_layout.meta_document(step, meta), *_plain.encode(own["leaves"].plain))

        final = self.root / _layout.step_dir_name(step)
        tmp: Path | None = None
        try:
            checked = on_every_rank(check)
            meta_text, leaves = checked[rank][0], own["leaves"]
            tmp = Path(on_rank_zero(lambda: str(self._prepare(final.name, meta_text, checked)), rank=rank))
            self._io.save(leaves.engine, tmp / _layout.TENSORS)
            owned = on_every_rank(lambda: self._describe_own_files(tmp, rank))
            entries = [entry for per_rank in owned for entry in per_rank]
            on_rank_zero(lambda: self._publish(step, tmp, final, entries), rank=rank)
        except BaseException as exc:
            if rank == 0 and tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, Exception | CheckpointException):
                raise self._save_error(step, final, exc) from exc
            raise
        return CheckpointInfo(step=step, path=final)

    def _leaves(self, state: Mapping[str, Any]) -> _tree.Leaves:
        """``state``'s leaves, after checking its top-level keys."""
        _dcp_io.check_top_level_keys(state)
        return _tree.flatten(state, self._io.owns)

    def _prepare(self, name: str, meta_text: str, checked: list[tuple[str, dict[str, Any], dict[str, Any]]]) -> Path:
        """Rank 0: removes stale temp dirs, makes this save's temp dir, writes ``meta.json`` and the plain values.

        Every rank's plain values are kept; where ranks hold the same key, the lowest rank's value is (as DCP
        keeps one replica of a tensor all ranks hold).
        """
        values: dict[str, Any] = {}
        tensors: dict[str, Any] = {}
        for _, rank_values, rank_tensors in checked:
            values = rank_values | values
            tensors = rank_tensors | tensors
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale()
        tmp = self.root / f"{_layout.TMP_PREFIX}{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            _layout.write_durably(tmp / _layout.META, meta_text)
            _plain.write(tmp, values, tensors)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    def _remove_stale(self) -> None:
        """Deletes ``.tmp-*``/``.old-*`` entries older than this store (left by crashed or killed saves)."""
        for child in self.root.iterdir():
            if not child.name.startswith((_layout.TMP_PREFIX, _layout.OLD_PREFIX)):
                continue
            try:
                if child.lstat().st_mtime >= self._started:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
            except OSError:
                continue

    def _describe_own_files(self, tmp: Path, rank: int) -> list[FileEntry]:
        """Manifest entries (size, sha256) of the files this rank hashes: those it wrote itself."""
        size = world_size()
        return [
            _layout.describe(tmp, name) for name in _layout.data_files(tmp) if _layout.owner_rank(name, size) == rank
        ]

    def _publish(self, step: int, tmp: Path, final: Path, entries: list[FileEntry]) -> None:
        """Rank 0: writes the manifest, renames the temp dir to ``final``, moves ``latest``, prunes."""
        _layout.write_manifest(tmp, step, entries)
        _layout.fsync(tmp)
        aside = None
        if final.exists():
            aside = self.root / f"{_layout.OLD_PREFIX}{final.name}-{secrets.token_hex(4)}"
            final.rename(aside)
        try:
            tmp.rename(final)
        except BaseException:
            if aside is not None:
                aside.rename(final)
            raise
        _layout.fsync(self.root)
        _layout.write_pointer(self.root, final.name)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self._apply_retention(final)

    def _apply_retention(self, just_written: Path) -> None:
        """Deletes the oldest complete checkpoints beyond ``keep_last``, never ``just_written``."""
        if self.keep_last is None:
            return
        others = [directory for _, directory in _layout.complete_checkpoints(self.root) if directory != just_written]
        doomed = others[: max(0, len(others) - (self.keep_last - 1))]
        for directory in doomed:
            aside = self.root / f"{_layout.OLD_PREFIX}{directory.name}-{secrets.token_hex(4)}"
            try:
                directory.rename(aside)
            except OSError as exc:
                warnings.warn(f"could not remove old checkpoint {directory}: {exc}", stacklevel=3)
                continue
            shutil.rmtree(aside, ignore_errors=True)

    def _save_error(self, step: int, final: Path, exc: BaseException) -> CheckpointError:
        """The CheckpointError for a failed save: what happened, where, and that older ones are intact."""
        found = _dcp_io.causes(exc)
        codes = {getattr(cause, "errno", None) for cause in found if isinstance(cause, OSError | RemoteRankError)}
        detail = _dcp_io.describe(exc)
        if codes & set(_NO_SPACE) or "No space left on device" in detail:
            head = f"out of disk space while writing checkpoint step {step} to {final}"
        elif any(isinstance(cause, OSError) for cause in found) or codes - {None}:
            head = f"could not write checkpoint step {step} to {final}"
        else:
            head = f"could not save checkpoint step {step} to {final}"
        previous = _layout.latest_in(self.root)
        tail = f"the previous checkpoint {previous[1].name} is intact" if previous else "no earlier checkpoint exists"
        return CheckpointError(f"{head}: {detail}; {tail}")

    # ----------------------------------------------------------------------------------------- load

    def load(self, where: CheckpointInfo | Path, state: dict[str, Any]) -> dict[str, Any]:
        """Verifies a checkpoint, then fills ``state`` in place from it (tensors copied into yours).

        Collective when a process group is initialised. Keys the checkpoint has but ``state`` lacks are
        skipped (load just the model, say); keys ``state`` has but the checkpoint lacks are an error.

        Args:
            where: A ``CheckpointInfo``, a checkpoint directory, or a checkpoint root (its latest is used).
            state: The structure to fill, with tensors of the right shapes.

        Returns:
            The ``meta`` given to ``save``.

        Raises:
            CheckpointError: When the checkpoint is missing, incomplete or corrupted (found before anything
                is loaded), or does not match ``state`` (listing the mismatched keys).
        """
        rank = self._this_rank()
        directory = Path(on_rank_zero(lambda: str(checkpoint_dir(where)), rank=rank))
        meta, version = on_every_rank(lambda: self._verified_meta(directory, state, rank))[rank]
        try:
            if version == _layout.LEGACY_VERSION:
                self._io.load_legacy(state, directory)
            else:
                self._load(state, directory)
        except (Exception, CheckpointException) as exc:
            raise self._load_error(directory, exc) from exc
        return meta

    def _load(self, state: dict[str, Any], directory: Path) -> None:
        """Loads a layout-version-2 checkpoint: the plain values are checked (on every rank) before the engine
        loads the tensors, and set only after it did."""
        own: dict[str, Any] = {}

        def resolve() -> None:
            leaves = self._leaves(state)
            stored = _plain.Stored(directory)
            found, problems = stored.resolve(leaves.plain)
            problems += [
                f"{key} is a tensor in the state but a plain value in the checkpoint"
                for key in leaves.engine
                if key in stored.values
            ]
            if problems:
                raise CheckpointError(f"checkpoint {directory} does not match the state to load: {'; '.join(problems)}")
            own.update(leaves=leaves, found=found)

        on_every_rank(resolve)
        leaves: _tree.Leaves = own["leaves"]
        loaded = self._io.load(leaves.engine, directory / _layout.TENSORS)
        for key, value in loaded.items():
            if value is not leaves.engine[key]:
                _tree.set_leaf(state, leaves.paths[key], value)
        for key, value in own["found"].items():
            current = leaves.plain[key]
            if isinstance(current, torch.Tensor) and isinstance(value, torch.Tensor):
                current.copy_(value)
            else:
                _tree.set_leaf(state, leaves.paths[key], value)

    def read_meta(self, where: CheckpointInfo | Path) -> dict[str, Any]:
        """The ``meta`` of a checkpoint without loading it; see the module-level ``read_meta``."""
        return read_meta(where)

    def _verified_meta(self, directory: Path, state: dict[str, Any], rank: int) -> tuple[dict[str, Any], int]:
        """Checks ``state``'s keys, every listed file's size (and this rank's files' hashes); returns
        ``meta.json``'s meta and the layout version."""
        _dcp_io.check_top_level_keys(state)
        size = world_size()
        for entry in _layout.read_manifest(directory):
            check_hash = self.verify == "hash" and _layout.owner_rank(entry.path, size) == rank
            found = _layout.problem(directory, entry, check_hash=check_hash)
            if found is not None:
                raise CheckpointCorruptError(found)
        return _layout.read_meta(directory), _layout.layout_version(directory)

    @staticmethod
    def _load_error(directory: Path, exc: BaseException) -> CheckpointError:
        """The CheckpointError for a failed ``dcp.load``."""
        found = _dcp_io.causes(exc)
        mismatch = next((cause for cause in found if isinstance(cause, _dcp_io.StateMismatchError)), None)
        if mismatch is not None:
            return CheckpointError(f"checkpoint {directory} does not match the state to load: {mismatch}")
        if any(isinstance(cause, OSError) for cause in found):
            return CheckpointError(f"could not read checkpoint {directory}: {_dcp_io.describe(exc)}")
        kind = CheckpointCorruptError if any(isinstance(c, CheckpointCorruptError) for c in found) else CheckpointError
        return kind(f"could not load checkpoint {directory}: {_dcp_io.describe(exc)}")

    # ------------------------------------------------------------------------------------- discover

    def latest(self) -> CheckpointInfo | None:
        """The checkpoint ``latest`` names if it is intact (sizes checked), else the newest intact one."""
        found = _layout.latest_in(self.root)
        return CheckpointInfo(step=found[0], path=found[1]) if found else None

    def candidates(self) -> list[CheckpointCandidate]:
        """The checkpoints a resume tries, in order: the one ``latest`` names, then older ones, newest first;
        each with what its manifest and file sizes show wrong (its hashes are checked when it is loaded)."""
        return [
            CheckpointCandidate(info=CheckpointInfo(step=step, path=path), problem=problem)
            for step, path, problem in _layout.candidates(self.root)
        ]

    def list(self) -> list[CheckpointInfo]:
        """Complete checkpoints (those with a manifest), oldest first; temp and partial dirs are skipped."""
        return [CheckpointInfo(step=step, path=path) for step, path in _layout.complete_checkpoints(self.root)]

    def _this_rank(self) -> int:
        """This process's rank, checked against the process group."""
        actual = process_rank()
        if self._rank is None:
            return actual
        if self._rank != actual:
            where = "the process group says" if is_distributed() else "no process group is initialised, so it is"
            raise ValueError(f"DCPCheckpointStore was given rank={self._rank} but {where} {actual}")
        return self._rank


def is_checkpoint_dir(path: Path) -> bool:
    """Whether ``path`` is one checkpoint's directory (named ``step_XXXXXXX`` or holding a manifest), not a root."""
    return (path / _layout.MANIFEST).exists() or _layout.parse_step(path.name) is not None


def checkpoint_dir(where: CheckpointInfo | Path) -> Path:
    """The checkpoint directory ``where`` names: itself, or the latest one when it is a checkpoint root.

    Raises:
        CheckpointError: When ``where`` does not exist or is a root without a complete checkpoint.
    """
    path = where.path if isinstance(where, CheckpointInfo) else Path(where)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if is_checkpoint_dir(path):
        return path
    found = _layout.latest_in(path)
    if found is None:
        raise CheckpointError(
            f"no complete checkpoint under {path}: expected a checkpoint directory (with "
            f"{_layout.MANIFEST}) or a root holding step_XXXXXXX checkpoint directories"
        )
    return found[1]


def read_meta(where: CheckpointInfo | Path) -> dict[str, Any]:
    """The ``meta`` saved with a checkpoint, without loading it (e.g. its config, to build the model first).

    Not collective, and checks only that the checkpoint is complete (``load`` verifies its files).

    Args:
        where: A ``CheckpointInfo``, a checkpoint directory, or a checkpoint root (its latest is used).

    Raises:
        CheckpointError: When there is no complete checkpoint at ``where`` or its ``meta.json`` is unreadable.
    """
    directory = checkpoint_dir(where)
    _layout.read_manifest(directory)
    return _layout.read_meta(directory)
