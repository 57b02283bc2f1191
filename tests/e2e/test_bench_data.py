"""``python -m dfm.app.bench data``: write a tiny fake data set, read it back, one JSON line of figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from support.cli import cli

TINY = ["--samples", "12", "--latent-shape", "4,3,4,6", "--text-shape", "5,8", "--text-len", "6"]


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("source", ["energon", "hf_datasets"])
def test_bench_data_makes_a_fake_data_set_and_times_it(source: str, tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    argv = ["data", "--source", source, "--make-fake", str(fake), *TINY, "--batch", "2", "--steps", "3"]
    done = cli("bench", *argv, "--num-workers", "1", "--samples-per-shard", "5")
    assert done.returncode == 0, done.stderr
    made, figures = json_lines(done.stdout)
    assert made["samples"] == 12 and (fake / ".nv-meta" / "dataset.yaml").is_file()
    assert figures["source"] == source and figures["timed_batches"] == 3 and figures["batch"] == 2
    assert figures["latent_shape"] == [4, 3, 4, 6] and figures["skipped"] == 0
    assert figures["samples_per_s"] > 0  # both rounded to 3 decimals:
    assert figures["samples_per_s"] == pytest.approx(2 * figures["batches_per_s"], rel=1e-3)
    if source == "hf_datasets":
        assert figures["path"] == made["hf_path"] == str(fake / "hf")


def test_bench_data_reports_a_missing_data_set(tmp_path: Path) -> None:
    done = cli("bench", "data", "--source", "energon", "--path", str(tmp_path / "nothing"))
    assert done.returncode == 2
    assert "error:" in done.stderr and "not a prepared energon data set" in done.stderr


def test_bench_data_makes_image_to_video_samples_that_training_reads(tmp_path: Path) -> None:
    """``--image-condition first``: the fake samples carry condition latents and image features as ``prepare
    --image-condition`` writes them; the reader checks them, and an image-to-video model trains on them (the
    frame mask rebuilt with WAN's temporal stride 4: 9 frames -> 3 latent frames)."""
    fake = tmp_path / "fake"
    i2v = ["--image-condition", "first", "--image-shape", "7,12"]
    done = cli("bench", "data", "--make-fake", str(fake), *TINY, *i2v, "--batch", "2", "--steps", "3")
    assert done.returncode == 0, done.stderr
    made, figures = json_lines(done.stdout)
    assert (made["image_condition"], made["image_shape"]) == ("first", [7, 12])
    assert figures["image_condition"] == "first" and figures["latent_shape"] == [4, 3, 4, 6]
    model = ["model.in_channels=12", "model.out_channels=4", "model.image_dim=12", "model.text_dim=8"]
    data = ["data.source=energon", f"data.path={fake}", "data.num_workers=0", "data.text_len=6", "data.frames=9"]
    data += ["data.height=32", "data.width=48"]
    done = cli("bench", "train", "--recipe", "wan_tiny_i2v", *model, *data, "--warmup", "1", "--steps", "1")
    assert done.returncode == 0, done.stderr
    (row,) = json_lines(done.stdout)
    assert row["tokens_per_sample"] == 18.0 and math.isfinite(row["loss"])


def test_bench_data_refuses_image_condition_on_text_to_video_samples(tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    assert cli("bench", "data", "--make-fake", str(fake), *TINY, "--steps", "1").returncode == 0
    done = cli(
        "bench", "data", "--path", str(fake), "--text-shape", "5,8", "--text-len", "6", "--image-condition", "first"
    )
    assert done.returncode == 2
    assert "error:" in done.stderr and "the samples hold no image condition" in done.stderr
