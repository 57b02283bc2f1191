"""Checkpoints on torch Distributed Checkpoint (DCP): atomic publish, manifest-verified loads, retention."""

from dfm.adapters.checkpoint._layout import VerifyMode
from dfm.adapters.checkpoint.dcp_store import DCPCheckpointStore, checkpoint_dir, is_checkpoint_dir, read_meta

__all__ = ["DCPCheckpointStore", "VerifyMode", "checkpoint_dir", "is_checkpoint_dir", "read_meta"]
