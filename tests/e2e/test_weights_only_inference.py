"""Generation and export load weights alone (DESIGN.md rule 9): no optimizer, no EMA copy, the inference dtype.

A checkpoint of a WAN recipe widened to ~108 MB of float32 weights (model, AdamW moments and EMA: ~430 MB of
tensors) is written the way training writes one; its EMA differs from its raw weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from support.networks import inference_dtype_of

from dfm.adapters.diffusers import WEIGHTS_NAME
from dfm.adapters.torch_dist.ema import EMA
from dfm.app import bootstrap
from dfm.app.config import config_to_yaml, resolve_config
from dfm.app.services.checkpoints import export_checkpoint, load_exported, load_for_inference

WIDE = ["model.num_attention_heads=8", "model.attention_head_dim=64", "model.ffn_dim=2048", "model.num_layers=6"]
MEASURE = """
import json, sys
import torch
from dfm.app import bootstrap
from dfm.app.services.checkpoints import load_for_inference

def status(key):  # kB
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

try:
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set (VmHWM) to the current one
except OSError as exc:
    print(json.dumps({"skip": f"cannot reset the peak RSS here: {exc}"}))
    sys.exit(0)
before = status("VmRSS")
_, model = load_for_inference(sys.argv[1], dtype=getattr(torch, sys.argv[2]), device="cpu")
grown = (status("VmHWM") - before) * 1024
print(json.dumps({"grown": grown, "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The run directory, and the EMA and raw weights its checkpoint holds."""
    run = tmp_path_factory.mktemp("wide") / "run"
    cfg = resolve_config("wan_tiny_t2v", None, [f"run.dir={run}", "train.ema_decay=0.9", *WIDE])
    runtime = bootstrap.build_runtime(cfg, device="cpu")
    runtime.build_network(cfg.model)
    runtime.attach_optimizer(bootstrap.optimizer_settings(cfg))
    with torch.no_grad():  # an EMA that differs from the weights, as after training
        for name, value in runtime.weights(use_ema=True).items():
            value.add_(0.01 * torch.randn(value.shape, generator=torch.Generator().manual_seed(len(name))))
    state = {"runtime": runtime.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    bootstrap.build_checkpoint_store(cfg).save(1, state, {"step": 1, "config": config_to_yaml(cfg)})
    ema, model = ({k: v.detach().clone() for k, v in runtime.weights(use_ema=e).items()} for e in (True, False))
    return {"run": run, "ema": ema, "model": model, "bytes": sum(v.numel() * 4 for v in model.values())}


@pytest.fixture
def no_optimizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building any torch optimizer or the runtimes' EMA fails."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("optimizer state or an EMA copy was built")

    monkeypatch.setattr(torch.optim.Optimizer, "__init__", refuse)
    monkeypatch.setattr(EMA, "__init__", refuse)


def _equal(model: torch.nn.Module, want: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> bool:
    """The model holds ``want`` cast as an inference network of ``dtype`` holds it (declared parts in fp32)."""
    got = model.state_dict()
    return got.keys() == want.keys() and all(
        torch.equal(got[k], v.to(inference_dtype_of(k, dtype))) for k, v in want.items()
    )


def test_the_checkpoint_is_big_enough_to_measure(checkpoint: dict[str, Any]) -> None:
    assert checkpoint["bytes"] > 100e6
    assert any(not torch.equal(checkpoint["ema"][k], v) for k, v in checkpoint["model"].items())


@pytest.mark.usefixtures("no_optimizer")
@pytest.mark.parametrize(("use_ema", "dtype"), [(True, torch.float32), (False, torch.float32), (True, torch.bfloat16)])
def test_loading_for_inference_builds_the_network_alone(
    checkpoint: dict[str, Any], use_ema: bool, dtype: torch.dtype
) -> None:
    """EMA or raw weights exactly (bf16: the fp32 ones rounded), in eval mode, without gradients."""
    _, model = load_for_inference(checkpoint["run"], use_ema=use_ema, dtype=dtype, device="cpu")
    assert all(p.dtype == inference_dtype_of(n, dtype) for n, p in model.named_parameters())
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert _equal(model, checkpoint["ema" if use_ema else "model"], dtype)


@pytest.mark.parametrize(("dtype", "limit"), [("bfloat16", 1.5), ("float32", 2.0)])
def test_peak_memory_of_loading_stays_near_the_weights(checkpoint: dict[str, Any], dtype: str, limit: float) -> None:
    """Peak RSS growth of ``load_for_inference``, in a fresh process, in units of the fp32 weights' bytes.

    Measured 1.02 (bf16) and 1.52 (fp32): the network, plus at most 64 MB of checkpoint pages that
    safetensors maps while DCP reads them (the reader reopens each file every 64 MB read, so pages already
    copied are dropped). Building the training runtime to load them, as before, peaked at 5.14 (weights, two
    AdamW moments, EMA copy, mapped file). The peak is reset after the imports (``/proc/self/clear_refs``), so
    an import-time peak cannot hide the load.
    """
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(checkpoint["run"]), dtype],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    if "skip" in got:
        pytest.skip(got["skip"])
    assert got["dtypes"] == sorted({f"torch.{dtype}", "torch.float32"})  # the declared parts stay float32
    assert got["grown"] < limit * checkpoint["bytes"], got["grown"] / checkpoint["bytes"]


@pytest.mark.usefixtures("no_optimizer")
def test_export_and_loading_the_export_build_the_network_alone(checkpoint: dict[str, Any], tmp_path: Path) -> None:
    done = export_checkpoint(checkpoint["run"], tmp_path / "bf16", dtype=torch.bfloat16)
    assert (done.weights, done.step, done.ranks) == ("ema", 1, 1)
    saved = load_file(tmp_path / "bf16" / WEIGHTS_NAME)
    assert all(torch.equal(saved[k], v.bfloat16()) for k, v in checkpoint["ema"].items())
    _, fp32 = load_exported(done.out, device="cpu")  # bf16 files: fp32 weights holding the bf16 values
    assert _equal(fp32, {k: v.bfloat16().float() for k, v in checkpoint["ema"].items()})
    assert not fp32.training and not any(p.requires_grad for p in fp32.parameters())
    _, bf16 = load_for_inference(done.out, dtype=torch.bfloat16, device="cpu")  # the declared parts: fp32 of bf16
    assert _equal(bf16, {k: v.bfloat16().float() for k, v in checkpoint["ema"].items()}, torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a CUDA device that must not exist")
def test_an_unusable_device_is_a_clear_error(checkpoint: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        load_for_inference(checkpoint["run"], device="cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        load_for_inference(checkpoint["run"], device="gpu0")
