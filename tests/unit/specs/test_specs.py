"""Specs: named sizes, latent shapes and the errors a user sees for impossible shapes."""

from __future__ import annotations

import pytest

from dfm.domain.specs import DIT_XL, NAMED_SPECS, WAN_1_3B, WAN_14B, LatentSpec, WanSpec, num_tokens


def test_named_wan_sizes_match_the_published_configs() -> None:
    assert (WAN_1_3B.hidden_size, WAN_1_3B.num_layers, WAN_1_3B.ffn_dim) == (1536, 30, 8960)
    assert (WAN_14B.hidden_size, WAN_14B.num_layers, WAN_14B.ffn_dim) == (5120, 40, 13824)
    assert (DIT_XL.hidden_size, DIT_XL.num_layers) == (1152, 28)
    assert set(NAMED_SPECS) >= {"wan-1.3b", "wan-14b", "dit-s", "dit-b", "dit-l", "dit-xl"}


def test_latent_shape_rejects_frames_not_4n_plus_1() -> None:
    with pytest.raises(ValueError, match=r"frames-1=79 must be a non-negative multiple of 4"):
        LatentSpec().latent_shape(80, 480, 832)
    with pytest.raises(ValueError, match=r"height=470 must be a non-negative multiple of 8"):
        LatentSpec().latent_shape(81, 470, 832)


def test_num_tokens_rejects_latents_the_patch_does_not_divide() -> None:
    with pytest.raises(ValueError, match=r"not divisible by patch \(1, 2, 2\)"):
        num_tokens(WAN_1_3B, 21, 61, 104)


def test_spec_validators_name_the_field() -> None:
    with pytest.raises(ValueError, match="num_layers"):
        WanSpec(num_layers=0)
    with pytest.raises(ValueError, match="patch_size must be three positive ints"):
        WanSpec(patch_size=(1, 2))
