"""dfm's WAN 2.1 transformer against diffusers' ``WanTransformer3DModel`` built from the same tiny config
and loaded with the same (re-randomised) weights: outputs and every parameter gradient agree."""

from __future__ import annotations

import attrs
import pytest
import torch
from diffusers import WanTransformer3DModel
from support.errors import max_rel

from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.wan import WanTransformer
from dfm.domain.specs import WAN_TINY, WanSpec

TOL = 1e-5
SPEC_16 = attrs.evolve(WAN_TINY, attention_head_dim=16, cross_attn_norm=False, num_layers=3)
SPEC_PATCH = attrs.evolve(WAN_TINY, patch_size=(2, 2, 2), out_channels=6)


def _reference(spec: WanSpec, seed: int = 0) -> WanTransformer3DModel:
    """diffusers' model from ``spec``, every parameter re-randomised (its zero/one inits make a weak test)."""
    config = {f.name: getattr(spec, f.name) for f in attrs.fields(WanSpec) if f.name != "arch"}
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif "scale_shift_table" in name:
                p.copy_(0.3 * noise)
            else:
                p.copy_(0.1 * noise)
    return ref


def _pair(spec: WanSpec, seed: int = 0) -> tuple[WanTransformer3DModel, WanTransformer]:
    ref = _reference(spec, seed)
    ours = WanTransformer(spec)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(spec: WanSpec, frames: int, height: int, width: int, text_len: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, spec.in_channels, frames, height, width, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, text_len, spec.text_dim, generator=g)
    return x, t, text


@pytest.mark.parametrize("spec", [WAN_TINY, SPEC_16], ids=["head12", "head16_no_cross_norm"])
def test_state_dict_keys_and_shapes_equal_diffusers(spec: WanSpec) -> None:
    ref, ours = _reference(spec), WanTransformer(spec)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict(), strict=True)  # and back


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        (WAN_TINY, (1, 4, 4, 5)),
        (WAN_TINY, (3, 6, 8, 7)),
        (WAN_TINY, (5, 2, 10, 3)),
        (SPEC_16, (2, 8, 6, 4)),
        (SPEC_PATCH, (4, 4, 6, 6)),
    ],
    ids=["1x4x4_S5", "3x6x8_S7", "5x2x10_S3", "head16", "patch222"],
)
def test_outputs_and_gradients_match_diffusers(spec: WanSpec, shape: tuple[int, int, int, int]) -> None:
    ref, ours = _pair(spec)
    x, t, text = _inputs(spec, *shape)
    out_ref = ref(x, t, text).sample
    out = ours(x, t, text)
    assert out.shape == out_ref.shape == (2, spec.out_channels, *shape[:3])
    assert max_rel(out, out_ref) <= TOL

    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out_ref * weight).sum().backward()
    (out * weight).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name].grad
        assert p.grad is not None and g_ref is not None, name
        assert max_rel(p.grad, g_ref) <= TOL, f"{name}: rel error {max_rel(p.grad, g_ref):.2e}"


def test_bf16_matches_diffusers_with_the_same_fp32_islands() -> None:
    """With diffusers' fp32 modules (time embedder, tables, norms) kept fp32 and the rest bf16, both agree."""
    ref, ours = _pair(WAN_TINY)
    keep = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    for model in (ref, ours):
        for name, p in model.named_parameters():
            if not any(k in name for k in keep):
                p.data = p.data.bfloat16()
    x, t, text = _inputs(WAN_TINY, 3, 6, 8, 7)
    out = ours(x.bfloat16(), t, text.bfloat16())
    assert out.dtype == torch.bfloat16
    assert max_rel(out.float(), ref(x.bfloat16(), t, text.bfloat16()).sample.float()) <= 1e-2


def test_bf16_model_runs_forward_and_backward() -> None:
    ours = WanTransformer(WAN_TINY).bfloat16()
    x, t, text = _inputs(WAN_TINY, 2, 4, 4, 3)
    out = ours(x.bfloat16(), t, text.bfloat16())
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters())


def test_text_mask_equals_dropping_the_masked_tokens() -> None:
    _, ours = _pair(WAN_TINY)
    x, t, text = _inputs(WAN_TINY, 2, 4, 6, 7, batch=3)
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        masked = ours(x, t, text, mask)
        for i, n in enumerate(lengths):
            dropped = ours(x[i : i + 1], t[i : i + 1], text[i : i + 1, :n])
            assert max_rel(masked[i : i + 1], dropped) <= TOL
        assert torch.equal(ours(x, t, text, torch.ones(3, 7, dtype=torch.bool)), ours(x, t, text))


