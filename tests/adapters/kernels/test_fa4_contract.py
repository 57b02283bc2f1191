"""What dfm's FA4 module changes on the way to flash-attn-4: strides of size-1 dimensions, nothing else."""

from __future__ import annotations

import torch

from dfm.adapters.kernels.fa4 import dense_strides


def test_a_size_one_dimension_with_stride_zero_becomes_a_view_of_the_same_memory() -> None:
    out = torch.empty_strided((1, 16, 4, 8), (0, 32, 8, 1))  # as torch's empty_like(query) gives it
    view = dense_strides(out)
    assert 0 not in view.stride() and view.data_ptr() == out.data_ptr() and view.shape == out.shape
    view.copy_(torch.arange(view.numel(), dtype=view.dtype).reshape(view.shape))  # FA4 writes the view ...
    assert torch.equal(out, torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape))  # ... torch reads out


def test_tensors_without_such_strides_and_other_values_pass_through() -> None:
    dense = torch.randn(2, 3, 4)
    broadcast = torch.randn(3, 1).expand(3, 5)  # a real broadcast (size 5, stride 0) is FA4's to refuse
    assert dense_strides(dense) is dense and dense_strides(broadcast) is broadcast
    assert dense_strides(None) is None and dense_strides(0.5) == 0.5
