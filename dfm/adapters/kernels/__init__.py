"""Attention kernels from outside torch, put behind torch's own SDPA dispatch."""

from dfm.adapters.kernels.fa4 import FA4_HINT, activate_flash_attention_4

__all__ = ["FA4_HINT", "activate_flash_attention_4"]