def test_text_mask_is_not_a_prefix_mask_only_and_ignores_masked_values() -> None:
    _, ours = _pair(WAN_TINY)
    x, t, text = _inputs(WAN_TINY, 1, 4, 4, 5, batch=1)
    mask = torch.tensor([[True, False, True, False, True]])
    with torch.no_grad():
        masked = ours(x, t, text, mask)
        assert max_rel(masked, ours(x, t, text[:, mask[0]])) <= TOL
        garbage = text.clone()
        garbage[:, ~mask[0]] = 1e4
        assert torch.equal(ours(x, t, garbage, mask), masked)


def test_a_sample_with_no_text_token_gets_finite_text_free_output() -> None:
    _, ours = _pair(WAN_TINY)
    x, t, text = _inputs(WAN_TINY, 1, 4, 4, 5, batch=2)
    mask = torch.tensor([[True] * 5, [False] * 5])
    with torch.no_grad():
        out = ours(x, t, text, mask)
        other = ours(x, t, torch.randn_like(text), mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], other[1])


def test_parallel_plan_names_every_linear_and_matches_real_modules() -> None:
    model = WanTransformer(WAN_TINY)
    plan = model.parallel_plan
    assert plan.unassigned_linears(model) == []
    assert isinstance(model.get_submodule(plan.blocks), torch.nn.ModuleList)
    for patterns in (
        plan.column_parallel,
        plan.row_parallel,
        plan.sequence_parallel_attention,
        plan.head_norms,
        plan.text_linears,
    ):
        for pattern in patterns:
            assert plan.modules_matching(model, (pattern,)), f"{pattern} matches no module"
    for _, norm in plan.modules_matching(model, plan.head_norms):
        assert isinstance(norm, torch.nn.RMSNorm) and norm.normalized_shape == (WAN_TINY.hidden_size,)
    roles = {n: plan.linear_role(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert roles["blocks.1.attn1.to_q"] == "column" and roles["blocks.0.ffn.net.2"] == "row"
    assert roles["condition_embedder.time_proj"] == "replicated" and roles["proj_out"] == "replicated"
    text = [n for n, _ in plan.modules_matching(model, plan.text_linears)]
    assert text and all(roles[n] == "column" and ".attn2." in n for n in text)


def test_attention_kernel_is_swappable_per_module() -> None:
    _, ours = _pair(WAN_TINY)
    x, t, text = _inputs(WAN_TINY, 1, 4, 4, 5)
    calls: list[tuple[int, ...]] = []

    class Recording:
        def __init__(self) -> None:
            self.inner = SDPAAttention("math")

        def __call__(self, q, k, v, mask=None):
            calls.append(tuple(q.shape))
            return self.inner(q, k, v, mask)

    with torch.no_grad():
        before = ours(x, t, text)
        for _, attn in ours.parallel_plan.modules_matching(ours, ours.parallel_plan.sequence_parallel_attention):
            attn.kernel = Recording()
        after = ours(x, t, text)
    assert calls == [(2, 2, 4, 12)] * WAN_TINY.num_layers  # self-attention only, [B, H, L, D]
    assert max_rel(after, before) <= TOL


def test_init_is_seeded_by_the_generator_and_leaves_global_rng_alone() -> None:
    state = torch.get_rng_state()
    a = WanTransformer(WAN_TINY, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)
    b = WanTransformer(WAN_TINY, generator=torch.Generator().manual_seed(5))
    c = WanTransformer(WAN_TINY, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.blocks[0].attn1.to_q.weight, c.blocks[0].attn1.to_q.weight)
    assert torch.count_nonzero(a.proj_out.weight) == 0


def test_meta_construction_then_materialise() -> None:
    with torch.device("meta"):
        model = WanTransformer(WAN_TINY)
    assert model.proj_out.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(5))
    ref = WanTransformer(WAN_TINY, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


def test_bad_inputs_raise_value_errors() -> None:
    model = WanTransformer(WAN_TINY)
    x, t, text = _inputs(WAN_TINY, 1, 4, 4, 5)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :3], t, text)
    with pytest.raises(ValueError, match="timestep must be"):
        model(x, t[:1], text)
    with pytest.raises(ValueError, match="text must be"):
        model(x, t, text[..., :8])
    with pytest.raises(ValueError, match="text_mask must be"):
        model(x, t, text, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not divisible"):
        model(x[..., :3], t, text)
