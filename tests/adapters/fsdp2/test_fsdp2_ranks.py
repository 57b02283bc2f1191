"""The fsdp2 runtime on gloo process groups against the local runtime (the single-process reference).

Two launches of ``fsdp2_worker.py`` (2 and 4 ranks) train every layout for 3 steps from the same seed
and weights, save a checkpoint at one layout and load it at others; the references are computed here
with ``LocalRuntime`` on the same batches, fp32, same clipping, schedule and EMA. The 2-rank launch also
trains a tensor-parallel run with the training service and exports it to diffusers on both ranks; here,
one process loads that checkpoint (and generates from it) with the local runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file
from support.distributed import load_worker, pose_as_rank, run_ranks
from support.errors import max_rel
from support.tolerances import assert_adam_trained_alike

from dfm.adapters.checkpoint import DCPCheckpointStore
from dfm.adapters.local import LocalRuntime
from dfm.adapters.memory import InMemoryVideoWriter
from dfm.app.config import config_from_yaml
from dfm.app.services.checkpoints import EXPORTED_CONFIG, export_checkpoint, load_for_inference
from dfm.app.services.generation import GenerateRequest, generate
from dfm.ports.checkpoint import CheckpointError

HERE = Path(__file__).resolve().parent
WORKER = HERE / "fsdp2_worker.py"
PAIRS = {2: ["shard", "replicate", "tensor", "context"], 4: ["shard_tensor", "context_tensor", "replicate_shard"]}
RTOL = 1e-5

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


worker = load_worker(WORKER, "fsdp2_worker_shared")


def whole(runtime: LocalRuntime) -> dict[str, torch.Tensor]:
    """Weights and EMA weights as the worker dumps them (``ema.module.<name>``; float tensors only)."""
    state = runtime.state_dict()
    weights = {k: v.detach().clone() for k, v in state["model"].items()}
    return weights | {"ema." + k: v.clone() for k, v in state["ema"].items() if v.is_floating_point()}


def local_runtime() -> LocalRuntime:
    runtime = LocalRuntime(**worker.OPTIONS)
    runtime.build_network(worker.SPEC)
    runtime.attach_optimizer(worker.SETTINGS)
    return runtime


def local_steps(runtime: LocalRuntime, steps: range) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"loss": [], "grad_norm": [], "lr": []}
    for step in steps:
        result = runtime.train_step(
            worker.micro_batches(worker.batch(step), 0, worker.GLOBAL_BATCH, 2), worker.loss_fn(step), 4
        )
        for key in out:
            out[key].append(getattr(result, key))
    return out


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    runtime = local_runtime()
    init = {k: v.detach().clone() for k, v in runtime.state_dict()["model"].items()}
    runtime.load_weights(worker.start_weights())
    start = whole(runtime)  # the EMA restarts from the loaded weights
    steps = local_steps(runtime, range(worker.STEPS))
    return {"init": init, "start": start, "final": whole(runtime), **steps}


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both launches: the world-2 layouts, checkpoint resume and errors, then the world-4 layouts."""
    out = tmp_path_factory.mktemp("fsdp2")
    results: dict[str, Any] = {"out": out}
    for world, cases in PAIRS.items():
        extra = (
            ["resume", "errors", "bf16", "export", "lora_tensor", "lora_shard", "i2v_tensor", "i2v_context"]
            if world == 2
            else ["lora_context_tensor"]
        )
        ranks = run_ranks(WORKER, world, [str(out), *cases, *extra], timeout=180)
        assert all(r.keys() == ranks[0].keys() for r in ranks)
        results |= ranks[0]
        results[f"ranks{world}"] = ranks
    return results


