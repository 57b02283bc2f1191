"""Data a user brings, as the train CLI meets it: bf16 shards, truncated shards, batch sizes that do not split.

Each mistake is one ``error: ...`` line naming what to change (exit status 2), never a traceback; a
lenient run skips what it cannot read and says so.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from support.cli import cli
from support.shards import FakeSample, make_samples, write_prepared

from dfm.adapters.tracking import read_metrics
from dfm.app import bootstrap
from dfm.app.config import ConfigError, resolve_config
from dfm.app.services.training import train
from dfm.domain.specs import WAN_TINY
from dfm.ports.runtime import Topology

pytest.importorskip("megatron.energon")
pytestmark = pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning")

TEXT_LEN = 8


def energon_overrides(shards: Path, run: Path, *extra: str) -> list[str]:
    return [
        "data.source=energon", f"data.path={shards}", "data.num_workers=0", f"data.text_len={TEXT_LEN}",
        "model.in_channels=4", "model.out_channels=4", "train.global_batch_size=2", "train.micro_batch_size=2",
        "train.max_steps=2", "train.precision=fp32", "checkpoint.interval=100", "logging.level=WARNING",
        f"run.dir={run}", *extra,
    ]  # fmt: skip


def samples(n: int = 8) -> list[FakeSample]:
    return make_samples(n, latent_shapes=((4, 2, 4, 6),), text_dim=WAN_TINY.text_dim, max_text_len=6)


@pytest.fixture(scope="module")
def truncated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of 4 samples, the first cut after 1 KiB."""
    path = write_prepared(tmp_path_factory.mktemp("truncated"), samples(), samples_per_shard=4)
    shard = path / "shard_000000.tar"
    shard.write_bytes(shard.read_bytes()[:1024])
    return path


def test_bf16_shards_train_at_fp32_like_the_same_values_in_fp32(tmp_path: Path) -> None:
    """``prepare`` stores bf16 by default; training at fp32 casts the batch before any compute."""
    bf16 = [attrs.evolve(s, latents=s.latents.bfloat16(), text=s.text.bfloat16()) for s in samples()]
    fp32 = [attrs.evolve(s, latents=s.latents.float(), text=s.text.float()) for s in bf16]
    losses = {}
    for name, data in (("bf16", bf16), ("fp32", fp32)):
        shards = write_prepared(tmp_path / f"{name}_shards", data, samples_per_shard=4)
        cfg = resolve_config("wan_tiny_t2v", None, energon_overrides(shards, tmp_path / name))
        assert train(cfg).step == 2
        losses[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    assert losses["bf16"] == losses["fp32"] and len(losses["fp32"]) == 2


def test_a_truncated_shard_under_data_strict_is_an_error_line(truncated: Path, tmp_path: Path) -> None:
    result = cli(
        "train", "--recipe", "wan_tiny_t2v", *energon_overrides(truncated, tmp_path / "run", "data.strict=true")
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "of shard_000000.tar cannot be read" in errors[0], result.stderr
    assert "the shard is truncated or corrupt: prepare it again with `python -m dfm.app.prepare`" in errors[0]


def test_a_truncated_shard_is_skipped_with_a_warning_naming_it(truncated: Path, tmp_path: Path) -> None:
    result = cli("train", "--recipe", "wan_tiny_t2v", *energon_overrides(truncated, tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "bad sample skipped" in line]
    assert len(warnings) == 4 and all("shard_000000.tar" in w for w in warnings), result.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_a_global_batch_that_micro_batches_do_not_split_is_an_error_line(tmp_path: Path) -> None:
    overrides = ["train.global_batch_size=3", "train.micro_batch_size=2", f"run.dir={tmp_path}"]
    result = cli("train", "--recipe", "wan_tiny_t2v", *overrides)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "error: train.global_batch_size: 3 is not divisible by train.micro_batch_size=2; set "
        "train.global_batch_size to a multiple of 2 or change train.micro_batch_size"
    ]


@pytest.mark.parametrize("source", ["synthetic", "energon"])
def test_batch_layout_errors_name_the_batch_keys_for_every_source(truncated: Path, source: str) -> None:
    """Also with more data-parallel ranks (found before any model is built), and never as ``data.path``."""
    extra = [f"data.path={truncated}", "model.in_channels=4"] if source == "energon" else []
    overrides = [f"data.source={source}", "train.global_batch_size=6", "train.micro_batch_size=2", *extra]
    cfg = resolve_config("wan_tiny_t2v", None, overrides)
    codec, text = bootstrap.build_codecs(cfg)
    with pytest.raises(ConfigError) as caught:
        bootstrap.build_data_source(cfg, Topology(world_size=2, dp_size=2, dp_rank=0), codec, text)
    assert str(caught.value).startswith(
        "train.global_batch_size: 6 is not divisible by train.micro_batch_size x data-parallel size = 2 x 2 = 4; "
        "set train.global_batch_size to a multiple of 4"
    )
