"""generate --cache: threshold 0 is the uncached video, the cache starts afresh for every prompt, and each video's
reuse is logged."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfm.adapters.memory import InMemoryVideoWriter
from dfm.app.config import resolve_config
from dfm.app.logging import configure_logging
from dfm.app.services.generation import GenerateRequest, generate
from dfm.app.services.training import train

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["a red circle moving left slowly", "a blue square moving up quickly"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen_cache") / "run"
    train(resolve_config("wan_tiny_t2v", None, [f"run.dir={out}", "train.max_steps=2", "logging.level=WARNING"]))
    return out


def _videos(run_dir: Path, prompts: list[str], **kw: object) -> list[torch.Tensor]:
    writer = InMemoryVideoWriter()
    request = GenerateRequest(
        checkpoint=run_dir, prompts=prompts, out=run_dir / "x.mp4", progress=False, steps=12, **kw
    )
    generate(request, writer=writer)
    return list(writer.videos.values())


def test_threshold_zero_gives_the_uncached_videos(run_dir: Path) -> None:
    plain = _videos(run_dir, PROMPTS[:1])
    cached = _videos(run_dir, PROMPTS[:1], cache="first_block:0")
    assert torch.equal(cached[0], plain[0])


@pytest.mark.parametrize("cache", ["first_block:0.05", "teacache:1"])  # the tiny model needs a large TeaCache one
def test_each_prompt_equals_it_sampled_alone_and_reuse_is_logged(
    run_dir: Path, cache: str, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging(level="INFO", fmt="json")
    both = _videos(run_dir, PROMPTS, cache=cache)
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    alone = [_videos(run_dir, [p], cache=cache, seed=i)[0] for i, p in enumerate(PROMPTS)]  # prompt i: seed + i
    for got, want in zip(both, alone, strict=True):
        assert torch.equal(got, want)
    logged = [e for e in events if e["event"] == "step cache"]
    assert [e["video"] for e in logged] == [0, 1]
    method, threshold = cache.split(":")
    for e in logged:
        assert (e["method"], e["threshold"], e["calls"]) == (method, float(threshold), 12)
        assert 0 < e["calls_reused"] < 12, e
        reused, rows = map(int, e["rows_reused"].split("/"))
        assert rows == 24 and reused >= 2 * e["calls_reused"]  # [cond; uncond] rows


def test_bench_generate_prints_speed_and_drift_per_setting(run_dir: Path, tmp_path: Path) -> None:
    """``python -m dfm.app.bench generate --cache ... --profile DIR`` (the GPU measurement's one command) on the
    tiny run."""
    argv = ["--checkpoint", str(run_dir), "--steps", "6", "--cache", "first_block:0", "--cache", "first_block:0.05"]
    argv += ["--profile", str(tmp_path / "prof")]
    result = subprocess.run(
        [sys.executable, "-m", "dfm.app.bench", "generate", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    dense, zero, cached = (json.loads(line) for line in result.stdout.splitlines())
    assert (dense["setting"], dense["steps"], dense["checkpoint"]) == ("dense", 6, str(run_dir))
    assert (zero["setting"], zero["calls_reused"], zero["latents_rel_l2"]) == ("first_block:0", 0, 0.0)
    assert zero["frames_psnr_db"] == math.inf
    assert cached["setting"] == "first_block:0.05" and cached["calls"] == 6 and cached["calls_reused"] > 0
    assert cached["speedup"] > 0 and 0 < cached["latents_rel_l2"] < 0.05
    for row in (dense, zero, cached):
        assert row["denoise_s"] > 0 and row["s_per_step"] > 0 and row["model_tflops"] >= 0
    assert "aten::" in (tmp_path / "prof" / "top_ops_rank0.txt").read_text()
    assert (tmp_path / "prof" / "trace_rank0.json").stat().st_size > 0
