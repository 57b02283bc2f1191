"""``CheckpointIO`` on ``megatron.core.dist_checkpointing``, storing tensors in safetensors files (no pickle).

The megatron runtime's state holds ``ShardedTensor`` s keyed like the local runtime's DCP keys
(``runtime.model.<parameter name>``). This IO takes those leaves (the store keeps every plain value as
JSON) and runs them through megatron's own machinery — factories, sharding-integrity validation, the
conversion to torch ``ShardedTensor`` s, ``MCoreSavePlanner``/``MCoreLoadPlanner`` and strict key
checks — with DCP writing and reading through torch's safetensors storage layer instead of megatron's
pickle-based ``torch_dist`` files (``.metadata``, ``common.pt``). The safetensors shards are the same
kind the DCP store writes, so a megatron checkpoint's weights load into one process with the ``local``
runtime (``generate``, ``convert export``), and a checkpoint loads at another tensor/pipeline layout.

Checkpoints of dfm's layout version 1 (megatron's ``torch_dist`` backend) still load: their ``.metadata``
through the refusing unpickler of :mod:`dfm.adapters.torch_dist.dcp_storage`, ``common.pt`` with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedBase, ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.base import LoadCommonStrategy, SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    MCoreSavePlanner,
    TorchDistLoadShardedStrategy,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dfm.adapters.torch_dist.dcp_storage import (
    RefusingFileSystemReader,
    load_plain_value,
    safetensors_reader,
    safetensors_writer,
)
from dfm.ports.checkpoint import CheckpointError

BACKEND = "dfm_safetensors"
"""The ``sharded_backend`` megatron's ``metadata.json`` records for this IO's checkpoints."""
_LEGACY_BACKEND = "torch_dist"


def _fill(target: MutableMapping[Any, Any], loaded: Mapping[Any, Any]) -> None:
    """Replace ``target``'s leaves by ``loaded``'s in place (nested dicts and lists kept)."""
    for key, value in loaded.items():
        if isinstance(value, Mapping) and isinstance(target.get(key), MutableMapping):
            _fill(target[key], value)
        else:
            target[key] = value


class _SafetensorsSave(SaveShardedStrategy):
    """Megatron's ``torch_dist`` saving (main replicas only, torch ``ShardedTensor`` s, ``MCoreSavePlanner``)
    with DCP writing every rank's chunks into a safetensors file."""

    def __init__(self) -> None:
        super().__init__(BACKEND, 1)

    def save(self, sharded_state_dict: dict[str, Any], checkpoint_dir: Path | str) -> None:
        """Writes the sharded tensors of ``sharded_state_dict`` into ``checkpoint_dir``. Collective."""
        objects = [value.key for value in nested_values(sharded_state_dict) if isinstance(value, ShardedObject)]
        flattened = [
            value.key
            for value in nested_values(sharded_state_dict)
            if isinstance(value, ShardedTensor) and value.flattened_range is not None
        ]
        if objects or flattened:
            raise CheckpointError(
                "the megatron state holds entries the safetensors checkpoint cannot store "
                f"(ShardedObjects: {objects[:3]}, flattened ShardedTensors: {flattened[:3]})"
            )
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
        planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
        dcp.save(pyt_state_dict, storage_writer=safetensors_writer(Path(checkpoint_dir)), planner=planner)


