"""The local runtime: accumulation, schedule, clipping, skipping, EMA, checkpointing, exact resume (CPU, fp32)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from support.errors import norm_rel
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dfm.adapters.local import LocalRuntime, is_checkpointed, lr_factor
from dfm.adapters.torch_dist.checkpointing import MATMUL_OPS, SAVED_OPS
from dfm.domain.batch import Batch
from dfm.domain.diffusion import EDM, FlowMatching
from dfm.domain.objective import LossOutput, training_loss
from dfm.domain.rng import SampleRNG
from dfm.domain.specs import DiTSpec, WanSpec
from dfm.ports.runtime import LossFn, OptimizerSettings, ParallelRuntime

TINY = dict(num_attention_heads=2, attention_head_dim=12, ffn_dim=48, num_layers=2, text_dim=32, freq_dim=16)
WAN = WanSpec(**TINY, in_channels=4, out_channels=4)
DIT = DiTSpec(**TINY, in_channels=4, out_channels=4)
ADAMW = OptimizerSettings(lr=1e-3, weight_decay=0.01)
SGD_LIKE = OptimizerSettings(lr=1e-2, eps=1.0)
"""With ``eps`` large against the gradients AdamW's first update is ``-lr * g / (|g| + eps)``, about ``-lr * g``."""

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def make_batch(size: int, seed: int = 0, start: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        latents=torch.randn(size, 4, 2, 4, 4, generator=g),
        text=torch.randn(size, 5, 32, generator=g),
        sample_index=torch.arange(start, start + size),
    )


def split(batch: Batch, sizes: list[int]) -> list[Batch]:
    out, at = [], 0
    for n in sizes:
        out.append(
            Batch(
                latents=batch.latents[at : at + n],
                text=batch.text[at : at + n],
                sample_index=batch.sample_index[at : at + n],
            )
        )
        at += n
    return out


def flow_loss(step: int, process: object | None = None) -> LossFn:
    process = FlowMatching() if process is None else process
    return lambda model, batch: training_loss(model, batch, process, SampleRNG(seed=0, step=step))


def built(spec: WanSpec | DiTSpec = WAN, settings: OptimizerSettings = ADAMW, **options: object) -> LocalRuntime:
    runtime = LocalRuntime(device="cpu", **options)
    runtime.build_network(spec)
    runtime.attach_optimizer(settings)
    return runtime


def params(runtime: LocalRuntime, use_ema: bool = False) -> dict[str, torch.Tensor]:
    model = runtime.inference_model(use_ema=use_ema)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def grads(runtime: LocalRuntime) -> dict[str, torch.Tensor]:
    return {
        n: p.grad.clone() for n, p in runtime.inference_model(use_ema=False).named_parameters() if p.grad is not None
    }


def train(runtime: LocalRuntime, steps: range, batch: Batch | None = None) -> list:
    batch = make_batch(4) if batch is None else batch
    half = batch.size // 2
    return [runtime.train_step(split(batch, [half, batch.size - half]), flow_loss(k), batch.size) for k in steps]


def flat_state(state: object, prefix: str = "") -> dict[str, object]:
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in flat_state(sub, f"{prefix}{key}/").items()}
    if isinstance(state, list | tuple) and any(isinstance(x, dict | torch.Tensor) for x in state):
        return {k: v for i, sub in enumerate(state) for k, v in flat_state(sub, f"{prefix}{i}/").items()}
    return {prefix: state.clone() if isinstance(state, torch.Tensor) else state}


def assert_states_equal(a: dict, b: dict) -> None:
    fa, fb = flat_state(a), flat_state(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert torch.equal(fa[k], fb[k]), k
        else:
            assert fa[k] == fb[k], k


# Building ---------------------------------------------------------------------------------------------


def test_implements_the_port_and_builds_deterministically() -> None:
    a, b, c = built(seed=3), built(seed=3), built(seed=4)
    assert isinstance(a, ParallelRuntime)
    assert a.topology.device == "cpu" and a.topology.world_size == 1
    pa, pb, pc = params(a), params(b), params(c)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], pc[n]) for n in pa)
    d1, d2 = built(DIT, seed=3), built(DIT, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(params(d1).values(), params(d2).values(), strict=True))


