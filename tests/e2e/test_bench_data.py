"""``python -m dfm.app.bench data``: write a tiny fake data set, read it back, one JSON line of figures."""

from __future__ import annotations

import json
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