class _ReaderLoad(TorchDistLoadShardedStrategy):
    """Megatron's ``TorchDistLoadShardedStrategy`` with the DCP reader chosen by dfm (its ``load`` below is
    megatron 0.16's with that one change: megatron's own reader unpickles ``.metadata``)."""

    def __init__(self, reader: Callable[[Path], FileSystemReader]) -> None:
        super().__init__()
        self._reader = reader

    def load(self, sharded_state_dict: dict[str, Any], checkpoint_dir: Path) -> dict[str, Any]:
        """Loads the sharded tensors of ``sharded_state_dict`` (any saved layout). Collective."""
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        mismatch_ok = {t.key: t for t in tensors if t.allow_shape_mismatch}
        strict_shapes = [t for t in tensors if not t.allow_shape_mismatch]
        original = sharded_state_dict
        flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict)
        pyt_state_dict = mcore_to_pyt_state_dict(flat, True)
        planner = MCoreLoadPlanner(
            shapes_validation_sharded_tensors=strict_shapes, allow_shape_mismatch_sharded_tensors=mismatch_ok
        )
        reader = self._reader(Path(checkpoint_dir))
        reader.read_metadata()  # a refused or unreadable index raises here, as itself
        dcp.load(pyt_state_dict, storage_reader=reader, planner=planner)
        loaded = {key: _unwrap_pyt_sharded_tensor(value) for key, value in pyt_state_dict.items()}
        loaded = _replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
        _restore_dict_types(loaded, original)
        return loaded

    def load_tensors_metadata(self, checkpoint_dir: Path, metadata: Any = None) -> dict[str, Any]:
        """Global shapes and dtypes of the checkpoint's tensors (for megatron's strict key checks)."""
        metadata = metadata or self._reader(Path(checkpoint_dir)).read_metadata()
        return {
            key: ShardedTensor.from_rank_offsets(
                key, torch.empty(stored.size, **stored.properties.__dict__, device="meta")
            ).without_data()
            for key, stored in metadata.state_dict_metadata.items()
            if isinstance(stored, TensorStorageMetadata)
        }

    def load_sharded_metadata(self, checkpoint_dir: Path) -> dict[str, Any]:
        """The checkpoint's tensors (dfm's megatron checkpoints hold no ``ShardedObject`` s)."""
        return self.load_tensors_metadata(checkpoint_dir)

    @property
    def can_handle_sharded_objects(self) -> bool:
        return False


class _NoCommon(LoadCommonStrategy):
    """The common part of a dfm megatron checkpoint: empty (the store keeps plain values as JSON)."""

    def load_common(self, checkpoint_dir: Path | str) -> dict[str, Any]:
        return {}

    def load_sharded_objects(self, sharded_objects_state_dict: Any, checkpoint_dir: Path | str) -> dict[str, Any]:
        if list(nested_values(sharded_objects_state_dict)):
            raise CheckpointError("dfm megatron checkpoints hold no ShardedObjects")
        return {}

    def load_sharded_metadata(self, checkpoint_dir: Path | str) -> dict[str, Any]:
        return {}

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True  # there are none: the sharded strategy never sees one

    def check_backend_compatibility(self, loaded_backend: str) -> None:
        pass

    def check_version_compatibility(self, loaded_version: int) -> None:
        pass


class _RefusingCommon(_NoCommon):
    """The ``common.pt`` of a layout-version-1 checkpoint, read with ``torch.load(weights_only=True)``."""

    def load_common(self, checkpoint_dir: Path | str) -> dict[str, Any]:
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        try:
            stream = path.open("rb")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {checkpoint_dir}: {COMMON_STATE_FNAME} is missing") from None
        with stream:
            loaded = load_plain_value(stream, f"{path.name} (megatron's common state)")  # type: ignore[arg-type]
        if not isinstance(loaded, dict):
            raise CheckpointError(f"checkpoint {checkpoint_dir}: {COMMON_STATE_FNAME} does not hold a dict")
        return loaded


class DistCheckpointIO:
    """Save and load megatron sharded state with ``dist_checkpointing`` into safetensors files (collective)."""

    def owns(self, value: object) -> bool:
        """Megatron's sharded leaves (``ShardedTensor``, factories...) are this IO's; plain values are the store's."""
        return isinstance(value, ShardedBase)

    def save(self, leaves: dict[str, Any], directory: Path) -> None:
        """Validates and writes the sharded ``leaves`` into ``directory`` (and megatron's ``metadata.json``)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        sharded, common = save_preprocess(dict(leaves), validate_access_integrity=True)
        assert not list(nested_values(common)), "only sharded leaves reach the megatron IO"
        strategy = _SafetensorsSave()
        strategy.save(sharded, directory)
        if dist.get_rank() == 0:
            save_config(CheckpointingConfig(strategy.backend, strategy.version), str(directory))
        dist.barrier()

    def load(self, leaves: dict[str, Any], directory: Path) -> dict[str, Any]:
        """The loaded value of each sharded leaf, by key (every key must be in the checkpoint)."""
        return dist_checkpointing.load(
            dict(leaves),
            str(directory),
            sharded_strategy=_ReaderLoad(safetensors_reader),
            common_strategy=_NoCommon(),
            strict="raise_unexpected",
        )

    def load_legacy(self, state: dict[str, Any], directory: Path) -> None:
        """Fills ``state`` from a layout-version-1 (``torch_dist``) checkpoint through refusing readers."""
        loaded = dist_checkpointing.load(
            state,
            str(directory),
            sharded_strategy=_ReaderLoad(RefusingFileSystemReader),
            common_strategy=_RefusingCommon(),
            strict="raise_unexpected",
        )
        _fill(state, loaded)
