"""The recipe registry and the presets the named recipes promise."""

from __future__ import annotations

import attrs
import pytest

from dfm.app.config import ConfigError, TrainConfig
from dfm.app.recipes import get_recipe, recipe_names, recipe_summary
from dfm.domain.diffusion.edm import EDM
from dfm.domain.diffusion.flow import FlowMatching
from dfm.domain.specs import DIT_TINY, DIT_XL, WAN_1_3B, WAN_14B, WAN_TINY, WanSpec

EXPECTED = [
    "default",
    "wan_1_3b_t2v_pretrain",
    "wan_1_3b_t2v_finetune",
    "wan_14b_t2v_pretrain",
    "wan_14b_t2v_finetune",
    "wan_1_3b_t2v_lora",
    "wan_14b_t2v_lora",
    "wan_i2v_14b_480p_finetune",
    "dit_xl_edm",
    "wan_tiny_t2v",
    "dit_tiny_edm",
    "wan_tiny_i2v",
]


def test_registry_lists_every_recipe() -> None:
    assert recipe_names() == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_recipe_builds_a_documented_config(name: str) -> None:
    assert isinstance(get_recipe(name), TrainConfig)
    assert recipe_summary(name)


def test_unknown_recipe() -> None:
    with pytest.raises(ConfigError) as info:
        get_recipe("dit_xl")
    message = str(info.value)
    assert "unknown recipe 'dit_xl'; did you mean 'dit_xl_edm'?" in message
    assert all(name in message for name in EXPECTED)
    with pytest.raises(ValueError, match=r"^unknown recipe 'qqqqqqqq' \(known recipes: default, "):
        get_recipe("qqqqqqqq")


@pytest.mark.parametrize(
    ("name", "spec", "lr"),
    [
        ("wan_1_3b_t2v_pretrain", WAN_1_3B, 1e-4),
        ("wan_1_3b_t2v_finetune", WAN_1_3B, 1e-5),
        ("wan_14b_t2v_pretrain", WAN_14B, 1e-4),
        ("wan_14b_t2v_finetune", WAN_14B, 1e-5),
        ("wan_1_3b_t2v_lora", WAN_1_3B, 1e-4),
        ("wan_14b_t2v_lora", WAN_14B, 1e-4),
    ],
)
def test_wan_recipes(name: str, spec: WanSpec, lr: float) -> None:
    config = get_recipe(name)
    assert config.model == spec
    assert (config.data.frames, config.data.height, config.data.width, config.data.text_len) == (81, 480, 832, 512)
    assert config.train.precision == "bf16"
    assert config.optim.lr == lr
    assert (config.sample.sampler, config.sample.steps, config.sample.guidance) == ("unipc", 50, 5.0)
    flow = config.diffusion
    assert isinstance(flow, FlowMatching)
    assert config.sample.shift == flow.shift
    if name.endswith("pretrain"):
        assert (flow.density, flow.logit_std, flow.shift, flow.mix_uniform) == ("logit_normal", 1.5, 2.5, 0.2)
    else:
        assert (flow.density, flow.shift) == ("uniform", 3.0)
    if name.endswith("lora"):  # rank-32 adapters on a bf16 frozen base
        assert (config.lora.rank, config.lora.alpha, config.lora.base_dtype) == (32, 32.0, "bfloat16")
    else:
        assert config.lora.rank is None


def test_dit_xl_edm() -> None:
    config = get_recipe("dit_xl_edm")
    assert config.model == DIT_XL
    assert config.diffusion == EDM(p_mean=-1.2, p_std=1.2, sigma_data=0.5)
    assert config.sample.sampler == "edm_heun"


def test_tiny_recipes() -> None:
    wan, dit = get_recipe("wan_tiny_t2v"), get_recipe("dit_tiny_edm")
    assert wan.model == attrs.evolve(WAN_TINY, in_channels=3, out_channels=3)
    assert dit.model == attrs.evolve(DIT_TINY, in_channels=3, out_channels=3)
    assert isinstance(wan.diffusion, FlowMatching) and isinstance(dit.diffusion, EDM)
    assert wan.runtime == dit.runtime == "local"
    assert wan.data.source == dit.data.source == "synthetic"


def test_default_is_a_small_wan_on_synthetic_pixels() -> None:
    config = get_recipe("default")
    assert isinstance(config.model, WanSpec)
    assert (config.model.num_layers, config.model.num_attention_heads, config.model.attention_head_dim) == (4, 4, 32)
    assert (config.model.in_channels, config.model.out_channels, config.model.text_dim) == (3, 3, 64)
    assert config.data.source == "synthetic"
    assert config.runtime == "local"


@pytest.mark.parametrize("name", EXPECTED)
def test_text_padding_is_attended_in_the_wan_recipes_only(name: str) -> None:
    """WAN 2.1 was trained on zero-padded 512-token text without a mask; dfm's own from-scratch recipes
    (default, DiT, tiny) mask the padding, as every run did before the setting existed."""
    config = get_recipe(name)
    assert config.diffusion.mask_text_padding is not name.startswith(("wan_1_3b", "wan_14b", "wan_i2v"))


def test_the_i2v_recipe_is_wan_2_1_i2v_14b_480p() -> None:
    config = get_recipe("wan_i2v_14b_480p_finetune")
    spec = config.model
    assert (spec.in_channels, spec.out_channels, spec.image_dim, spec.added_kv_proj_dim) == (36, 16, 1280, 5120)
    assert attrs.evolve(spec, in_channels=16, image_dim=None, added_kv_proj_dim=None) == WAN_14B
    assert (config.data.frames, config.data.height, config.data.width) == (81, 480, 832)
    assert config.diffusion.shift == 3.0 and config.sample.shift == 3.0
