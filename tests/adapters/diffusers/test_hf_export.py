"""DCP's Hugging Face writer path gives the same diffusers directory as the plain writer (one process here;
the sharded multi-rank export is exercised by the FSDP2 runtime's tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from dfm.adapters.diffusers import INDEX_NAME, WEIGHTS_NAME, load_wan_diffusers
from dfm.adapters.diffusers.hf_export import export_wan_distributed
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import WAN_TINY


def _state() -> dict[str, torch.Tensor]:
    return WanTransformer(WAN_TINY, generator=torch.Generator().manual_seed(3)).state_dict()


@pytest.mark.parametrize("max_shard_bytes", [None, 20_000])
def test_export_loads_in_diffusers_and_back_with_the_same_weights(tmp_path: Path, max_shard_bytes: int | None) -> None:
    state = _state()
    out = export_wan_distributed(state, WAN_TINY, tmp_path / "wan", dtype=None, max_shard_bytes=max_shard_bytes)

    files = sorted(p.name for p in out.iterdir())
    if max_shard_bytes is None:
        assert files == ["config.json", WEIGHTS_NAME]
    else:
        assert INDEX_NAME in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert not any(p.name.endswith("export-tmp") for p in tmp_path.iterdir())

    spec, loaded = load_wan_diffusers(out)
    assert spec == WAN_TINY and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    theirs = WanTransformer3DModel.from_pretrained(out).state_dict()
    assert all(torch.equal(theirs[k], state[k]) for k in state)


def test_export_casts_to_bf16_and_refuses_to_overwrite(tmp_path: Path) -> None:
    state = _state()
    out = export_wan_distributed(state, WAN_TINY, tmp_path / "wan")
    _, loaded = load_wan_diffusers(out)
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, state[k].bfloat16()) for k, v in loaded.items())
    with pytest.raises(ValueError, match="already holds"):
        export_wan_distributed(state, WAN_TINY, out)
    export_wan_distributed(state, WAN_TINY, out, dtype=None, overwrite=True)
    assert load_wan_diffusers(out)[1]["proj_out.weight"].dtype == torch.float32
