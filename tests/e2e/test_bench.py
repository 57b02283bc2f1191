"""``python -m dfm.app.bench train``: one JSON line of figures, for either runtime; bad arguments are user errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dfm.app.bench import main as bench_main
from dfm.domain.specs import WAN_TINY, num_tokens


@pytest.mark.filterwarnings("ignore:Slicing a flattened dim from root mesh:UserWarning")
@pytest.mark.parametrize("runtime", ["local", "fsdp2"])
def test_bench_train_prints_the_figures(runtime: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["train", "--recipe", "wan_tiny_t2v", "--warmup", "1", "--steps", "2", f"runtime={runtime}"]
    assert bench_main([*argv, "--profile", str(tmp_path / "prof")]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    got = json.loads(line)
    assert got["runtime"] == runtime and got["timed_steps"] == 2 and got["world"] == 1
    assert got["s_per_step_min"] <= got["s_per_step"] <= got["s_per_step_max"]
    assert 0 < got["data_s_per_step"] < got["s_per_step"]
    assert got["samples_per_s"] == pytest.approx(
        got["global_batch_size"] / got["s_per_step"], rel=1e-2
    )  # s_per_step is rounded
    assert got["tokens_per_sample"] == num_tokens(WAN_TINY, *got_latent_grid(got))
    assert (tmp_path / "prof" / "top_ops_rank0.txt").is_file()
    assert not list(tmp_path.glob("**/checkpoints"))  # benchmarks write no checkpoints


def got_latent_grid(got: dict) -> tuple[int, int, int]:
    """The latent grid of the tiny recipe, recovered from the config it ran (frames, height, width)."""
    from dfm.app import bootstrap
    from dfm.app.config import resolve_config

    cfg = resolve_config("wan_tiny_t2v", None, [])
    _, f, h, w = bootstrap.latent_shape(cfg, bootstrap.build_codecs(cfg)[0])
    return f, h, w


def test_bench_needs_the_benchmark_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench_main(["--recipe", "wan_tiny_t2v"])
    assert info.value.code == 2
    assert "the first argument names the benchmark: train" in capsys.readouterr().err
