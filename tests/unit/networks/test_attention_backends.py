"""The attention backends a user can name: one list for configs, CLIs and the kernel, and clear refusals."""

from __future__ import annotations

import importlib.util

import pytest

from dfm.adapters.kernels import activate_flash_attention_4
from dfm.app import bootstrap
from dfm.app.config import ConfigError, resolve_config
from dfm.app.config.training import ATTENTION_BACKENDS as CONFIG_CHOICES
from dfm.domain.networks.attention import ATTENTION_BACKENDS, SDPAAttention, flash_attention_4_active


def test_configs_and_clis_offer_exactly_the_kernels_backends() -> None:
    assert CONFIG_CHOICES == ATTENTION_BACKENDS
    assert "fa4" in ATTENTION_BACKENDS
    cfg = resolve_config("wan_tiny_t2v", None, ["train.attention_backend=fa4"])  # a config, valid without the package
    assert cfg.train.attention_backend == "fa4"


def test_an_unknown_backend_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown SDPA backend 'xformers'; expected 'auto' or one of \['cudnn'"):
        SDPAAttention("xformers")


def test_fa4_is_built_only_once_flash_attention_4_is_active() -> None:
    if flash_attention_4_active():
        pytest.skip("FlashAttention-4 is active in this process")
    with pytest.raises(ValueError, match=r"'fa4': FlashAttention-4 is not active in this process .*activate_flash"):
        SDPAAttention("fa4")


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn-4 is installed here")
def test_fa4_without_its_package_says_what_to_install() -> None:
    with pytest.raises(ValueError) as caught:
        activate_flash_attention_4()
    text = str(caught.value)
    assert text.startswith("attention backend 'fa4' runs FlashAttention-4 through torch's flash-attention registry")
    assert "pip install flash-attn-4" in text and "or choose cudnn" in text


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn-4 is installed here")
def test_a_run_asking_for_fa4_without_its_package_is_a_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^train\.attention_backend: attention backend 'fa4' runs FlashAttention-4"):
        bootstrap.use_attention_backend("fa4")
    bootstrap.use_attention_backend("cudnn")  # torch's own backends need nothing
