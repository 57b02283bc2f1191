"""Packed sequences on CUDA: per-sample attention segments on the fast kernels give each sample's own output."""

from __future__ import annotations

import pytest
import torch
from support.networks import tiny_network

from dfm.domain.packing import pad_text

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", ["wan", "dit"])
def test_packed_bf16_forward_on_cuda_equals_each_samples_own(kind: str) -> None:
    model = tiny_network(kind).to("cuda", torch.bfloat16)
    spec, g = model.spec, torch.Generator().manual_seed(3)
    shapes = [(2, 4, 6), (1, 6, 4), (3, 2, 2)]
    latents = [torch.randn(spec.in_channels, *s, generator=g).to("cuda", torch.bfloat16) for s in shapes]
    texts = [torch.randn(n, spec.text_dim, generator=g).to("cuda", torch.bfloat16) for n in (3, 5, 2)]
    scale = 1000.0 if kind == "wan" else 1.0
    t = (torch.rand(3, generator=g) * scale).to("cuda")
    text, mask = pad_text(texts)
    with torch.no_grad():
        packed = model.forward_packed(latents, t, text, mask)
        alone = [model(x[None], t[i : i + 1], texts[i][None])[0] for i, x in enumerate(latents)]
    for p, a in zip(packed, alone, strict=True):
        torch.testing.assert_close(p.float(), a.float(), rtol=2e-2, atol=2e-2)
