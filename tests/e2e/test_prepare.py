"""prepare: real mp4/mov/png files + captions -> Energon webdataset shards with the tiny real WAN VAE and UMT5.

One corrupt file and one without a caption are skipped and reported; ``--strict`` stops at the first;
a rerun skips finished shards; energon iterates the directory; two torchrun ranks write disjoint shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from support.cli import ROOT, cli
from support.distributed import free_port
from support.media import GOOD, random_video, write_inputs
from support.pretrained import TINY_UMT5_DIM, TINY_VAE_LATENTS_MEAN, TINY_VAE_Z_DIM, write_tiny_umt5, write_tiny_wan_vae

from dfm.adapters.video import Mp4Writer
from dfm.app.prepare import main as prepare_main
from dfm.ports.samples import LATENTS, META, TENSORS, TEXT, SampleMeta

pytest.importorskip("av")
pytest.importorskip("megatron.energon")


@pytest.fixture(scope="module")
def codecs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("codecs")
    return write_tiny_wan_vae(root / "vae"), write_tiny_umt5(root / "umt5")


def args(inputs: Path, out: Path, codecs: tuple[Path, Path], *extra: str) -> list[str]:
    vae, text = codecs
    return [
        *("--input", str(inputs), "--out", str(out), "--vae", str(vae), "--text-encoder", str(text)),
        *("--height", "32", "--width", "32", "--frames", "5", "--fps", "16", "--samples-per-shard", "2"),
        *("--dtype", "float32", "--device", "cpu", "--no-progress", *extra),
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, codecs: tuple[Path, Path]) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("prepare")
    inputs = write_inputs(root / "videos")
    result = cli("prepare", *args(inputs, root / "out", codecs))
    assert result.returncode == 0, result.stderr
    return inputs, root / "out", result.stdout + result.stderr


def read_shard(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, suffix = member.name.partition(".")
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


def test_shards_hold_the_documented_members_and_shapes(prepared: tuple[Path, Path, str]) -> None:
    _, out, _ = prepared
    shards = sorted(out.glob("r*.tar"))
    assert [p.name for p in shards] == ["r000-000000.tar", "r000-000001.tar"]
    samples = {k: v for shard in shards for k, v in read_shard(shard).items()}
    assert len(samples) == 4 and all(set(s) == {TENSORS, META} for s in samples.values())
    by_source = {}
    for members in samples.values():
        meta = SampleMeta.from_json(members[META])
        tensors = load_safetensors(members[TENSORS])
        assert set(tensors) == {LATENTS, TEXT}
        assert tuple(tensors[LATENTS].shape) == meta.latent_shape
        assert tuple(tensors[TEXT].shape) == (meta.text_len, TINY_UMT5_DIM)
        assert meta.latents_mean == tuple(TINY_VAE_LATENTS_MEAN) and "vae@" in meta.vae
        by_source[Path(meta.source).name] = meta
    assert sorted(by_source) == sorted(GOOD)
    assert by_source["a.mp4"].latent_shape == (TINY_VAE_Z_DIM, 2, 4, 4) and by_source["a.mp4"].frames == 5
    assert (by_source["a.mp4"].fps, by_source["a.mp4"].height, by_source["a.mp4"].width) == (16.0, 32, 32)
    assert by_source["d.png"].latent_shape == (TINY_VAE_Z_DIM, 1, 4, 4)  # an image: one frame
    assert by_source["c.mov"].text_len == 1  # empty caption: the end-of-sequence token only
    assert by_source["b.mp4"].caption == "a cat on a boat"


def test_the_report_lists_the_corrupt_file_and_the_missing_caption(prepared: tuple[Path, Path, str]) -> None:
    inputs, out, logs = prepared
    report = json.loads((out / "prepare_report.json").read_text())
    assert {k: report[k] for k in ("inputs", "prepared", "resumed", "skipped", "shards", "samples")} == {
        "inputs": 6,
        "prepared": 4,
        "resumed": 0,
        "skipped": 2,
        "shards": 2,
        "samples": 4,
    }
    assert report["skipped_by_kind"] == {"missing_caption": 1, "unreadable": 1}
    skipped = {Path(item["path"]).name: item for item in report["skipped_files"]}
    assert skipped["corrupt.mp4"]["kind"] == "unreadable"
    assert skipped["nocap.mp4"]["reason"] == "missing caption: no sidecar file nocap.txt"
    assert "skipping input" in logs and str(inputs / "nocap.mp4") in logs


def test_energon_loads_the_prepared_directory(prepared: tuple[Path, Path, str]) -> None:
    from dataclasses import dataclass

    import megatron.energon as energon

    _, out, _ = prepared
    meta_dir = out / ".nv-meta"
    assert {"dataset.yaml", "split.yaml", ".info.json", "index.sqlite"} <= {p.name for p in meta_dir.iterdir()}

    @dataclass
    class Prepared(energon.Sample):
        latents: torch.Tensor
        meta: SampleMeta

    @energon.stateless
    def cook(crude: dict) -> Prepared:
        assert crude["__subflavors__"] == {"dfm_format": 1}
        meta = crude[META]
        meta = SampleMeta.from_json(json.dumps(meta) if isinstance(meta, dict) else meta)
        tensors = load_safetensors(crude[TENSORS])
        return Prepared(**energon.basic_sample_keys(crude), latents=tensors[LATENTS], meta=meta)

    class Encoder(energon.DefaultTaskEncoder):
        cookers = (energon.Cooker(cook),)

    config = energon.WorkerConfig(rank=0, world_size=1, num_workers=0, global_error_handler=energon.reraise_exception)
    dataset = energon.get_train_dataset(
        out,
        batch_size=None,
        shuffle_buffer_size=None,
        max_samples_per_sequence=None,
        worker_config=config,
        task_encoder=Encoder(),
        repeat=False,
    )
    samples = list(energon.get_loader(dataset))
    assert sorted(Path(s.meta.source).name for s in samples) == sorted(GOOD)
    assert all(tuple(s.latents.shape) == s.meta.latent_shape for s in samples)


def test_the_dfm_energon_source_accepts_the_prepared_directory(prepared: tuple[Path, Path, str]) -> None:
    from dfm.adapters.energon import check_prepared

    check_prepared(prepared[1], text_dim=TINY_UMT5_DIM)


def test_strict_stops_at_the_first_bad_file(
    prepared: tuple[Path, Path, str], codecs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dfm.app.cli import run_main

    inputs, _, _ = prepared
    toy = (Path("toy"), Path("toy"))
    status = run_main(prepare_main, args(inputs, tmp_path / "strict", toy, "--strict"))
    err = capsys.readouterr().err
    assert status == 2
    assert f"error: --strict: cannot prepare {inputs / 'corrupt.mp4'}: cannot decode" in err
    assert not list((tmp_path / "strict").glob("*.tar.tmp"))


def test_a_rerun_skips_finished_shards_and_prepares_new_inputs(
    prepared: tuple[Path, Path, str], codecs: tuple[Path, Path], tmp_path: Path
) -> None:
    inputs, out, _ = prepared
    out = shutil.copytree(out, tmp_path / "out")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("r*.tar")}
    Mp4Writer().write(random_video(12, 7), tmp_path / "e.mp4", fps=24)
    (tmp_path / "e.txt").write_text("a dog")
    listing = [str(p) for p in sorted(inputs.iterdir()) if p.suffix != ".txt"] + ["# added later", "e.mp4"]
    (tmp_path / "inputs.txt").write_text("\n".join(listing) + "\n")  # the same absolute paths + a new file
    (out / ".r000-000009.tar.tmp").write_bytes(b"left over by a killed run")
    inputs = tmp_path / "inputs.txt"
    assert prepare_main(args(inputs, out, codecs)) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert (report["prepared"], report["resumed"], report["skipped"], report["samples"]) == (1, 4, 2, 5)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("r*.tar") if p.name in before} == before
    assert sorted(p.name for p in out.glob("r*.tar")) == ["r000-000000.tar", "r000-000001.tar", "r000-000002.tar"]
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / ".nv-meta" / ".info.json").read_text())["shard_counts"]["r000-000002.tar"] == 1


def test_two_ranks_write_disjoint_shards(prepared: tuple[Path, Path, str], tmp_path: Path) -> None:
    inputs, _, _ = prepared
    out = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dfm.app.prepare"]
    command += ["--input", str(inputs), "--out", str(out), "--vae", "toy", "--text-encoder", "toy"]
    command += ["--height", "32", "--width", "32", "--frames", "5", "--samples-per-shard", "1", "--no-progress"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    manifests = [json.loads(p.read_text()) for p in sorted((out / "manifests").glob("*.json"))]
    by_rank = {
        rank: {i for m in manifests if m["shard"].startswith(f"r00{rank}-") for i in m["inputs"]} for rank in (0, 1)
    }
    assert by_rank[0] and by_rank[1] and not by_rank[0] & by_rank[1]
    assert {Path(i).name for i in by_rank[0] | by_rank[1]} == set(GOOD)
    report = json.loads((out / "prepare_report.json").read_text())
    assert (report["world_size"], report["prepared"], report["skipped"], report["shards"]) == (2, 4, 2, 4)
    info = json.loads((out / ".nv-meta" / ".info.json").read_text())
    assert sorted(info["shard_counts"]) == sorted(m["shard"] for m in manifests)
    data = load_safetensors(read_shard(out / "r001-000000.tar")["r001-000000-000000"][TENSORS])
    assert data[LATENTS].dtype == torch.bfloat16 and data[LATENTS].shape[0] == 3  # toy codec: pixels


def test_synthetic_videos_are_written_then_prepared(tmp_path: Path) -> None:
    out = tmp_path / "syn"
    flags = ["--synthetic", "3", "--out", str(out), "--vae", "toy", "--text-encoder", "toy", "--height", "32"]
    assert prepare_main([*flags, "--width", "48", "--frames", "9", "--no-progress"]) == 0
    assert len(list((out / "synthetic_videos").glob("*.mp4"))) == 3
    report = json.loads((out / "prepare_report.json").read_text())
    assert (report["prepared"], report["skipped"]) == (3, 0)
    sample = next(iter(read_shard(out / "r000-000000.tar").values()))
    meta = SampleMeta.from_json(sample[META])
    assert meta.latent_shape == (3, 9, 32, 48) and "moving" in meta.caption


def test_bad_options_are_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dfm.app.cli import run_main

    base = ["--out", str(tmp_path / "o"), "--vae", "toy", "--text-encoder", "toy"]
    assert run_main(prepare_main, [*base, "--input", str(tmp_path / "missing")]) == 2
    assert "neither a directory nor a list file" in capsys.readouterr().err
    assert run_main(prepare_main, [*base, "--input", str(tmp_path), "--height", "32"]) == 2
    assert "--height and --width go together" in capsys.readouterr().err
    (tmp_path / "v").mkdir()
    assert run_main(prepare_main, [*base, "--input", str(tmp_path / "v"), "--captions", "jsonl"]) == 2
    assert "no videos or images found" in capsys.readouterr().err
    assert run_main(prepare_main, [*base, "--input", str(tmp_path / "v"), "--frames", "8"]) == 2
    assert "4n + 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--synthetic", "0"], "--synthetic N must be at least 1 (the number of toy videos to write), got 0"),
        (["--synthetic", "-2"], "--synthetic N must be at least 1 (the number of toy videos to write), got -2"),
        (["--synthetic", "2", "--frames", "0"], "--frames must be 4n + 1 (1, 5, 9, ..., 81), got 0"),
        (["--synthetic", "2", "--max-frames", "0"], "--max-frames must be 4n + 1 (1, 5, 9, ..., 81), got 0"),
        (
            ["--synthetic", "2", "--fps", "-1"],
            "--fps must be a finite frame rate > 0, or 0 to keep each source's rate; got -1",
        ),
        (
            ["--synthetic", "2", "--fps", "nan"],
            "--fps must be a finite frame rate > 0, or 0 to keep each source's rate; got nan",
        ),
        (
            ["--synthetic", "2", "--fps", "inf"],
            "--fps must be a finite frame rate > 0, or 0 to keep each source's rate; got inf",
        ),
        (["--synthetic", "2", "--samples-per-shard", "0"], "--samples-per-shard must be at least 1, got 0"),
        (["--synthetic", "2", "--text-max-length", "0"], "--text-max-length must be at least 1, got 0"),
        (
            ["--synthetic", "2", "--input", "videos"],
            "give either --input or --synthetic N, not both (--synthetic prepares the clips it writes to "
            "OUT/synthetic_videos)",
        ),
        (
            ["--input", "videos", "--captions-file", "captions.jsonl"],
            "--captions-file goes with --captions jsonl or csv (sidecar captions are NAME.txt files)",
        ),
    ],
)
def test_a_bad_option_is_refused_before_any_work(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dfm.app.cli import run_main

    out = tmp_path / "out"
    toy = ["--vae", "toy", "--text-encoder", "toy", "--height", "32", "--width", "32", "--no-progress"]
    assert run_main(prepare_main, [*argv, "--out", str(out), *toy]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {message}"]
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dfm.app.cli import run_main

    taken = tmp_path / "data"
    taken.write_text("not a directory")
    toy = ["--synthetic", "2", "--vae", "toy", "--text-encoder", "toy", "--height", "32", "--width", "32"]
    assert run_main(prepare_main, [*toy, "--out", str(taken)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {taken} is an existing file, not a directory; name a directory (created if missing)"
    ]
    assert run_main(prepare_main, [*toy, "--out", str(taken / "train")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --out {taken / 'train'}: {taken} is a file, not a directory; choose another --out"
    ]
    assert taken.read_text() == "not a directory"


def test_synthetic_videos_are_not_written_for_a_bucket_the_vae_cannot_take(
    codecs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from dfm.app.cli import run_main

    vae, text = codecs
    out = tmp_path / "syn"
    argv = ["--synthetic", "2", "--out", str(out), "--vae", str(vae), "--text-encoder", str(text), "--frames", "5"]
    assert run_main(prepare_main, [*argv, "--height", "36", "--width", "32", "--device", "cpu", "--no-progress"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: bucket 36x32 is not a multiple of the VAE's spatial stride 8; pick --height/--width divisible by it "
        "(16 suits WAN)"
    ]
    assert not (out / "synthetic_videos").exists()