@pytest.mark.parametrize("layout", [name for names in PAIRS.values() for name in names])
def test_layout_reproduces_the_local_runtime(layout: str, launches: dict[str, Any], reference: dict[str, Any]) -> None:
    """The seed's weights exactly; each step's loss and gradient norm within 1e-5; the final weights and EMA as
    far as AdamW lets two kernels agree (``support.tolerances``: a per-element bound holds on one CPU only)."""
    out: Path = launches["out"]
    got = launches[layout]
    sizes = worker.LAYOUTS[layout]
    assert got["topology"]["tp"] == sizes.get("tensor", 1) and got["topology"]["cp"] == sizes.get("context", 1)
    key = "activation_checkpointing_every_k"
    every = worker.CHECKPOINTED.get(layout, {key: 0}).get(key, 1)
    assert got["checkpointed"] == [every > 0 and (i + 1) % every == 0 for i in range(2)]
    init = load_file(str(out / f"{layout}.init.safetensors"))
    assert init.keys() == reference["init"].keys()
    assert all(torch.equal(init[k], reference["init"][k]) for k in init), "init_weights per shard != local draw"
    for key in ("loss", "grad_norm"):
        errors = [max_rel(a, b) for a, b in zip(got[key], reference[key], strict=True)]
        assert max(errors) <= RTOL, (key, got[key], reference[key])
    assert got["lr"] == reference["lr"]
    world = 2 if layout in PAIRS[2] else 4
    for rank in launches[f"ranks{world}"]:
        assert rank[layout]["loss"] == got["loss"], "ranks disagree on the reduced loss"
    final, want, start = load_file(str(out / f"{layout}.final.safetensors")), reference["final"], reference["start"]
    assert final.keys() == want.keys()
    for part in (lambda k: not k.startswith("ema."), lambda k: k.startswith("ema.")):  # weights, then their EMA
        keys = [k for k in want if part(k)]
        assert_adam_trained_alike({k: final[k] for k in keys}, {k: want[k] for k in keys}, {k: start[k] for k in keys})


def test_checkpoint_loads_at_other_layouts_and_locally(launches: dict[str, Any], reference: dict[str, Any]) -> None:
    """Saved at data_shard=2 after 2 steps; loaded at data_shard=2, at tensor=2 and into the local runtime."""
    out: Path = launches["out"]
    saved = load_file(str(out / "saved.safetensors"))
    for layout in ("shard", "tensor"):
        loaded = load_file(str(out / f"loaded_{layout}.safetensors"))
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[k], saved[k]) for k in saved), layout
    local = local_runtime()
    state = {"runtime": local.state_dict()}
    DCPCheckpointStore(out / "ckpt").load(out / "ckpt", state)
    local.load_state_dict(state["runtime"])
    mine = whole(local)
    assert mine.keys() == saved.keys()
    assert all(torch.equal(mine[k], saved[k]) for k in saved)
    assert int(local.state_dict()["ema"]["n_averaged"]) == 3
    step3 = local_steps(local, range(2, 3))  # the local runtime continues the fsdp2 run
    assert max_rel(step3["loss"][0], reference["loss"][2]) <= RTOL


