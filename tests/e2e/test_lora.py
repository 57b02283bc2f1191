"""LoRA fine-tuning end to end: train adapters on a frozen base, resume, export them for diffusers, merge, sample.

The base is a tiny WAN written as a diffusers directory (seeded weights with a random output projection,
so every block gets gradients); runs train ``wan_tiny_t2v`` on the synthetic videos with ``lora.rank`` set.
"""

from __future__ import annotations

import re
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors import safe_open
from support.errors import max_rel

from dfm.adapters.diffusers import save_wan_diffusers
from dfm.adapters.memory import InMemoryVideoWriter
from dfm.adapters.tracking import read_metrics
from dfm.app import convert
from dfm.app.config import ConfigError, config_to_yaml, resolve_config
from dfm.app.services.checkpoints import EXPORTED_CONFIG, load_for_inference
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.lora import checkpoint_adapters, initial_adapters
from dfm.app.services.samples import training_prompts
from dfm.app.services.training import train
from dfm.domain.networks.wan import WanTransformer

RANK = 4
COMMON = ["logging.level=WARNING", "train.log_interval=1", f"lora.rank={RANK}", "lora.alpha=8", "optim.lr=3e-3"]
PROMPT = "a red circle moving left slowly"


def _config(run: Path, base: Path, *extra: str):
    return resolve_config("wan_tiny_t2v", None, [f"run.dir={run}", f"checkpoint.init_from={base}", *COMMON, *extra])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The frozen base: the recipe's seeded network with a random output projection, as a diffusers directory."""
    cfg = resolve_config("wan_tiny_t2v", None, [])
    network = WanTransformer(cfg.model, generator=torch.Generator().manual_seed(3))
    state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    state["proj_out.weight"] = 0.3 * torch.randn(
        state["proj_out.weight"].shape, generator=torch.Generator().manual_seed(4)
    )
    out = tmp_path_factory.mktemp("lora") / "base"
    save_wan_diffusers(state, cfg.model, out)
    (out / EXPORTED_CONFIG).write_text(config_to_yaml(cfg))  # so generate samples the base directory too
    return out


@pytest.fixture(scope="module")
def run(base: Path) -> Path:
    """12 steps of LoRA on the base, an EMA kept, checkpoints at 6 and 12."""
    out = base.parent / "run"
    train(_config(out, base, "train.max_steps=12", "checkpoint.interval=6", "train.ema_decay=0.9"))
    return out


def _convert(argv: list[str]) -> None:
    assert convert.main(argv) == 0, argv


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run / "metrics.jsonl")]


def test_lora_learns_and_its_checkpoints_hold_only_the_adapters(run: Path) -> None:
    losses = _losses(run)
    assert len(losses) == 12 and sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses
    shard = next((run / "checkpoints" / "step_0000012" / "tensors").glob("*.safetensors"))
    with safe_open(str(shard), framework="pt") as f:
        keys = list(f.keys())
    weights = [k for k in keys if k.startswith(("runtime.model.", "runtime.ema.module."))]
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights), weights[:5]
    plan = 2 * 4 + 2  # per block: q, k, v, out of both attentions and the two feed-forward linears
    model_keys = [k for k in keys if k.startswith("runtime.model.")]
    assert len(model_keys) == 2 * plan * 2, model_keys[:4]  # A and B, two blocks


def test_lora_resume_is_exact(tmp_path: Path, base: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(straight, base, "train.max_steps=4", "checkpoint.interval=100"))
    train(_config(resumed, base, "train.max_steps=2", "checkpoint.interval=100"))
    train(_config(resumed, base, "train.max_steps=4", "checkpoint.interval=100"))
    assert _losses(resumed) == _losses(straight)
    a = checkpoint_adapters(straight / "checkpoints" / "step_0000004", _config(straight, base), use_ema=False)[0]
    b = checkpoint_adapters(resumed / "checkpoints" / "step_0000004", _config(resumed, base), use_ema=False)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _inputs(spec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, spec.in_channels, 2, 8, 8, generator=g)
    text = torch.randn(2, 6, spec.text_dim, generator=g)
    return x, torch.tensor([250.0, 800.0]), text


