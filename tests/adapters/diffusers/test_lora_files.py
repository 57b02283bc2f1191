"""LoRA files: dfm's diffusers-format writer, the community namings diffusers' converters read, merging."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dfm.adapters.diffusers.lora import merge_adapters, read_lora_file, write_lora_file
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import WAN_TINY

RANK, ALPHA = 2, 6.0
ORIGINAL = {  # WAN's own module names (diffusion_model.* files) -> diffusers'
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    return dict(WanTransformer(WAN_TINY, generator=torch.Generator().manual_seed(0)).state_dict())


def _adapters(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Random ``A``, ``B`` (diffusers naming) for every attention and feed-forward linear of every block."""
    g, out = torch.Generator().manual_seed(1), {}
    for block in range(WAN_TINY.num_layers):
        for module in ORIGINAL.values():
            w = weights[f"blocks.{block}.{module}.weight"]
            out[f"blocks.{block}.{module}.lora_A.weight"] = torch.randn(RANK, w.shape[1], generator=g)
            out[f"blocks.{block}.{module}.lora_B.weight"] = torch.randn(w.shape[0], RANK, generator=g)
    return out


def test_written_files_read_back_with_the_scale_in_b(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    adapters = _adapters(weights)
    path = write_lora_file(tmp_path / "a.safetensors", adapters, scale=ALPHA / RANK, meta={"rank": RANK})
    back = read_lora_file(path)
    assert back.keys() == adapters.keys()
    for key, value in adapters.items():
        torch.testing.assert_close(back[key], value * (ALPHA / RANK if ".lora_B." in key else 1.0), rtol=0, atol=0)


def test_wan_kohya_naming_with_alpha_merges_like_the_diffusers_file(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    """``diffusion_model.blocks.N.self_attn.q.lora_down/lora_up.weight`` + ``.alpha`` (ComfyUI/kohya WAN LoRAs)."""
    adapters, kohya = _adapters(weights), {}
    for block in range(WAN_TINY.num_layers):
        for original, module in ORIGINAL.items():
            stem = f"diffusion_model.blocks.{block}.{original}"
            kohya[f"{stem}.lora_down.weight"] = adapters[f"blocks.{block}.{module}.lora_A.weight"]
            kohya[f"{stem}.lora_up.weight"] = adapters[f"blocks.{block}.{module}.lora_B.weight"]
            kohya[f"{stem}.alpha"] = torch.tensor(ALPHA)
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    merged = merge_adapters(weights, read_lora_file(tmp_path / "kohya.safetensors"), scale=0.5)
    scaled = {k: v * (ALPHA / RANK) if ".lora_B." in k else v for k, v in adapters.items()}
    want = merge_adapters(weights, scaled, scale=0.5)
    assert merged.keys() == weights.keys()
    for key in weights:
        torch.testing.assert_close(merged[key], want[key], rtol=1e-6, atol=1e-6)
    w = "blocks.0.attn1.to_q.weight"
    delta = (
        0.5
        * (ALPHA / RANK)
        * adapters["blocks.0.attn1.to_q.lora_B.weight"]
        @ adapters["blocks.0.attn1.to_q.lora_A.weight"]
    )
    torch.testing.assert_close(merged[w], weights[w] + delta, rtol=1e-6, atol=1e-6)


def test_bad_files_and_adapters_are_refused(tmp_path: Path, weights: dict[str, torch.Tensor]) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_lora_file(tmp_path / "missing.safetensors")
    save_file({"unet.down.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="holds no WAN transformer LoRA"):
        read_lora_file(tmp_path / "other.safetensors")
    half = {"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(RANK, 24)}
    with pytest.raises(ValueError, match="only one of lora_A / lora_B"):
        merge_adapters(weights, half)
    alien = {
        "blocks.9.attn1.to_q.lora_A.weight": torch.zeros(RANK, 24),
        "blocks.9.attn1.to_q.lora_B.weight": torch.zeros(24, RANK),
    }
    with pytest.raises(ValueError, match=r"does not have: \['blocks.9.attn1.to_q'\]"):
        merge_adapters(weights, alien)
