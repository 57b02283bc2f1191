"""WAN 2.1 image-to-video against diffusers' ``WanTransformer3DModel`` with ``image_dim`` / ``added_kv_proj_dim``
(and first-last-frame's ``pos_embed_seq_len``): same parameter names, outputs and every gradient, on the same
re-randomised weights; the diffusers config round trip; the plan covers the image keys and values."""

from __future__ import annotations

import attrs
import pytest
import torch
from diffusers import WanTransformer3DModel
from support.errors import max_rel

from dfm.adapters.diffusers import load_wan_diffusers, save_wan_diffusers, spec_from_config, spec_to_config
from dfm.domain.networks.wan import WAN_I2V_PARALLEL_PLAN, WanTransformer
from dfm.domain.specs import WAN_TINY, WanSpec, forward_flops

TOL = 1e-5
TEXT = 512  # diffusers' WanAttnProcessor takes the last 512 context rows as the text, the rest as the image
I2V = attrs.evolve(WAN_TINY, in_channels=36, out_channels=16, image_dim=20, added_kv_proj_dim=WAN_TINY.hidden_size)
FLF = attrs.evolve(I2V, pos_embed_seq_len=2 * 7)


def _pair(spec: WanSpec) -> tuple[WanTransformer3DModel, WanTransformer]:
    config = {k: v for k, v in spec_to_config(spec).items() if not k.startswith("_")}
    ref = WanTransformer3DModel(**config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.3 * noise if "scale_shift" in name else 0.1 * noise)
    ours = WanTransformer(spec)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(spec: WanSpec, image_rows: int, images_per_sample: int = 1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, spec.in_channels, 2, 4, 6, generator=g)
    t = torch.tensor([120.0, 810.0])
    text = torch.randn(2, TEXT, spec.text_dim, generator=g)
    image = torch.randn(2 * images_per_sample, image_rows, spec.image_dim, generator=g)
    return x, t, text, image


@pytest.mark.parametrize(("spec", "rows", "images"), [(I2V, 257, 1), (FLF, 7, 2)], ids=["i2v", "first_last_frame"])
def test_outputs_and_gradients_match_diffusers(spec: WanSpec, rows: int, images: int) -> None:
    ref, ours = _pair(spec)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    x, t, text, image = _inputs(spec, rows, images)
    want = ref(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=image).sample
    got = ours(x, t, text, image=image)
    assert got.shape == want.shape == (2, 16, 2, 4, 6) and max_rel(got, want) <= TOL
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    (want * weight).sum().backward()
    (got * weight).sum().backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None and theirs[name].grad is not None, name
        assert max_rel(p.grad, theirs[name].grad) <= TOL, name
    image_grads = [n for n, p in ours.named_parameters() if "add_k_proj" in n or "image_embedder" in n]
    assert image_grads and all(ours.get_parameter(n).grad.abs().sum() > 0 for n in image_grads)


def test_the_image_changes_the_output_and_is_required() -> None:
    _, ours = _pair(I2V)
    x, t, text, image = _inputs(I2V, 257)
    assert max_rel(ours(x, t, text, image=image), ours(x, t, text, image=torch.zeros_like(image))) > 1e-3
    with pytest.raises(ValueError, match=r"needs image features \[2, R, 20\], got None"):
        ours(x, t, text)
    t2v = WanTransformer(WAN_TINY)
    with pytest.raises(ValueError, match=r"image features \[B, R, None\] expected"):
        t2v(torch.randn(2, 4, 1, 4, 4), t, torch.randn(2, 5, WAN_TINY.text_dim), image=image)
    with pytest.raises(ValueError, match="packed sequences of an image-to-video model are not supported"):
        ours([x[0], x[1]], t, text, image=image)


def test_spec_checks_and_the_diffusers_config_round_trip(tmp_path) -> None:
    with pytest.raises(ValueError, match="must be set together"):
        attrs.evolve(WAN_TINY, image_dim=20)
    with pytest.raises(ValueError, match="added_kv_proj_dim must equal the hidden size 24"):
        attrs.evolve(WAN_TINY, image_dim=20, added_kv_proj_dim=5120)
    with pytest.raises(ValueError, match="pos_embed_seq_len applies to image-to-video models only"):
        attrs.evolve(WAN_TINY, pos_embed_seq_len=514)
    assert spec_from_config(spec_to_config(FLF)) == FLF
    ours = WanTransformer(I2V, generator=torch.Generator().manual_seed(3))
    save_wan_diffusers(ours.state_dict(), I2V, tmp_path / "i2v")
    spec, state = load_wan_diffusers(tmp_path / "i2v")
    assert spec == I2V and all(torch.equal(state[k], v) for k, v in ours.state_dict().items())
    peer = WanTransformer3DModel.from_pretrained(tmp_path / "i2v")
    assert peer.config.image_dim == 20 and peer.config.added_kv_proj_dim == I2V.hidden_size
    x, t, text, image = _inputs(I2V, 257)
    want = peer(hidden_states=x, timestep=t, encoder_hidden_states=text, encoder_hidden_states_image=image).sample
    assert max_rel(ours(x, t, text, image=image), want) <= TOL


def test_the_plan_splits_the_image_keys_and_values_like_the_text_ones() -> None:
    model = WanTransformer(I2V)
    plan = model.parallel_plan
    assert plan is WAN_I2V_PARALLEL_PLAN and WanTransformer(WAN_TINY).parallel_plan is not plan
    assert plan.unassigned_linears(model) == []
    roles = {n: plan.linear_role(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert roles["blocks.1.attn2.add_k_proj"] == roles["blocks.1.attn2.add_v_proj"] == "column"
    assert roles["condition_embedder.image_embedder.ff.net.0.proj"] == "replicated"
    assert {n for n, _ in plan.modules_matching(model, plan.head_norms)} >= {"blocks.0.attn2.norm_added_k"}
    assert forward_flops(I2V, 100, 512) > forward_flops(
        attrs.evolve(WAN_TINY, in_channels=36, out_channels=16), 100, 512
    )