def test_weight_decay_groups_exclude_biases_norms_and_tables() -> None:
    runtime = built(settings=OptimizerSettings(lr=1e-3, weight_decay=0.1))
    model = runtime.inference_model(use_ema=False)
    named = dict(model.named_parameters())
    no_decay = {n for n, p in named.items() if not model.parallel_plan.decays(n, p)}
    assert "blocks.0.scale_shift_table" in no_decay and "scale_shift_table" in no_decay
    assert "blocks.0.attn1.to_q.bias" in no_decay and "blocks.0.attn1.norm_q.weight" in no_decay
    assert "blocks.0.attn1.to_q.weight" not in no_decay and "patch_embedding.weight" not in no_decay
    groups = runtime.state_dict()["optimizer"]["param_groups"]
    by_decay = {g["weight_decay"]: set(g["params"]) for g in groups}
    assert by_decay == {0.1: set(named) - no_decay, 0.0: no_decay}


# Training ---------------------------------------------------------------------------------------------


def test_gradient_accumulation_is_independent_of_the_split() -> None:
    batch, results, grad_sets, weights = make_batch(4), [], [], []
    for sizes in ([4], [2, 2], [1, 1, 1, 1], [3, 1]):
        runtime = built(settings=SGD_LIKE, grad_clip=None)
        results.append(runtime.train_step(split(batch, sizes), flow_loss(0), 4))
        grad_sets.append(grads(runtime))
        weights.append(params(runtime))
    before = params(built(settings=SGD_LIKE))
    for result, g, w in zip(results[1:], grad_sets[1:], weights[1:], strict=True):
        assert result.loss == pytest.approx(results[0].loss, rel=1e-6)
        assert result.grad_norm == pytest.approx(results[0].grad_norm, rel=1e-6)
        assert result.metrics == pytest.approx(results[0].metrics, rel=1e-6)
        for n in g:
            assert norm_rel(g[n], grad_sets[0][n]) <= 1e-6, n
            if (weights[0][n] - before[n]).norm() > 0:
                assert norm_rel(w[n] - before[n], weights[0][n] - before[n]) <= 1e-6, n


def test_loss_decreases_on_a_fixed_batch() -> None:
    runtime = built(settings=OptimizerSettings(lr=3e-3))
    batch, fixed = make_batch(4), flow_loss(0)
    losses = [runtime.train_step([batch], fixed, 4).loss for _ in range(20)]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0]


def test_lr_schedule_follows_the_closed_form() -> None:
    lr, warmup, total, floor = 1e-3, 3, 10, 0.1
    settings = OptimizerSettings(lr=lr, schedule="cosine", warmup_steps=warmup, total_steps=total, min_lr_ratio=floor)
    expected = [lr * (s + 1) / (warmup + 1) for s in range(warmup)]
    expected += [
        lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / (total - warmup)))))
        for s in range(warmup, 12)
    ]
    runtime = built(settings=settings)
    got = [runtime.train_step([make_batch(1)], flow_loss(k), 1).lr for k in range(12)]
    assert got == pytest.approx(expected, rel=1e-12)
    assert got[warmup] == pytest.approx(lr) and got[total] == pytest.approx(floor * lr)
    constant = OptimizerSettings(lr=lr, warmup_steps=2)
    assert [lr_factor(s, constant) for s in range(5)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, 1.0])


def test_gradient_clipping_matches_a_manual_adamw_update() -> None:
    clip, batch = 1e-3, make_batch(4)
    runtime = built(settings=SGD_LIKE, grad_clip=clip)
    before = params(runtime)
    reference = built(settings=SGD_LIKE)  # same seed: same weights
    model = reference.inference_model(use_ema=False).train()
    flow_loss(0)(model, batch).loss.backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.values()]))
    assert norm > 100 * clip  # clipping is active
    result = runtime.train_step(split(batch, [2, 2]), flow_loss(0), 4)
    assert result.grad_norm == pytest.approx(float(norm), rel=1e-5)  # reported before clipping
    coef = clip / (float(norm) + 1e-6)
    after = params(runtime)
    for n, g in raw.items():
        clipped = g * coef  # AdamW's first step: m_hat = g, sqrt(v_hat) = |g|
        expected = before[n] - SGD_LIKE.lr * clipped / (clipped.abs() + SGD_LIKE.eps)
        torch.testing.assert_close(after[n], expected, rtol=1e-6, atol=1e-9)
    update = torch.cat([(after[n] - before[n]).flatten() for n in raw]).norm()
    assert float(update) == pytest.approx(SGD_LIKE.lr * clip, rel=1e-3)


def _nan_loss(model: nn.Module, batch: Batch) -> LossOutput:
    out = flow_loss(1)(model, batch)
    return LossOutput(loss=out.loss * math.nan, per_sample=out.per_sample * math.nan, metrics=out.metrics)


