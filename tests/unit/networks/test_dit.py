"""DiT for EDM (Peebles & Xie, 2023): shapes, RoPE, text mask, adaLN-zero, gradients, plan, dtypes, size."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import Tensor, nn

from dfm.domain.networks import layers as layers_module
from dfm.domain.networks.attention import SDPAAttention
from dfm.domain.networks.dit import DIT_PARALLEL_PLAN, DiT, dit_num_params
from dfm.domain.networks.layers import rope_3d
from dfm.domain.specs import DIT_B, DIT_L, DIT_S, DIT_TINY, DIT_XL, DiTSpec

SPEC = DIT_TINY


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _model(spec: DiTSpec = SPEC, *, randomise: bool = True) -> DiT:
    model = DiT(spec, generator=_gen(0))
    if randomise:
        _randomise_zero_init(model, _gen(1))
    return model.eval()


@torch.no_grad()
def _randomise_zero_init(model: nn.Module, generator: torch.Generator) -> None:
    """Give every all-zero parameter (adaLN, cross-attention out, final layer, biases) random values."""
    for p in model.parameters():
        if not p.any():
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def _inputs(batch: int, frames: int, height: int, width: int, text_len: int = 5, seed: int = 2) -> tuple[Tensor, ...]:
    g = _gen(seed)
    x = torch.randn(batch, SPEC.in_channels, frames, height, width, generator=g)
    c_noise = torch.log(torch.rand(batch, generator=g) * 10 + 0.01) / 4
    text = torch.randn(batch, text_len, SPEC.text_dim, generator=g)
    return x, c_noise, text


@pytest.mark.parametrize(
    ("batch", "frames", "height", "width"), [(1, 1, 2, 2), (2, 3, 6, 10), (3, 2, 8, 4), (1, 5, 4, 14)]
)
def test_output_shape_matches_latent(batch: int, frames: int, height: int, width: int) -> None:
    model = _model()
    x, c_noise, text = _inputs(batch, frames, height, width)
    out = model(x, c_noise, text)
    assert out.shape == (batch, SPEC.out_channels, frames, height, width)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_output_is_zero_at_init() -> None:
    model = _model(randomise=False)
    x, c_noise, text = _inputs(2, 3, 6, 10)
    assert torch.equal(model(x, c_noise, text), torch.zeros_like(x))


def test_rejects_bad_shapes() -> None:
    model = _model()
    x, c_noise, text = _inputs(2, 3, 6, 10)
    with pytest.raises(ValueError, match="not divisible by patch"):
        model(x[..., :9], c_noise, text)
    with pytest.raises(ValueError, match="timestep"):
        model(x, c_noise[:1], text)
    with pytest.raises(ValueError, match="text must be"):
        model(x, c_noise, text[..., :-1])
    with pytest.raises(ValueError, match="text_mask"):
        model(x, c_noise, text, torch.ones(2, 4, dtype=torch.bool))


def _roll_one_patch(x: Tensor, sign: int = 1) -> Tensor:
    """Cyclically shift the latent by one patch along H and W (a permutation of the tokens)."""
    _, ph, pw = SPEC.patch_size
    return torch.roll(x, shifts=(sign * ph, sign * pw), dims=(3, 4))


def test_rope_makes_the_model_position_aware(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    x, c_noise, text = _inputs(2, 3, 6, 10)
    with torch.no_grad():
        out = model(x, c_noise, text)
        permuted = _roll_one_patch(model(_roll_one_patch(x), c_noise, text), sign=-1)
    assert not torch.allclose(out, permuted, atol=1e-4)

    # Control: without RoPE (identity rotation) the same network is permutation-equivariant.
    def no_rope(head_dim: int, grid: tuple[int, int, int], **_: object) -> tuple[Tensor, Tensor]:
        cos, sin = rope_3d(head_dim, grid)
        return torch.ones_like(cos), torch.zeros_like(sin)

    monkeypatch.setattr(layers_module, "rope_3d", no_rope)
    with torch.no_grad():
        out = model(x, c_noise, text)
        permuted = _roll_one_patch(model(_roll_one_patch(x), c_noise, text), sign=-1)
    torch.testing.assert_close(out, permuted, atol=1e-5, rtol=1e-5)


def test_runs_on_sizes_never_seen_before() -> None:
    model = _model()
    for frames, height, width in [(1, 2, 2), (7, 18, 34), (2, 64, 2)]:
        x, c_noise, text = _inputs(1, frames, height, width)
        with torch.no_grad():
            out = model(x, c_noise, text)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_masked_text_tokens_equal_dropped_tokens() -> None:
    model = _model()
    x, c_noise, text = _inputs(2, 3, 6, 10, text_len=7)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 4:] = False
    with torch.no_grad():
        masked = model(x, c_noise, text, mask)
        dropped = model(x, c_noise, text[:, :4])
        unmasked = model(x, c_noise, text)
    torch.testing.assert_close(masked, dropped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(masked, unmasked, atol=1e-4)


def test_per_sample_mask_and_fully_masked_sample() -> None:
    model = _model()
    x, c_noise, text = _inputs(2, 1, 4, 4, text_len=6)
    mask = torch.tensor([[True] * 3 + [False] * 3, [False] * 6])
    with torch.no_grad():
        out = model(x, c_noise, text, mask)
        first = model(x[:1], c_noise[:1], text[:1, :3])
        other_text = model(x, c_noise, torch.randn(text.shape, generator=_gen(9)), mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:1], first, atol=1e-5, rtol=1e-5)
    # A sample with no real token gets no text conditioning: its text content is irrelevant.
    torch.testing.assert_close(out[1], other_text[1])


def _block_inputs(model: DiT, grid: tuple[int, int, int]) -> tuple[Tensor, ...]:
    g, h = _gen(3), SPEC.hidden_size
    tokens = torch.randn(2, grid[0] * grid[1] * grid[2], h, generator=g)
    c = model.embed_noise(torch.randn(2, generator=g))
    context = model.text_embedder(torch.randn(2, 5, SPEC.text_dim, generator=g))
    return tokens, c, context


def _run_blocks(model: DiT, tokens: Tensor, c: Tensor, context: Tensor, grid: tuple[int, int, int]) -> Tensor:
    rope = rope_3d(SPEC.attention_head_dim, grid)
    for block in model.blocks:
        tokens = block(tokens, c, context, rope)
    return tokens


@torch.no_grad()
def test_adaln_zero_blocks_are_identity_at_init() -> None:
    model, grid = _model(randomise=False), (3, 3, 5)
    tokens, c, context = _block_inputs(model, grid)
    assert torch.equal(_run_blocks(model, tokens, c, context, grid), tokens)
    _randomise_zero_init(model, _gen(4))
    assert not torch.allclose(_run_blocks(model, tokens, c, context, grid), tokens, atol=1e-3)


def test_gradients_reach_every_parameter() -> None:
    model = _model().train()
    x, c_noise, text = _inputs(2, 3, 6, 10)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[0, 3:] = False
    model(x, c_noise, text, mask).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_every_linear_is_named_by_the_plan() -> None:
    model = _model(randomise=False)
    assert model.parallel_plan is DIT_PARALLEL_PLAN
    assert DIT_PARALLEL_PLAN.unassigned_linears(model) == []
    roles = {n: DIT_PARALLEL_PLAN.linear_role(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert roles["blocks.1.self_attn.to_q"] == "column" and roles["blocks.0.mlp.fc1"] == "column"
    assert roles["blocks.0.cross_attn.to_out"] == "row" and roles["blocks.1.mlp.fc2"] == "row"
    assert roles["blocks.0.modulation"] == "replicated" and roles["final_layer.linear"] == "replicated"
    assert roles["text_embedder.linear_1"] == "replicated"
    self_attn = DIT_PARALLEL_PLAN.modules_matching(model, DIT_PARALLEL_PLAN.sequence_parallel_attention)
    assert [n for n, _ in self_attn] == [f"blocks.{i}.self_attn" for i in range(SPEC.num_layers)]
    assert isinstance(model.get_submodule(DIT_PARALLEL_PLAN.blocks), nn.ModuleList)
    text = [n for n, _ in DIT_PARALLEL_PLAN.modules_matching(model, DIT_PARALLEL_PLAN.text_linears)]
    assert text and all(roles[n] == "column" and "cross_attn" in n for n in text)


def test_attention_kernel_is_pluggable() -> None:
    calls: list[tuple[int, ...]] = []

    class Recording(SDPAAttention):
        def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
            calls.append(tuple(q.shape))
            return super().__call__(q, k, v, mask)

    model = DiT(SPEC, attention=Recording("math"))
    x, c_noise, text = _inputs(1, 1, 4, 4)
    model(x, c_noise, text)
    assert len(calls) == 2 * SPEC.num_layers
    assert calls[0] == (1, SPEC.num_attention_heads, 4, SPEC.attention_head_dim)
    assert all(isinstance(b.self_attn.kernel, Recording) for b in model.blocks)


def test_bf16_forward() -> None:
    model = _model().to(torch.bfloat16)
    x, c_noise, text = _inputs(2, 3, 6, 10)
    with torch.no_grad():
        out = model(x, c_noise, text)  # fp32 inputs drive a bf16 model
        ref = _model()(x, c_noise, text)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_init_is_reproducible_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a, b = DiT(SPEC, generator=_gen(5)), DiT(SPEC, generator=_gen(5))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert _same_params(a, b) and _same_params(DiT(SPEC), DiT(SPEC))
    assert not _same_params(a, DiT(SPEC, generator=_gen(6)))


def test_meta_build_then_init_weights_equals_direct_build() -> None:
    with torch.device("meta"):
        model = DiT(SPEC)
    model.to_empty(device="cpu")
    model.init_weights(_gen(5))
    assert _same_params(model, DiT(SPEC, generator=_gen(5)))


def test_odd_head_dim_is_rejected_up_front() -> None:
    with pytest.raises(ValueError, match="even for RoPE"):
        DiT(attrs.evolve(SPEC, attention_head_dim=5))


@pytest.mark.parametrize("spec", [DIT_TINY, DIT_S, attrs.evolve(DIT_TINY, patch_size=(2, 2, 2), out_channels=3)])
def test_closed_form_param_count_matches_module(spec: DiTSpec) -> None:
    with torch.device("meta"):
        model = DiT(spec)
    assert sum(p.numel() for p in model.parameters()) == dit_num_params(spec)


def test_dit_xl_param_count_on_meta() -> None:
    with torch.device("meta"):
        model = DiT(DIT_XL)
    n = sum(p.numel() for p in model.parameters())
    assert n == dit_num_params(DIT_XL)
    # DiT-XL/2 (image) is ~675M; cross-attention (4 h^2 per block) and the text MLP add ~150M.
    assert 780e6 < n < 860e6
    assert dit_num_params(DIT_S) < dit_num_params(DIT_B) < dit_num_params(DIT_L) < n
