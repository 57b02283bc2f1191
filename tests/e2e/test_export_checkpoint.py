"""A training checkpoint exported to diffusers in one process: loadable by diffusers, and by generate.

The multi-rank export (a checkpoint trained at ``parallel.tensor=2``, exported on 2 ranks) is tested
with the FSDP2 runtime in ``tests/adapters/fsdp2/test_fsdp2_ranks.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file
from support.cli import cli
from support.distributed import pose_as_rank

from dfm.adapters.diffusers import INDEX_NAME, WEIGHTS_NAME
from dfm.app import convert
from dfm.app.config import config_from_yaml, resolve_config
from dfm.app.services.checkpoints import EXPORTED_CONFIG, export_checkpoint, load_for_inference
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.training import train
from dfm.ports.checkpoint import CheckpointError

PROMPT = "a red circle moving left slowly"


def _train(out: Path, recipe: str, steps: int) -> Path:
    overrides = [f"run.dir={out}", f"train.max_steps={steps}", "train.ema_decay=0.9", "logging.level=WARNING"]
    train(resolve_config(recipe, None, overrides))
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("export") / "run", "wan_tiny_t2v", 2)


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    """The CLI's export of the run's EMA weights in float32."""
    out = run_dir.parent / "exported"
    done = cli("convert", "export", "--checkpoint", str(run_dir), "--out", str(out), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"exported EMA weights of {run_dir}/checkpoints/step_0000002 (step 2) -> {out}"
    return out


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 3, 4, 6, generator=g), torch.tensor([250.0, 900.0]), torch.randn(2, 5, 32, generator=g)


@torch.no_grad()
def test_the_export_is_the_checkpoints_ema_or_raw_model_in_diffusers(
    run_dir: Path, exported: Path, tmp_path: Path
) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json",
        EXPORTED_CONFIG,
        WEIGHTS_NAME,
    ]
    raw = export_checkpoint(run_dir, tmp_path / "raw", use_ema=False)
    assert (raw.weights, raw.step, raw.ranks) == ("model", 2, 1)
    x, t, text = _inputs()
    for use_ema, path in ((True, exported), (False, raw.out)):
        cfg, ours = load_for_inference(run_dir, use_ema=use_ema)
        theirs = WanTransformer3DModel.from_pretrained(path)
        mine = ours.state_dict()
        assert theirs.state_dict().keys() == mine.keys()
        assert all(torch.equal(theirs.state_dict()[k], v) for k, v in mine.items())
        a, b = ours(x, t, text), theirs(x, t, text).sample
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5
        assert config_from_yaml((path / EXPORTED_CONFIG).read_text()) == cfg
    ema, plain = load_file(exported / WEIGHTS_NAME), load_file(raw.out / WEIGHTS_NAME)
    assert any(not torch.equal(ema[k], plain[k]) for k in ema), "the EMA should differ from the raw weights"


def test_generate_from_the_export_writes_the_same_mp4_as_from_the_checkpoint(
    run_dir: Path, exported: Path, tmp_path: Path
) -> None:
    request = GenerateRequest(checkpoint=run_dir, prompts=[PROMPT], out=tmp_path / "a.mp4", steps=3, seed=5)
    (from_checkpoint,) = generate(request)
    argv = ["--checkpoint", str(exported), "--prompt", PROMPT, "--steps", "3", "--seed", "5"]
    done = cli("generate", *argv, "--out", str(tmp_path / "b.mp4"))
    assert done.returncode == 0, done.stderr
    assert from_checkpoint.read_bytes() == (tmp_path / "b.mp4").read_bytes()


def test_the_cli_exports_raw_bf16_weights_in_shards(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "sharded"
    argv = ["export", "--checkpoint", str(run_dir), "--out", str(out), "--no-ema", "--dtype", "bf16"]
    assert convert.main([*argv, "--max-shard-size", "20KB"]) == 0
    assert capsys.readouterr().out.startswith("exported raw weights of ")
    files = sorted(set(json.loads((out / INDEX_NAME).read_text())["weight_map"].values()))
    assert len(files) > 1
    assert {t.dtype for f in files for t in load_file(out / f).values()} == {torch.bfloat16}
    _, ours = load_for_inference(run_dir, use_ema=False)
    _, back = load_for_inference(out)  # fp32 weights holding the bf16 values
    assert all(torch.equal(v, ours.state_dict()[k].bfloat16().float()) for k, v in back.state_dict().items())


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("1.5MB", 1_500_000), ("1000", 1000), ("20kb", 20_000)]
)
def test_shard_sizes_read_like_diffusers(text: str, size: int) -> None:
    assert convert.parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("5XB", "'5XB' is not a size such as 5GB, 500MB or 2GiB"),
        ("-1GB", "'-1GB' is not a size such as 5GB, 500MB or 2GiB"),
        ("0GB", "'0GB': the size must be positive"),
    ],
)
def test_bad_shard_sizes_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        convert.parse_size(text)
    assert str(caught.value) == message


def test_a_dit_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = _train(tmp_path / "dit", "dit_tiny_edm", 1)
    assert convert.main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: {run}/checkpoints/step_0000001 holds a 'dit' model; only WAN models export to a diffusers "
        "WanTransformer3DModel directory\n"
    )
    assert not (tmp_path / "out").exists()


def test_an_export_without_dfm_config_is_refused_by_generate(exported: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(exported, bare)
    (bare / EXPORTED_CONFIG).unlink()
    with pytest.raises(CheckpointError) as caught:
        generate(GenerateRequest(checkpoint=bare, prompts=[PROMPT], out=tmp_path / "x.mp4", progress=False))
    assert str(caught.value) == (
        f"{bare}/dfm_config.yaml: missing; generating from a diffusers directory needs the training config beside "
        "the weights (`python -m dfm.app.convert export --checkpoint RUN_DIR` writes it; for other weights, write "
        f"one with `python -m dfm.app.train --recipe NAME --dry-run > {bare}/dfm_config.yaml`)"
    )


def test_a_one_process_checkpoint_is_not_exported_under_torchrun(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Checked before any process group is joined, so this one process can pose as rank 0 of 2."""
    pose_as_rank(monkeypatch, world=2)
    with pytest.raises(CheckpointError) as caught:
        export_checkpoint(run_dir, tmp_path / "x")
    assert str(caught.value) == (
        f"{run_dir}/checkpoints/step_0000002 was trained with runtime=local, which runs in one process, but 2 "
        "processes were launched; run the export as one process (without torchrun)"
    )