def _overflowing_loss(model: nn.Module, batch: Batch) -> LossOutput:
    out = flow_loss(1)(model, batch)  # finite loss (~1e30) whose gradient norm overflows float32
    return LossOutput(loss=out.loss * 1e30, per_sample=out.per_sample * 1e30, metrics=out.metrics)


@pytest.mark.parametrize("bad_loss", [_nan_loss, _overflowing_loss], ids=["nan-loss", "inf-grad-norm"])
def test_nonfinite_step_is_skipped_without_touching_state(bad_loss: Callable) -> None:
    settings = OptimizerSettings(lr=1e-3, schedule="cosine", warmup_steps=2, total_steps=10)
    runtime = built(settings=settings, ema_decay=0.9)
    train(runtime, range(1))
    state_before, lr_next = flat_state(runtime.state_dict()), lr_factor(1, settings) * settings.lr
    result = runtime.train_step(split(make_batch(4), [2, 2]), bad_loss, 4)
    assert result.skipped and not (math.isfinite(result.loss) and math.isfinite(result.grad_norm))
    assert result.lr == pytest.approx(lr_next)
    assert_states_equal(flat_state(runtime.state_dict()), state_before)
    assert all(p.grad is None for p in runtime.inference_model(use_ema=False).parameters())
    follow = runtime.train_step(split(make_batch(4), [2, 2]), flow_loss(1), 4)
    assert not follow.skipped and follow.lr == pytest.approx(lr_next)


def test_ema_is_the_closed_form_average_of_the_trajectory() -> None:
    d = 0.9
    runtime = built(ema_decay=d)
    trajectory = [params(runtime)]
    for k in range(3):
        train(runtime, range(k, k + 1))
        trajectory.append(params(runtime))
    ema = params(runtime, use_ema=True)
    for n, e in ema.items():
        p0, p1, p2, p3 = (t[n] for t in trajectory)
        expected = d**3 * p0 + (1 - d) * (d**2 * p1 + d * p2 + p3)
        torch.testing.assert_close(e, expected, rtol=1e-6, atol=1e-7)
    assert not runtime.inference_model().training
    assert runtime.inference_model(use_ema=True) is not runtime.inference_model(use_ema=False)


