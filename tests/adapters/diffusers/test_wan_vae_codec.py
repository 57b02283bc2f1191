"""WanVAECodec against diffusers' AutoencoderKLWan on the same tiny weights (the oracle)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from support.pretrained import TINY_VAE_LATENTS_MEAN, TINY_VAE_LATENTS_STD, write_tiny_wan_vae

from dfm.adapters.diffusers import WanVAECodec
from dfm.domain.specs import LatentSpec
from dfm.ports.codecs import LatentCodec


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_wan_vae(tmp_path_factory.mktemp("vae") / "wan_vae", seed=0)


@pytest.fixture(scope="module")
def codec(vae_dir: Path) -> WanVAECodec:
    return WanVAECodec(vae_dir)


def _stats() -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, len(TINY_VAE_LATENTS_MEAN), 1, 1, 1)
    return torch.tensor(TINY_VAE_LATENTS_MEAN).view(shape), torch.tensor(TINY_VAE_LATENTS_STD).view(shape)


def _video(frames: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.rand((2, 3, frames, 16, 24), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_it_is_a_latent_codec_with_the_configs_spec_and_statistics(codec: WanVAECodec) -> None:
    assert isinstance(codec, LatentCodec)
    assert codec.latent_spec == LatentSpec(channels=4, temporal_stride=4, spatial_stride=8)
    assert codec.latents_mean == tuple(TINY_VAE_LATENTS_MEAN)
    assert codec.latents_std == tuple(TINY_VAE_LATENTS_STD)


def test_encode_is_the_normalised_posterior_mode_of_diffusers(codec: WanVAECodec, vae_dir: Path) -> None:
    x = _video()
    oracle = AutoencoderKLWan.from_pretrained(vae_dir).eval()
    mean, std = _stats()
    with torch.no_grad():
        expected = (oracle.encode(x).latent_dist.mode() - mean) / std
    got = codec.encode(x)
    assert got.shape == (2, 4, 2, 2, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_decode_is_diffusers_decode_of_the_unnormalised_latents(codec: WanVAECodec, vae_dir: Path) -> None:
    z = torch.randn((1, 4, 2, 2, 3), generator=torch.Generator().manual_seed(1))
    oracle = AutoencoderKLWan.from_pretrained(vae_dir).eval()
    mean, std = _stats()
    with torch.no_grad():
        expected = oracle.decode(z * std + mean).sample
    got = codec.decode(z)
    assert got.shape == (1, 3, 5, 16, 24)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.abs().max() <= 1.0


def test_a_model_root_and_its_vae_folder_load_the_same_codec(tmp_path: Path, vae_dir: Path) -> None:
    root = tmp_path / "Wan-Tiny"
    shutil.copytree(vae_dir, root / "vae")
    a, b = WanVAECodec(root), WanVAECodec(root / "vae")
    assert a.path == b.path == root / "vae"
    assert a.identity == b.identity and a.identity.startswith("Wan-Tiny/vae@")


def test_identity_is_stable_across_loads_and_differs_for_other_weights(
    codec: WanVAECodec, vae_dir: Path, tmp_path: Path
) -> None:
    assert WanVAECodec(vae_dir).identity == codec.identity
    assert codec.identity.startswith("wan_vae@") and len(codec.identity.split("@")[1]) == 12
    other = write_tiny_wan_vae(tmp_path / "wan_vae", seed=1)  # same name and config.json, other weights
    assert json.loads((other / "config.json").read_text()) == json.loads((vae_dir / "config.json").read_text())
    assert WanVAECodec(other).identity != codec.identity


def test_a_missing_directory_names_the_path_and_the_expected_layout(tmp_path: Path) -> None:
    where = tmp_path / "nope"
    with pytest.raises(ValueError) as info:
        WanVAECodec(where)
    assert str(info.value) == (
        f"{where} is not a WAN VAE directory: expected a diffusers AutoencoderKLWan directory (config.json + "
        "diffusion_pytorch_model.safetensors), or a model root holding one in vae/"
    )


def test_a_directory_of_another_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a WAN VAE directory"):
        WanVAECodec(tmp_path)


def test_frames_must_be_4n_plus_1_and_sizes_multiples_of_8(codec: WanVAECodec) -> None:
    with pytest.raises(ValueError) as info:
        codec.encode(_video(frames=4))
    assert str(info.value) == "WanVAECodec: videos must have 4n+1 frames (1, 5, 9, ...), got 4"
    with pytest.raises(ValueError, match=r"multiples of 8, got 16x20"):
        codec.encode(torch.zeros(1, 3, 1, 16, 20))
    with pytest.raises(ValueError, match=r"pixels must be a float tensor \[B, 3, T, H, W\], got \(1, 4, 1, 8, 8\)"):
        codec.encode(torch.zeros(1, 4, 1, 8, 8))


def test_unknown_device_and_dtype_are_value_errors(vae_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype 'float64'"):
        WanVAECodec(vae_dir, dtype="float64")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        WanVAECodec(vae_dir, device="tpu")


def test_tiling_is_switched_on_in_the_vae_and_weights_load_on_first_use(vae_dir: Path) -> None:
    tiled, plain = WanVAECodec(vae_dir, tiling=True), WanVAECodec(vae_dir)
    assert tiled._vae is None  # constructing reads config.json only
    assert tiled.vae.use_tiling and not plain.vae.use_tiling
