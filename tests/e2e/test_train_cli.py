"""``python -m dfm.app.train`` end to end (subprocesses): dry runs, layering and user errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml

from dfm.app.config import config_from_yaml, config_to_dict
from dfm.app.recipes import get_recipe, recipe_names

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("**/*.yaml"))


def train_cli_many(*argvs: Sequence[str | Path]) -> list[subprocess.CompletedProcess[str]]:
    """Run ``python -m dfm.app.train`` once per argv, concurrently (each start imports torch)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    commands = [[sys.executable, "-m", "dfm.app.train", *map(str, argv)] for argv in argvs]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
        for cmd in commands
    ]
    results = []
    for cmd, proc in zip(commands, procs, strict=True):
        stdout, stderr = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr))
    return results


def train_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return train_cli_many(args)[0]


@pytest.fixture(scope="module")
def dry_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """``--dry-run`` of every recipe and of every example config (over the default recipe)."""
    argvs = {name: ["--recipe", name, "--dry-run"] for name in recipe_names()}
    argvs |= {str(path.relative_to(REPO)): ["--dry-run", "--config", path] for path in EXAMPLES}
    return dict(zip(argvs, train_cli_many(*argvs.values()), strict=True))


def user_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    return result.stderr


@pytest.mark.parametrize("name", recipe_names())
def test_dry_run_prints_the_recipe(name: str, dry_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = dry_runs[name]
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == config_to_dict(get_recipe(name))
    assert config_from_yaml(result.stdout) == get_recipe(name)


def test_precedence_recipe_yaml_cli(tmp_path: Path) -> None:
    path = tmp_path / "over.yaml"
    path.write_text("train:\n  max_steps: 7\n  log_interval: 5\nmodel:\n  num_layers: 3\n")
    argv = ["--dry-run", "--config", path, "train.max_steps=9", "--recipe", "wan_tiny_t2v", "--runtime", "fsdp2"]
    result = train_cli(*argv, "--resume", "never", "optim.betas=0.8,0.9", "train.ema_decay=null")
    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(result.stdout)
    recipe = config_to_dict(get_recipe("wan_tiny_t2v"))
    assert data["train"]["max_steps"] == 9
    assert data["train"]["log_interval"] == 5
    assert data["model"]["num_layers"] == 3
    assert data["train"]["global_batch_size"] == recipe["train"]["global_batch_size"]
    assert data["runtime"] == "fsdp2"
    assert data["checkpoint"]["resume"] == "never"
    assert data["optim"]["betas"] == [0.8, 0.9]
    assert data["train"]["ema_decay"] is None


def test_misspelled_key_on_the_command_line() -> None:
    stderr = user_error(train_cli("--dry-run", "model.num_layer=3"))
    assert stderr == "error: model.num_layer: unknown key; did you mean model.num_layers?\n"


def test_misspelled_key_in_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("model:\n  num_layer: 3\n")
    stderr = user_error(train_cli("--dry-run", "--config", path))
    assert stderr == "error: model.num_layer: unknown key; did you mean model.num_layers?\n"


def test_wrong_type_and_range_are_reported_together() -> None:
    stderr = user_error(train_cli("--dry-run", "train.max_steps=ten", "train.log_interval=0"))
    assert stderr == "error: train.max_steps: expected int, got 'ten'\nerror: train.log_interval: must be > 0, got 0\n"


def test_tag_switch_on_the_command_line() -> None:
    result = train_cli("--dry-run", "model.arch=dit", "diffusion.kind=edm", "sample.sampler=edm_heun")
    assert result.returncode == 0, result.stderr
    config = config_from_yaml(result.stdout)
    assert config.model.arch == "dit" and config.diffusion.kind == "edm"


def test_unknown_recipe() -> None:
    stderr = user_error(train_cli("--dry-run", "--recipe", "wan_tiny"))
    assert stderr.startswith("error: unknown recipe 'wan_tiny'; did you mean 'wan_tiny_t2v'?")


def test_list_recipes_and_help() -> None:
    listed, helped = train_cli_many(["--list-recipes"], ["--help"])
    assert listed.returncode == 0
    assert [line.split()[0] for line in listed.stdout.splitlines()] == recipe_names()
    assert helped.returncode == 0 and all(name in helped.stdout for name in recipe_names())


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO / "examples")))
def test_example_configs_resolve(path: Path, dry_runs: dict[str, subprocess.CompletedProcess[str]]) -> None:
    result = dry_runs[str(path.relative_to(REPO))]
    assert result.returncode == 0, result.stderr


def test_megatron_layout_that_does_not_fit_is_a_user_error(tmp_path: Path) -> None:
    stderr = user_error(
        train_cli("--recipe", "wan_tiny_t2v", "--runtime", "megatron", "parallel.tensor=3", f"run.dir={tmp_path}")
    )
    assert stderr.splitlines()[-1] == (  # (megatron's import logs info lines before it)
        "error: cannot infer parallel.data_shard: the world size 1 is not divisible by parallel.data_replicate=1 * "
        "parallel.context=1 * parallel.tensor=3 = 3; launch a multiple of 3 processes or change those sizes"
    )


def test_run_dir_that_is_a_file_or_under_a_file_is_refused_up_front(tmp_path: Path) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a run directory\n")
    is_file, under_file = train_cli_many(
        ["--recipe", "wan_tiny_t2v", f"run.dir={a_file}"], ["--recipe", "wan_tiny_t2v", f"run.dir={a_file}/run"]
    )
    assert user_error(is_file) == f"error: run.dir: {a_file} is a file, not a directory; choose another run.dir\n"
    assert user_error(under_file) == (
        f"error: run.dir: cannot create {a_file}/run: {a_file} is a file, not a directory; choose another run.dir\n"
    )
    assert a_file.read_text() == "not a run directory\n"


def test_parallel_keys_under_the_local_runtime_are_refused(tmp_path: Path) -> None:
    stderr = user_error(
        train_cli("--recipe", "wan_tiny_t2v", "parallel.tensor=2", "parallel.data_shard=1", f"run.dir={tmp_path}")
    )
    assert stderr == (
        "error: parallel.tensor: is 2, but runtime=local runs one process and has no parallel layout; use "
        "runtime=fsdp2 or runtime=megatron, or remove parallel.tensor\n"
        "error: parallel.data_shard: is 1, but runtime=local runs one process and has no parallel layout; use "
        "runtime=fsdp2 or runtime=megatron, or remove parallel.data_shard\n"
    )
    assert not any(tmp_path.iterdir())  # refused before the run directory was touched


def test_non_finite_learning_rate_is_refused() -> None:
    stderr = user_error(train_cli("--dry-run", "optim.lr=inf", "optim.eps=nan", "optim.weight_decay=-inf"))
    assert stderr == (
        "error: optim.lr: must be a finite number, got inf\n"
        "error: optim.weight_decay: must be a finite number, got -inf\n"
        "error: optim.eps: must be a finite number, got nan\n"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the megatron runtime trains")
def test_megatron_without_cuda_names_the_cpu_runtimes(tmp_path: Path) -> None:
    stderr = user_error(train_cli("--recipe", "wan_tiny_t2v", "--runtime", "megatron", f"run.dir={tmp_path}"))
    assert stderr.splitlines()[-1] == (
        "error: runtime: megatron needs CUDA GPUs, and none is available here; runtime=local (one process) and "
        "runtime=fsdp2 (several processes) also run on the CPU"
    )