class _AttentionCalls(TorchDispatchMode):
    """Counts the fused attention kernels and the GEMMs dispatched (forward and recompute) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += func in SAVED_OPS
        self.matmuls += func in MATMUL_OPS
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_keeps_gradients_and_keys() -> None:
    ffn = {"off": 0, "full": 0, "selective": 0, "selective_matmul": 0}
    attention, matmuls, runtimes = {}, {}, {}
    for mode in ffn:
        runtime = built(activation_checkpointing=mode, ema_decay=0.99)
        model = runtime.inference_model(use_ema=False)
        model.blocks[0].ffn.register_forward_hook(lambda *_, m=mode: ffn.__setitem__(m, ffn[m] + 1))
        with _AttentionCalls() as calls:
            train(runtime, range(1), make_batch(2))
        attention[mode], matmuls[mode], runtimes[mode] = calls.count, calls.matmuls, runtime
    # two micro-batches; every checkpointing mode runs the FFN module again (selective_matmul replays its GEMMs)
    assert ffn == {"off": 2, "full": 4, "selective": 4, "selective_matmul": 4}
    blocks = len(runtimes["off"].inference_model(use_ema=False).blocks)
    # self- and cross-attention per block and micro-batch; full runs them again, selective keeps their outputs
    assert attention == {"off": 4 * blocks, "full": 8 * blocks, "selective": 4 * blocks, "selective_matmul": 4 * blocks}
    # the GEMMs inside the blocks run again under full and selective, not under selective_matmul
    assert matmuls["selective_matmul"] == matmuls["off"] < matmuls["selective"] == matmuls["full"]
    g_off = grads(runtimes["off"])
    for mode in ("full", "selective", "selective_matmul"):
        g = grads(runtimes[mode])
        assert g.keys() == g_off.keys()
        for n in g_off:
            torch.testing.assert_close(g[n], g_off[n], rtol=1e-6, atol=0), (mode, n)
        s_off, s = runtimes["off"].state_dict(), runtimes[mode].state_dict()
        assert flat_state(s_off).keys() == flat_state(s).keys()
        assert list(s_off["model"]) == list(s["model"]) == list(runtimes["off"].inference_model().state_dict())
    every2 = built(activation_checkpointing="full", activation_checkpointing_every_k=2).inference_model(use_ema=False)
    assert [is_checkpointed(b) for b in every2.blocks] == [False, True]


# State ------------------------------------------------------------------------------------------------

RESUME = OptimizerSettings(
    lr=1e-3, weight_decay=0.01, schedule="cosine", warmup_steps=1, total_steps=6, min_lr_ratio=0.1
)


def test_state_dict_of_a_fresh_runtime_does_not_change_training() -> None:
    a, b = built(settings=RESUME), built(settings=RESUME)
    state = a.state_dict()  # creates no optimizer step (the state exists from build on, with step 0)
    assert all(float(s["step"]) == 0 for s in state["optimizer"]["state"].values())
    train(a, range(2))
    train(b, range(2))
    assert all(torch.equal(x, y) for x, y in zip(params(a).values(), params(b).values(), strict=True))


def test_resume_from_state_dict_continues_exactly() -> None:
    a = built(settings=RESUME, ema_decay=0.9)
    train(a, range(2))
    b = built(settings=RESUME, ema_decay=0.9, seed=7)  # other initial weights: everything must come from the state
    b.load_state_dict(a.state_dict())
    assert_states_equal(b.state_dict(), a.state_dict())
    ra, rb = train(a, range(2, 4)), train(b, range(2, 4))
    assert [r.loss for r in ra] == [r.loss for r in rb] and [r.lr for r in ra] == [r.lr for r in rb]
    assert_states_equal(b.state_dict(), a.state_dict())


def test_resume_through_torch_distributed_checkpoint(tmp_path: object) -> None:
    a = built(settings=RESUME, ema_decay=0.9)
    train(a, range(2))
    dcp.save(a.state_dict(), checkpoint_id=str(tmp_path))
    b = built(settings=RESUME, ema_decay=0.9, seed=7)
    state = b.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    b.load_state_dict(state)
    assert_states_equal(b.state_dict(), a.state_dict())  # optimizer moments and steps, schedule, EMA
    opt_a, opt_b = a._optimizer.state_dict(), b._optimizer.state_dict()  # the torch-native view agrees too
    assert_states_equal(opt_b, opt_a)
    train(a, range(2, 4))
    train(b, range(2, 4))
    assert_states_equal(b.state_dict(), a.state_dict())


RETUNED = OptimizerSettings(
    lr=4e-3, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.1, schedule="cosine", warmup_steps=1, total_steps=6,
    min_lr_ratio=0.1,
)  # fmt: skip
"""Every hyper-parameter of :data:`RESUME` changed, as a user changes ``optim.*`` before resuming."""


def test_resume_with_changed_settings_uses_them_and_keeps_the_moments() -> None:
    """The checkpoint gives the moments, step counters and schedule position; the config gives lr, betas, eps, wd."""
    a = built(settings=RESUME)
    train(a, range(2))
    saved = a.state_dict()
    b = built(settings=RETUNED, seed=7)
    b.load_state_dict(saved)
    moments = {n: {k: v.clone() for k, v in s.items()} for n, s in b.state_dict()["optimizer"]["state"].items()}
    assert_states_equal(moments, saved["optimizer"]["state"])  # the moments and step counters are the run's
    lr = RETUNED.lr * lr_factor(2, RETUNED)
    groups = b._optimizer.param_groups
    assert [g["lr"] for g in groups] == [lr, lr] and b._schedule.lr() == lr
    assert {(g["betas"], g["eps"]) for g in groups} == {(RETUNED.betas, RETUNED.eps)}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, RETUNED.weight_decay]
    before = params(b)
    (result,) = train(b, range(2, 3))
    assert result.lr == lr
    b1, b2 = RETUNED.betas
    model = b.inference_model(use_ema=False)
    for group in groups:  # AdamW step 3 by hand, with the new settings and the saved moments
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            g, m, v = p.grad, moments[name]["exp_avg"], moments[name]["exp_avg_sq"]
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            denom = (v.sqrt() / math.sqrt(1 - b2**3)) + RETUNED.eps
            expected = before[name] * (1 - lr * group["weight_decay"]) - lr / (1 - b1**3) * m / denom
            # rounding of terms as large as the step (about lr) where the weight and its step cancel: 1.3 ulp seen
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6 * lr)
    (following,) = train(b, range(3, 4))
    assert following.lr == RETUNED.lr * lr_factor(3, RETUNED)  # the schedule goes on with the new settings


def test_load_state_dict_rejects_a_mismatched_model() -> None:
    state = built().state_dict()
    other = built(WanSpec(**{**TINY, "num_layers": 1}, in_channels=4, out_channels=4))
    with pytest.raises(ValueError, match=r"unexpected keys \(\d+\): blocks\.1\."):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="lacks"):
        other.load_state_dict({"model": state["model"]})


def test_load_weights_is_strict_and_restarts_the_ema() -> None:
    source = built(seed=5).inference_model(use_ema=False).state_dict()
    runtime = built(ema_decay=0.99)
    runtime.load_weights(source)
    for name, value in params(runtime, use_ema=True).items():
        assert torch.equal(value, source[name])
    assert all(torch.equal(v, source[n]) for n, v in params(runtime).items())
    broken = {k: v for k, v in source.items() if k != "proj_out.weight"} | {"extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"missing keys \(1\): proj_out\.weight.*unexpected keys \(1\): extra\.weight"):
        runtime.load_weights(broken)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): proj_out\.bias"):
        runtime.load_weights(source | {"proj_out.bias": torch.zeros(3)})


# DiT, options, reporting ------------------------------------------------------------------------------


def test_dit_with_edm_trains() -> None:
    runtime = built(DIT, settings=OptimizerSettings(lr=1e-3), activation_checkpointing="full")
    results = [runtime.train_step(split(make_batch(4), [2, 2]), flow_loss(k, EDM()), 4) for k in range(3)]
    assert not any(r.skipped for r in results) and all(math.isfinite(r.loss) for r in results)
    assert set(results[0].metrics) == {"mse", "sigma_mean", "weight_mean", "text_dropped"}


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"precision": "fp16"}, "precision"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"activation_checkpointing": "some"}, "activation_checkpointing"),
        ({"activation_checkpointing_every_k": 0}, "activation_checkpointing_every_k"),
        ({"attention_backend": "xformers"}, "backend"),
        ({"device": "tpu7"}, "device"),
    ],
)
def test_invalid_options_are_value_errors(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LocalRuntime(**{"device": "cpu", **options})


def test_invalid_settings_and_batches_are_value_errors() -> None:
    with pytest.raises(ValueError, match="min_lr_ratio"):
        built(settings=OptimizerSettings(lr=1e-3, min_lr_ratio=2.0))
    with pytest.raises(ValueError) as non_finite:  # API users get the checks the config makes
        built(settings=OptimizerSettings(lr=math.inf, eps=math.nan, weight_decay=math.inf))
    assert str(non_finite.value) == (
        "invalid optimizer settings: lr must be a finite number > 0, got inf; eps must be a finite number > 0, "
        "got nan; weight_decay must be a finite number >= 0, got inf"
    )
    runtime = built()
    with pytest.raises(ValueError, match="global_batch_size is 8"):
        runtime.train_step(split(make_batch(4), [2, 2]), flow_loss(0), 8)
    with pytest.raises(RuntimeError, match="build"):
        LocalRuntime(device="cpu").state_dict()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_cpu_defaults_and_memory_report() -> None:
    runtime = LocalRuntime()
    assert runtime.topology.device == "cpu" and runtime.autocast_dtype is None
    assert LocalRuntime(precision="bf16").autocast_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="no CUDA device"):
        LocalRuntime(device="cuda")
    assert 0.01 < runtime.max_memory_gib() < 1024


@pytest.mark.gpu
def test_cuda_bf16_fused_adamw_and_resume(tmp_path: object) -> None:
    a = LocalRuntime(ema_decay=0.9, activation_checkpointing="full")  # auto: CUDA, bf16 autocast
    a.build_network(WAN)
    a.attach_optimizer(RESUME)
    assert a.topology.device.startswith("cuda:") and a.autocast_dtype is torch.bfloat16
    assert all(g["fused"] for g in a.state_dict()["optimizer"]["param_groups"])
    assert all(p.dtype == torch.float32 and p.is_cuda for p in a.inference_model(use_ema=False).parameters())
    reference = built(settings=RESUME)  # fp32 on the CPU, same initial weights
    assert all(torch.equal(x.cpu(), y) for x, y in zip(params(a).values(), params(reference).values(), strict=True))
    ra, rr = train(a, range(2)), train(reference, range(2))
    assert not any(r.skipped for r in ra)
    assert [r.loss for r in ra] == pytest.approx([r.loss for r in rr], rel=5e-2)
    dcp.save(a.state_dict(), checkpoint_id=str(tmp_path))
    b = LocalRuntime(ema_decay=0.9, activation_checkpointing="full", seed=7)
    b.build_network(WAN)
    b.attach_optimizer(RESUME)
    state = b.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path))
    b.load_state_dict(state)
    assert_states_equal(b.state_dict(), a.state_dict())
    train(a, range(2, 4))
    train(b, range(2, 4))
    for x, y in zip(params(a).values(), params(b).values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert 0.0 < a.max_memory_gib() < 80