@torch.no_grad()
def test_diffusers_loads_the_exported_adapter_and_reproduces_dfm(
    run: Path, base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``export-lora`` -> diffusers' ``load_lora_adapter`` on the base (unmerged peft layers) gives dfm's output
    (base with the EMA adapters folded in); ``merge-lora``'s directory gives it too."""
    adapter = tmp_path / "adapter.safetensors"
    assert convert.main(["export-lora", "--checkpoint", str(run), "--out", str(adapter)]) == 0
    assert "exported EMA adapters" in capsys.readouterr().out
    cfg, ours = load_for_inference(run)
    x, t, text = _inputs(cfg.model)
    want = ours(x, t, text)
    peer = WanTransformer3DModel.from_pretrained(base)
    peer.load_lora_adapter(str(adapter), prefix="transformer")
    got = peer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert max_rel(got, want) <= 1e-5
    plain = WanTransformer3DModel.from_pretrained(base)(
        hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False
    )[0]
    assert max_rel(plain, want) > 1e-3  # the adapters changed the output
    merged = tmp_path / "merged"
    _convert(["merge-lora", "--base", str(base), "--lora", str(adapter), "--out", str(merged)])
    folded = WanTransformer3DModel.from_pretrained(merged)
    again = folded(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    assert max_rel(again, want) <= 1e-5
    half = tmp_path / "half"
    _convert(["merge-lora", "--base", str(base), "--lora", f"{adapter}:0.5", "--out", str(half)])
    mid = WanTransformer3DModel.from_pretrained(half)(
        hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False
    )[0]
    assert max_rel(mid, want) > 1e-4 and max_rel(mid, plain) > 1e-4


def test_generate_with_lora_equals_generating_from_the_lora_run(run: Path, base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter.safetensors"
    _convert(["export-lora", "--checkpoint", str(run), "--out", str(adapter)])
    videos = {}
    for name, checkpoint, loras in (("run", run, ()), ("file", base, ((adapter, 1.0),)), ("base", base, ())):
        writer = InMemoryVideoWriter()
        request = GenerateRequest(
            checkpoint=checkpoint, prompts=[PROMPT], out=tmp_path / f"{name}.mp4", steps=3, loras=loras
        )
        generate(request, writer=writer)
        videos[name] = next(iter(writer.videos.values())).float()
    assert (videos["run"] - videos["file"]).abs().max() <= 1.0  # uint8 frames: rounding only
    assert (videos["run"] - videos["base"]).abs().max() > 1.0


def test_init_from_reads_back_what_export_lora_wrote(run: Path, base: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter.safetensors"
    _convert(["export-lora", "--checkpoint", str(run), "--out", str(adapter), "--no-ema"])
    raw, which = checkpoint_adapters(run / "checkpoints" / "step_0000012", _config(run, base), use_ema=False)
    assert which == "model"
    loaded = initial_adapters(_config(tmp_path / "next", base, f"lora.init_from={adapter}"))
    scale = 8 / RANK
    assert len(loaded) == len(raw)
    for key, value in raw.items():
        peft = key.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
        want = value / scale if ".lora_B." in key else value
        torch.testing.assert_close(loaded[peft], want, rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match=r"rank \[4\], but lora.rank=8"):
        initial_adapters(_config(tmp_path / "next", base, f"lora.init_from={adapter}", "lora.rank=8"))


def test_lora_settings_that_cannot_work_are_refused(tmp_path: Path, base: Path) -> None:
    with pytest.raises(ConfigError, match="megatron runtime does not train LoRA adapters; use runtime=fsdp2"):
        train(_config(tmp_path / "m", base, "runtime=megatron"))
    with pytest.raises(ConfigError, match=r"lora.targets \['blocks.\*.nothing'\] match no module"):
        train(_config(tmp_path / "t", base, "lora.targets=[blocks.*.nothing]", "train.max_steps=1"))
    dtype_error = re.escape("lora.base_dtype=bfloat16 needs computing in it: set train.precision=bf16")
    with pytest.raises(ConfigError, match=dtype_error):
        train(_config(tmp_path / "d", base, "lora.base_dtype=bfloat16", "train.precision=fp32", "train.max_steps=1"))


def test_samples_during_lora_training_leave_it_alone(tmp_path: Path, base: Path) -> None:
    """The EMA's adapters are swapped in to sample and the trained ones back: the losses stay bit-identical."""
    common = ["train.max_steps=3", "checkpoint.interval=100", "train.ema_decay=0.9"]
    train(_config(tmp_path / "a", base, *common, "sample.every_n_steps=1", "sample.steps=2"))
    train(_config(tmp_path / "b", base, *common))
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert len(list((tmp_path / "a" / "samples").glob("step_*.png"))) == 3
    cfg = _config(tmp_path / "a", base)  # the last samples: the EMA adapters, as generate folds them in
    out = tmp_path / "gen.mp4"
    generate(GenerateRequest(checkpoint=tmp_path / "a", prompts=training_prompts(cfg), out=out, steps=2))
    mine = iio.imread(tmp_path / "a" / "samples" / "step_0000003.png").astype(np.int16)
    assert np.abs(mine - iio.imread(out.with_suffix(".png"))).max() <= 1
