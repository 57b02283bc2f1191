"""``train.fp8`` is refused with one clear line where it cannot run (the CPU, megatron); FP8 itself: test_fp8_gpu.py."""

from __future__ import annotations

import pytest
import torch

from dfm.adapters.torch_dist.fp8 import check_fp8
from dfm.app import bootstrap
from dfm.app.config import ConfigError, resolve_config


@pytest.mark.parametrize("runtime", ["local", "fsdp2"])
def test_fp8_on_the_cpu_is_a_config_error(runtime: str) -> None:
    cfg = resolve_config("wan_tiny_t2v", None, [f"runtime={runtime}", "train.fp8=true"])
    with pytest.raises(ConfigError) as info:
        bootstrap.build_runtime(cfg, device="cpu")
    assert str(info.value) == (
        "train.fp8 needs an NVIDIA GPU with FP8 tensor cores (compute capability 8.9 or newer), but this run is on "
        "cpu; set train.fp8=false"
    )


def test_fp8_under_megatron_is_a_config_error() -> None:
    cfg = resolve_config("wan_tiny_t2v", None, ["runtime=megatron", "train.fp8=true"])
    with pytest.raises(ConfigError, match=r"^train.fp8: the megatron runtime has no FP8 path"):
        bootstrap.build_runtime(cfg, device="cpu")


def test_fp8_is_refused_on_a_cpu_device_directly() -> None:
    with pytest.raises(ValueError, match=r"train\.fp8 needs an NVIDIA GPU"):
        check_fp8(torch.device("cpu"))
