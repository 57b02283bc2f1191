"""generate samples with the text conditioning the run was trained with (``diffusion.mask_text_padding``).

The setting is recorded in the checkpoint's config: a run trained with the padding attended (WAN 2.1) is
sampled without a text mask, one trained with it masked (dfm's default) with the prompt's mask; a config
written before the setting existed (every such run masked the padding) reads as masked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dfm.adapters.memory import InMemoryVideoWriter
from dfm.app.config import config_from_yaml, config_to_yaml, resolve_config
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.training import train
from dfm.domain.networks.wan import WanTransformer

PROMPT = "a red circle moving left"  # 5 words of the recipe's 8 text tokens: 3 padding tokens


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    base = tmp_path_factory.mktemp("padding")
    out = {}
    for masked in (True, False):
        out[masked] = base / f"masked_{masked}"
        overrides = [f"run.dir={out[masked]}", "train.max_steps=1", "logging.level=WARNING"]
        cfg = resolve_config("wan_tiny_t2v", None, [*overrides, f"diffusion.mask_text_padding={str(masked).lower()}"])
        assert cfg.diffusion.mask_text_padding is masked
        train(cfg)
    return out


def _masks_seen(run: Path, monkeypatch: pytest.MonkeyPatch, **kw: object) -> list[torch.Tensor | None]:
    seen: list[torch.Tensor | None] = []
    forward = WanTransformer.forward

    def spy(self: WanTransformer, x, timestep, text, text_mask=None):
        seen.append(None if text_mask is None else text_mask.clone())
        return forward(self, x, timestep, text, text_mask)

    monkeypatch.setattr(WanTransformer, "forward", spy)
    kw.setdefault("cfg", "batched")  # both passes in one call per step (auto runs them as two calls)
    request = GenerateRequest(checkpoint=run, prompts=[PROMPT], out=run / "x.mp4", steps=2, progress=False, **kw)
    generate(request, writer=InMemoryVideoWriter())
    return seen


def test_a_run_trained_with_the_padding_attended_is_sampled_without_a_mask(
    runs: dict[bool, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _masks_seen(runs[False], monkeypatch) == [None, None]
    assert _masks_seen(runs[False], monkeypatch, negative_prompt="a blue square") == [None, None]
    assert _masks_seen(runs[False], monkeypatch, cfg="auto") == [None] * 4  # separate: two calls per step


def test_a_run_trained_with_the_padding_masked_is_sampled_with_the_prompts_mask(
    runs: dict[bool, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _masks_seen(runs[True], monkeypatch)
    real = torch.tensor([True] * 5 + [False] * 3)
    assert len(seen) == 2  # two steps, conditional and unconditional pass batched
    for mask in seen:
        assert mask is not None and torch.equal(mask, torch.stack([real, real]))
    separate = _masks_seen(runs[True], monkeypatch, cfg="separate")
    assert len(separate) == 4  # two steps, two calls each
    for mask in separate:
        assert mask is not None and torch.equal(mask, real[None])


def test_a_config_from_before_the_setting_reads_as_masked() -> None:
    cfg = resolve_config("wan_1_3b_t2v_finetune", None, [])
    text = config_to_yaml(cfg)
    assert "mask_text_padding: false" in text
    old = "\n".join(line for line in text.splitlines() if "mask_text_padding" not in line)
    assert config_from_yaml(old).diffusion.mask_text_padding is True
    assert config_from_yaml(text).diffusion.mask_text_padding is False