def test_weights_alone_load_from_a_sharded_checkpoint(launches: dict[str, Any]) -> None:
    """The checkpoint saved at data_shard=2 after 2 steps: its EMA and raw weights, read alone (no optimizer) into
    networks built for inference at tensor=2 and into the local runtime, are the saved ones exactly (bf16: rounded)."""
    out: Path = launches["out"]
    saved = load_file(str(out / "saved.safetensors"))
    ema = {k.removeprefix("ema.module."): v for k, v in saved.items() if k.startswith("ema.module.")}
    model = {k: v for k, v in saved.items() if not k.startswith("ema.")}
    assert ema.keys() == model.keys() and any(not torch.equal(ema[k], model[k]) for k in ema)
    cases = {"ema_float32": ema, "model_float32": model, "ema_bfloat16": ema}
    assert launches["resume"]["weights_only"] == {name: [f"torch.{name.partition('_')[2]}"] for name in cases}
    for name, want in cases.items():
        dtype = getattr(torch, name.partition("_")[2])
        got = load_file(str(out / f"weights_{name}.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].to(dtype)) for k in want), name
    store = DCPCheckpointStore(out / "ckpt")
    for use_ema, want in ((True, ema), (False, model)):
        local = LocalRuntime(**worker.OPTIONS)
        network = local.build_network(worker.SPEC, inference_dtype=torch.float32)
        local.restore_weights(lambda state: store.load(out / "ckpt", {"runtime": state}), use_ema=use_ema)
        got = network.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_continues_exactly(launches: dict[str, Any], reference: dict[str, Any]) -> None:
    """2 steps + save, then load and 1 step == 3 straight steps (bit-exact at the same layout)."""
    out: Path = launches["out"]
    straight = launches["shard"]
    resumed = launches["resume"]
    assert resumed["shard"]["loss"] == straight["loss"][2:]
    assert resumed["shard"]["grad_norm"] == straight["grad_norm"][2:]
    final = load_file(str(out / "shard.final.safetensors"))
    again = load_file(str(out / "resumed_shard.safetensors"))
    assert all(torch.equal(again[k], final[k]) for k in final)
    assert max_rel(resumed["tensor"]["loss"][0], reference["loss"][2]) <= RTOL
    moved, saved = load_file(str(out / "resumed_tensor.safetensors")), load_file(str(out / "saved.safetensors"))
    assert_adam_trained_alike(moved, final, saved)  # one AdamW step from the checkpoint at another layout


def test_layout_errors_name_the_config_keys(launches: dict[str, Any]) -> None:
    errors = launches["errors"]
    assert errors["world"].startswith(
        "the parallel layout does not match the world size: parallel.data_replicate=1 * parallel.data_shard=2 * "
        "parallel.context=1 * parallel.tensor=2 = 4, but 2 processes were launched"
    )
    assert "the model's 3 attention heads are not divisible by parallel.tensor=2" in errors["heads"]
    assert errors["tokens"].startswith(
        "parallel.context=2 splits the video tokens over ranks, but these latents have 3 tokens (grid (3, 1, 1)"
    )
    assert "data.frames/data.height/data.width" in errors["tokens"]


def test_bf16_mixed_precision_tracks_fp32(launches: dict[str, Any], reference: dict[str, Any]) -> None:
    """FSDP's bf16 compute with fp32 master weights and reduction, activation checkpointing, 2 data ranks."""
    got = launches["bf16"]
    assert max(max_rel(a, b) for a, b in zip(got["loss"], reference["loss"], strict=True)) <= 2e-2
    assert got["param_dtypes"] == ["torch.float32"]
    assert got["output_dtype"] == "torch.bfloat16"
    assert got["compiled"] == [False, False]  # train.compile is ignored on the CPU


# Export of a checkpoint trained at parallel.tensor=2 ------------------------------------------------


def test_export_on_two_ranks_gives_the_weights_one_process_loads(launches: dict[str, Any]) -> None:
    """EMA (fp32) and raw (bf16, several files) exports load in diffusers with the local runtime's weights."""
    out: Path = launches["out"]
    assert all(rank["export"] == {"ema": ["ema", 2, 2], "raw": ["model", 2, 2]} for rank in launches["ranks2"])
    cfg, ema = load_for_inference(out / "tp_run")
    _, raw = load_for_inference(out / "tp_run", use_ema=False)
    assert (cfg.runtime, cfg.parallel.tensor) == ("fsdp2", 2)
    mine, theirs = ema.state_dict(), WanTransformer3DModel.from_pretrained(out / "tp_ema").state_dict()
    assert theirs.keys() == mine.keys() and all(torch.equal(theirs[k], mine[k]) for k in mine)
    assert len(list((out / "tp_raw").glob("diffusion_pytorch_model-*.safetensors"))) > 1
    plain, theirs = raw.state_dict(), WanTransformer3DModel.from_pretrained(out / "tp_raw").state_dict()
    assert theirs.keys() == plain.keys() and all(torch.equal(theirs[k], plain[k].bfloat16().float()) for k in plain)
    assert any(not torch.equal(mine[k], plain[k]) for k in mine), "the EMA should differ from the raw weights"
    for name in ("tp_ema", "tp_raw"):
        assert config_from_yaml((out / name / EXPORTED_CONFIG).read_text()) == cfg


def test_one_process_generates_from_the_fsdp2_checkpoint_and_its_export(launches: dict[str, Any]) -> None:
    out: Path = launches["out"]
    videos = []
    for source in (out / "tp_run", out / "tp_ema"):
        writer = InMemoryVideoWriter()
        request = GenerateRequest(
            checkpoint=source, prompts=["a red circle"], out=out / "v.mp4", steps=2, progress=False
        )
        generate(request, writer=writer)
        videos += list(writer.videos.values())
    assert videos[0].shape == (5, 16, 16, 3) and torch.equal(videos[0], videos[1])
    sampled = iio.imread(out / "tp_run" / "samples" / "step_0000002.png")  # by both ranks while training (EMA)
    generated = iio.imread(out / "v.png")
    assert sampled.shape == generated.shape and np.abs(sampled.astype(np.int16) - generated).max() <= 1


def test_export_refuses_a_launch_the_training_layout_does_not_fit(
    launches: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Checked before any process group is joined, so this one process can pose as rank 0 of 3."""
    run: Path = launches["out"] / "tp_run"
    pose_as_rank(monkeypatch, world=3)
    with pytest.raises(CheckpointError) as caught:
        export_checkpoint(run, tmp_path / "x")
    assert str(caught.value) == (
        f"{run}/checkpoints/step_0000002 was trained with parallel.data_replicate=1, parallel.data_shard=-1, "
        "parallel.context=1, parallel.tensor=2, which needs a multiple of 2 processes, but 3 were launched; "
        "launch the export with a process count that fits (torchrun --nproc-per-node N), or run it as one "
        "process, which loads any layout"
    )
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def lora_reference() -> dict[str, Any]:
    """The local runtime training :data:`worker.LORA` adapters (float32 base) on the same steps."""
    runtime = LocalRuntime(**worker.OPTIONS, lora=worker.LORA)
    runtime.build_network(worker.SPEC)
    runtime.attach_optimizer(worker.SETTINGS)
    runtime.load_weights(worker.start_weights())
    start = whole(runtime)
    steps = local_steps(runtime, range(worker.STEPS))
    return {"start": start, "final": whole(runtime), **steps}


@pytest.mark.parametrize("layout", ["tensor", "context_tensor"])
def test_lora_layout_reproduces_the_local_runtime(
    layout: str, launches: dict[str, Any], lora_reference: dict[str, Any]
) -> None:
    """LoRA under tensor (and context) parallelism: the adapters of a column-parallel linear split B, of a
    row-parallel one A; losses and gradient norms as the local runtime's, the trained adapters and their EMA
    as AdamW lets two kernels agree; the state's model entry holds the adapters alone."""
    got = launches[f"lora_{layout}"]
    for key in ("loss", "grad_norm"):
        errors = [max_rel(a, b) for a, b in zip(got[key], lora_reference[key], strict=True)]
        assert max(errors) <= RTOL, (key, got[key], lora_reference[key])
    want, start = lora_reference["final"], lora_reference["start"]
    assert got["model_keys"] == sorted(k for k in want if not k.startswith("ema."))
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in got["model_keys"])
    final = load_file(str(launches["out"] / f"lora_{layout}.final.safetensors"))
    assert final.keys() == want.keys()
    for part in (lambda k: not k.startswith("ema."), lambda k: k.startswith("ema.")):
        keys = [k for k in want if part(k)]
        assert_adam_trained_alike({k: final[k] for k in keys}, {k: want[k] for k in keys}, {k: start[k] for k in keys})


def test_lora_on_a_bf16_base_tracks_the_float32_one(launches: dict[str, Any], lora_reference: dict[str, Any]) -> None:
    """A bf16 frozen base (FSDP over 2 ranks, bf16 compute, float32 adapters) follows the float32 run's losses."""
    got = launches["lora_shard"]
    errors = [max_rel(a, b) for a, b in zip(got["loss"], lora_reference["loss"], strict=True)]
    assert max(errors) <= 2e-2, (got["loss"], lora_reference["loss"])


def test_image_to_video_trains_alike_under_tensor_and_context_parallelism(
    launches: dict[str, Any], tmp_path: Path
) -> None:
    """``wan_tiny_i2v`` at tensor 2 (the image keys and values split like the text's) and context 2 (the image
    replicated like the text) gives the one-process run's losses."""
    from dfm.adapters.tracking import read_metrics
    from dfm.app.config import resolve_config
    from dfm.app.services.training import train

    train(resolve_config("wan_tiny_i2v", None, [f"run.dir={tmp_path}", "train.max_steps=2", "logging.level=WARNING"]))
    want = [row["loss"] for row in read_metrics(tmp_path / "metrics.jsonl")]
    for layout in ("tensor", "context"):
        got = launches[f"i2v_{layout}"]
        assert len(got) == 2 and max(max_rel(a, b) for a, b in zip(got, want, strict=True)) <= RTOL, (layout, got, want)
