"""Shared network layers against diffusers (as an oracle) and against closed forms."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.normalization import FP32LayerNorm as DiffusersFP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
from hypothesis import given, settings
from hypothesis import strategies as st

from dfm.domain.networks.layers import (
    FP32LayerNorm,
    PatchEmbed3d,
    apply_rope,
    patch_grid,
    rope_3d,
    rope_axis_dims,
    timestep_features,
    unpatchify,
)


@pytest.mark.parametrize("head_dim", [12, 16, 24, 64, 128])
@pytest.mark.parametrize("grid", [(1, 1, 1), (3, 6, 5), (5, 2, 10)])
def test_rope_3d_equals_diffusers_table(head_dim: int, grid: tuple[int, int, int]) -> None:
    ref = WanRotaryPosEmbed(head_dim, (1, 2, 2), max_seq_len=1024)
    f, h, w = grid
    ref_cos, ref_sin = ref(torch.zeros(1, 1, f, 2 * h, 2 * w))
    cos, sin = rope_3d(head_dim, grid)
    assert cos.shape == sin.shape == (f * h * w, head_dim)
    assert cos.dtype == sin.dtype == torch.float32
    assert torch.equal(cos, ref_cos.reshape(-1, head_dim))
    assert torch.equal(sin, ref_sin.reshape(-1, head_dim))


def test_rope_3d_beyond_any_fixed_table() -> None:
    cos, sin = rope_3d(12, (1, 1, 1500))
    assert cos.shape == (1500, 12)
    assert torch.allclose(cos**2 + sin**2, torch.ones_like(cos), atol=1e-6)


def test_rope_axis_split_follows_wan() -> None:
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(12) == (4, 4, 4)
    with pytest.raises(ValueError, match="even"):
        rope_axis_dims(13)


def _rotate_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Reference: pairs (x[2i], x[2i+1]) as complex numbers times exp(i angle)."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    rot = torch.complex(cos[..., 0::2].double(), sin[..., 0::2].double())
    return torch.view_as_real(z * rot).flatten(-2)


def test_apply_rope_is_complex_rotation_of_interleaved_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4 * 6 * 5, 16, generator=g)
    cos, sin = rope_3d(16, (4, 6, 5))
    out = apply_rope(x, cos, sin)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), _rotate_complex(x, cos, sin), rtol=1e-6, atol=1e-6)


def test_apply_rope_bf16_rotates_in_float32_and_returns_bf16() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 30, 12, generator=g).bfloat16()
    cos, sin = rope_3d(12, (2, 3, 5))
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, _rotate_complex(x.float(), cos, sin).float().bfloat16())


@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(0, 40), shift=st.integers(0, 40))
def test_rope_scores_depend_only_on_relative_position(m: int, n: int, shift: int) -> None:
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 12, generator=g, dtype=torch.float64).unbind(0)
    cos, sin = rope_3d(12, (1, 1, 81))
    cos, sin = cos.double(), sin.double()

    def score(i: int, j: int) -> torch.Tensor:
        qi = apply_rope(q[None, None, None], cos[i : i + 1], sin[i : i + 1])
        kj = apply_rope(k[None, None, None], cos[j : j + 1], sin[j : j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(m, n), score(m + shift, n + shift), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim", [16, 17, 256])
@pytest.mark.parametrize(("flip", "shift"), [(True, 0.0), (False, 1.0)])
def test_timestep_features_equal_diffusers(dim: int, flip: bool, shift: float) -> None:
    t = torch.tensor([0.0, 0.5, 17.25, 999.0])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert torch.equal(timestep_features(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift), expected)


def test_timestep_features_need_1d() -> None:
    with pytest.raises(ValueError, match="1-D"):
        timestep_features(torch.zeros(2, 1), 16)


@pytest.mark.parametrize("affine", [True, False])
def test_fp32_layer_norm_equals_diffusers_in_bf16(affine: bool) -> None:
    torch.manual_seed(3)
    ours, ref = FP32LayerNorm(24, 1e-6, elementwise_affine=affine), DiffusersFP32LayerNorm(24, 1e-6, affine)
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    ours, ref = ours.bfloat16(), ref.bfloat16()
    x = torch.randn(2, 5, 24).bfloat16()
    assert ours(x).dtype == torch.bfloat16
    assert torch.equal(ours(x), ref(x))


def _patchify(x: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """Reference patchify with per-token features ordered (pt, ph, pw, C)."""
    b, c, f, h, w = x.shape
    pt, ph, pw = patch
    x = x.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
    return x.reshape(b, (f // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 1, 3)])
def test_unpatchify_inverts_patchify(patch: tuple[int, int, int]) -> None:
    x = torch.randn(2, 3, 4, 6, 6)
    grid = patch_grid(4, 6, 6, patch)
    assert torch.equal(unpatchify(_patchify(x, patch), grid, patch, 3), x)


def test_patch_embed_is_linear_over_patches_in_row_major_order() -> None:
    torch.manual_seed(4)
    embed = PatchEmbed3d(3, 8, (1, 2, 2))
    assert set(embed.state_dict()) == {"weight", "bias"}
    x = torch.randn(2, 3, 2, 4, 6)
    tokens = embed(x)
    assert tokens.shape == (2, 2 * 2 * 3, 8)
    patches = _patchify(x, (1, 2, 2))  # features (pt, ph, pw, C); the conv kernel is (C, pt, ph, pw)
    weight = embed.weight.permute(0, 2, 3, 4, 1).reshape(8, -1)
    torch.testing.assert_close(tokens, patches @ weight.T + embed.bias, rtol=1e-5, atol=1e-5)


def test_patch_grid_rejects_indivisible_sizes() -> None:
    assert patch_grid(3, 6, 8, (1, 2, 2)) == (3, 3, 4)
    with pytest.raises(ValueError, match="not divisible"):
        patch_grid(3, 5, 8, (1, 2, 2))
