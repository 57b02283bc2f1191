"""DCPCheckpointStore on real files: round trip, atomic publish, verification, retention, disk full, 2 ranks."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from support.mounts import tmpfs

from dfm.adapters.checkpoint import DCPCheckpointStore, read_meta
from dfm.adapters.checkpoint import _layout as layout
from dfm.ports.checkpoint import CheckpointError, CheckpointInfo, CheckpointStore


class Unpicklable:
    """A state value a checkpoint cannot hold (neither a tensor nor plain data)."""

    def __reduce__(self) -> Any:
        raise RuntimeError("cannot serialise this on purpose")


DATA = "tensors/shard-00001-model-00001-of-00001.safetensors"
"""The tensors a single process writes (layout version 2)."""


def model_state(seed: int = 0) -> dict[str, Any]:
    """A model + optimizer-like nested state: float/bf16/int tensors, int keys, plain values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "blocks.0.attn.weight": torch.randn(8, 8, generator=g),
            "blocks.0.norm.bias": torch.randn(8, generator=g).to(torch.bfloat16),
            "pos_ids": torch.randint(0, 1000, (5,), generator=g),
        },
        "optim": {
            "state": {0: {"exp_avg": torch.randn(8, 8, generator=g), "step": torch.tensor(7.0), "count": 7}},
            "param_groups": [{"lr": 1e-3, "betas": [0.9, 0.99], "params": [0], "name": "all"}],
        },
        "lists": [torch.randn(3, generator=g), torch.randn(2, generator=g)],
        "progress": {"step": 100, "loss": 0.125, "tag": "run-a", "seen": [1, 2, 3]},
    }


def zeros_like_state(state: Any) -> Any:
    """The same structure with tensors zeroed and plain values blanked, to load into."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    if isinstance(state, dict):
        return {key: zeros_like_state(value) for key, value in state.items()}
    if isinstance(state, list):
        if any(isinstance(item, torch.Tensor | dict) for item in state):
            return [zeros_like_state(item) for item in state]
        return []
    return type(state)() if isinstance(state, int | float | str) else None


def assert_same(loaded: Any, expected: Any) -> None:
    """Bit-exact equality of nested states (tensors compared as raw bytes)."""
    if isinstance(expected, torch.Tensor):
        assert loaded.dtype == expected.dtype and loaded.shape == expected.shape
        assert torch.equal(loaded.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))
    elif isinstance(expected, dict):
        assert loaded.keys() == expected.keys()
        for key in expected:
            assert_same(loaded[key], expected[key])
    elif isinstance(expected, list):
        assert len(loaded) == len(expected)
        for a, b in zip(loaded, expected, strict=True):
            assert_same(a, b)
    else:
        assert loaded == expected and type(loaded) is type(expected)


def tmp_entries(root: Path) -> list[str]:
    """Names of leftover temp/aside entries."""
    return [p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.fixture
def store(tmp_path: Path) -> DCPCheckpointStore:
    return DCPCheckpointStore(tmp_path / "ckpt")


def test_round_trip_is_bit_exact_and_in_place(store: DCPCheckpointStore) -> None:
    state = model_state()
    meta = {"config": "model:\n  name: tiny\n", "data": {"index": 12, "epoch": 0}, "step": 100}
    info = store.save(100, state, meta)
    assert isinstance(store, CheckpointStore)
    assert info == CheckpointInfo(step=100, path=store.root / "step_0000100")

    target = zeros_like_state(state)
    weight = target["model"]["blocks.0.attn.weight"]
    assert store.load(info, target) == meta
    assert_same(target, state)
    assert target["model"]["blocks.0.attn.weight"] is weight  # tensors are filled in place
    assert 0 in target["optim"]["state"] and "0" not in target["optim"]["state"]  # int keys kept


def test_layout_manifest_and_pointer(store: DCPCheckpointStore) -> None:
    store.save(5, model_state(), {"k": 1})
    directory = store.root / "step_0000005"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "dfm-dcp-checkpoint" and manifest["version"] == 2 and manifest["step"] == 5
    listed = {entry["path"]: entry for entry in manifest["files"]}
    on_disk = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk == {DATA, "state.json", "meta.json"}  # no pickle: no .metadata, no .distcp
    for name, entry in listed.items():
        assert entry["size"] == (directory / name).stat().st_size
        assert entry["sha256"] == layout.file_sha256(directory / name)
    assert json.loads((directory / "meta.json").read_text())["meta"] == {"k": 1}
    assert (store.root / "latest").read_text().strip() == "step_0000005"
    assert tmp_entries(store.root) == []


def test_load_accepts_info_directory_or_root(store: DCPCheckpointStore) -> None:
    store.save(1, {"w": torch.ones(2)}, {"at": 1})
    store.save(2, {"w": torch.full((2,), 2.0)}, {"at": 2})
    for where, expected in [(store.root, 2.0), (store.root / "step_0000001", 1.0), (store.list()[1], 2.0)]:
        target = {"w": torch.zeros(2)}
        store.load(where, target)
        assert target["w"].tolist() == [expected, expected]
    assert store.read_meta(store.root) == {"at": 2}
    assert store.read_meta(store.root / "step_0000001") == {"at": 1}
    assert read_meta(store.list()[0]) == {"at": 1}  # no store needed, e.g. for --resume PATH


def test_mismatched_keys_list_them_and_change_nothing(store: DCPCheckpointStore) -> None:
    store.save(1, {"model": {"a": torch.ones(2), "b": torch.ones(3)}, "n": 1}, {})
    target = {"model": {"a": torch.zeros(2), "b": torch.zeros(4), "c": torch.zeros(1), "d": torch.zeros(1)}, "n": 0}
    with pytest.raises(CheckpointError) as caught:
        store.load(store.root, target)
    text = str(caught.value)
    assert "does not match the state to load" in text
    assert "2 keys missing from the checkpoint: model.c, model.d" in text
    assert "model.b has shape (4,) in the state but (3,) in the checkpoint" in text
    assert target["model"]["a"].tolist() == [0.0, 0.0] and target["n"] == 0


def test_partial_load_of_a_subset_is_allowed(store: DCPCheckpointStore) -> None:
    store.save(1, model_state(), {})
    target = {"model": zeros_like_state(model_state()["model"])}
    store.load(store.root, target)
    assert_same(target["model"], model_state()["model"])


def test_bad_meta_and_top_level_keys_fail_before_writing(store: DCPCheckpointStore) -> None:
    with pytest.raises(CheckpointError, match="meta must be JSON-safe"):
        store.save(1, {"w": torch.ones(1)}, {"t": torch.ones(1)})
    with pytest.raises(CheckpointError, match="top-level keys of a checkpoint state must be strings"):
        store.save(1, {0: torch.ones(1)}, {})  # type: ignore[dict-item]
    assert not store.root.exists() or list(store.root.iterdir()) == []


def test_failure_mid_save_keeps_previous_checkpoint(store: DCPCheckpointStore) -> None:
    """A value a checkpoint cannot hold: refused before writing, step 1 still latest."""
    store.save(1, {"w": torch.ones(2)}, {"at": 1})
    with pytest.raises(CheckpointError) as caught:
        store.save(2, {"w": torch.ones(2), "nested": {"bad": Unpicklable()}}, {"at": 2})
    assert str(caught.value).startswith(f"could not save checkpoint step 2 to {store.root / 'step_0000002'}: ")
    assert "checkpoint state entry nested.bad is a Unpicklable" in str(caught.value)
    assert str(caught.value).endswith("the previous checkpoint step_0000001 is intact")
    assert tmp_entries(store.root) == []
    assert [info.step for info in store.list()] == [1]
    assert store.latest() == CheckpointInfo(step=1, path=store.root / "step_0000001")


_KILLED_SAVER = """
import sys
from pathlib import Path
import torch
from dfm.adapters.checkpoint import DCPCheckpointStore, read_meta

if __name__ == "__main__":
    state = {f"w{i}": torch.randn(256, 1024, 64) for i in range(4)}  # 256 MB: long enough to be killed
    print("saving", flush=True)
    DCPCheckpointStore(Path(sys.argv[1])).save(2, state, {"at": 2})
    print("published", flush=True)
"""


def _wait_for_partial_write(root: Path, proc: subprocess.Popen[bytes], deadline: float) -> Path:
    """The data file of the killed save's temp dir, once it holds more than 8 MB."""
    while time.monotonic() < deadline and proc.poll() is None:
        for data in root.glob(f".tmp-step_0000002-*/{DATA}"):
            try:
                if data.stat().st_size > 8 * 2**20:
                    return data
            except FileNotFoundError:
                continue
        time.sleep(0.002)
    raise AssertionError(f"the saver never reached mid-write (exit code {proc.poll()})")


def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    """The honest crash: a real process killed with SIGKILL while DCP writes its data file."""
    root = tmp_path / "ckpt"
    DCPCheckpointStore(root).save(1, {"w0": torch.ones(2)}, {"at": 1})
    script = tmp_path / "saver.py"
    script.write_text(_KILLED_SAVER)
    proc = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        data = _wait_for_partial_write(root, proc, time.monotonic() + 60)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert data.parent.parent.exists() and not (root / "step_0000002").exists()

    restarted = DCPCheckpointStore(root)  # a new process's store: the killed temp dir is stale to it
    assert restarted.latest() == CheckpointInfo(step=1, path=root / "step_0000001")
    assert [info.step for info in restarted.list()] == [1]
    target = {"w0": torch.zeros(2)}
    assert restarted.load(root, target) == {"at": 1} and target["w0"].tolist() == [1.0, 1.0]
    restarted.save(3, {"w0": torch.full((2,), 3.0)}, {"at": 3})
    assert tmp_entries(root) == []


def _corrupt(path: Path, *, truncate: bool) -> None:
    """Truncates a file by 10 bytes, or flips one byte in its middle."""
    blob = bytearray(path.read_bytes())
    if truncate:
        path.write_bytes(blob[:-10])
    else:
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(blob)


def test_truncated_file_is_named_before_loading(store: DCPCheckpointStore) -> None:
    info = store.save(100, {"w": torch.ones(64)}, {})
    data = info.path / DATA
    size = data.stat().st_size
    _corrupt(data, truncate=True)
    target = {"w": torch.zeros(64)}
    with pytest.raises(CheckpointError) as caught:
        store.load(info, target)
    assert str(caught.value) == (
        f"checkpoint {info.path} is corrupted: {DATA} has {size - 10} bytes, the manifest says {size}"
    )
    assert target["w"].sum() == 0


def test_flipped_byte_is_caught_by_hash_not_by_size(tmp_path: Path) -> None:
    store = DCPCheckpointStore(tmp_path / "ckpt")
    info = store.save(1, {"w": torch.ones(64)}, {})
    _corrupt(info.path / DATA, truncate=False)
    target = {"w": torch.zeros(64)}
    with pytest.raises(CheckpointError, match=r"is corrupted: tensors/shard-00001-\S+ has sha256 .* the manifest says"):
        store.load(info, target)
    assert target["w"].sum() == 0
    assert store.latest() == info  # latest() checks sizes only (cheap); load checks hashes
    DCPCheckpointStore(tmp_path / "ckpt", verify="size").load(info, target)  # size-only verification misses it


def test_missing_manifest_is_incomplete(store: DCPCheckpointStore) -> None:
    store.save(1, {"w": torch.ones(2)}, {})
    info = store.save(2, {"w": torch.ones(2)}, {})
    (info.path / "manifest.json").unlink()
    with pytest.raises(CheckpointError) as caught:
        store.load(info, {"w": torch.zeros(2)})
    assert str(caught.value) == f"checkpoint {info.path} has no manifest.json (incomplete or not a dfm checkpoint)"
    assert [i.step for i in store.list()] == [1]
    assert store.latest() is not None and store.latest().step == 1  # type: ignore[union-attr]


def test_missing_file_and_bad_json(store: DCPCheckpointStore) -> None:
    info = store.save(1, {"w": torch.ones(2)}, {})
    (info.path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json is missing \(the manifest lists it\)"):
        store.load(info, {"w": torch.zeros(2)})
    (info.path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"manifest\.json cannot be read"):
        store.load(info, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="does not exist"):
        store.load(store.root / "step_0000009", {})


def test_stale_latest_pointer_falls_back(store: DCPCheckpointStore) -> None:
    store.save(1, {"w": torch.ones(2)}, {})
    second = store.save(2, {"w": torch.ones(2)}, {})
    assert store.latest() == second
    (store.root / "latest").write_text("step_0000003\n")  # crash between publish and pointer, or a deleted dir
    assert store.latest() == second
    (store.root / "latest").unlink()
    assert store.latest() == second
    (store.root / "latest").write_text("step_0000001\n")  # a valid pointer wins over a newer step
    assert store.latest() is not None and store.latest().step == 1  # type: ignore[union-attr]
    (store.root / "latest").write_text("step_0000002\n")
    _corrupt(second.path / DATA, truncate=True)
    assert store.latest() is not None and store.latest().step == 1  # type: ignore[union-attr]


def test_keep_last_retention(tmp_path: Path) -> None:
    store = DCPCheckpointStore(tmp_path / "ckpt", keep_last=2)
    for step in range(1, 6):
        store.save(step, {"w": torch.full((2,), float(step))}, {})
    assert [info.step for info in store.list()] == [4, 5]
    store.save(3, {"w": torch.ones(2)}, {})  # rewound: the one just written is never pruned
    assert 3 in [info.step for info in store.list()] and len(store.list()) == 2
    assert store.latest() is not None and store.latest().step == 3  # type: ignore[union-attr]
    assert tmp_entries(store.root) == []


def test_saving_the_same_step_replaces_it(store: DCPCheckpointStore) -> None:
    store.save(1, {"w": torch.ones(2)}, {"v": 1})
    store.save(1, {"w": torch.full((2,), 2.0)}, {"v": 2})
    target = {"w": torch.zeros(2)}
    assert store.load(store.root, target) == {"v": 2} and target["w"].tolist() == [2.0, 2.0]
    assert tmp_entries(store.root) == [] and [i.step for i in store.list()] == [1]


def test_enospc_from_dcp_writer_monkeypatched(store: DCPCheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk full inside DCP's file writer, simulated by making its item writer raise ENOSPC.

    The real thing (a 2 MiB tmpfs) is in the next test, which needs permission to mount.
    """
    store.save(1, {"w": torch.ones(2)}, {})

    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_filesystem, "_write_item", full)
    with pytest.raises(CheckpointError) as caught:
        store.save(2, {"w": torch.ones(2)}, {})
    assert str(caught.value) == (
        f"out of disk space while writing checkpoint step 2 to {store.root / 'step_0000002'}: "
        "[Errno 28] No space left on device; the previous checkpoint step_0000001 is intact"
    )
    assert tmp_entries(store.root) == [] and store.latest() is not None and store.latest().step == 1  # type: ignore[union-attr]


def test_oserror_while_publishing_is_reported(store: DCPCheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(layout, "fsync", broken)
    with pytest.raises(CheckpointError) as caught:
        store.save(1, {"w": torch.ones(2)}, {})
    assert str(caught.value).startswith(f"could not write checkpoint step 1 to {store.root / 'step_0000001'}: ")
    assert str(caught.value).endswith("[Errno 5] Input/output error; no earlier checkpoint exists")
    assert tmp_entries(store.root) == [] and store.list() == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """A real 2 MiB tmpfs mounted under tmp_path (skips where mounting is not permitted)."""
    with tmpfs(tmp_path / "small", "size=2m") as mount_point:
        yield mount_point


def test_enospc_on_a_real_full_filesystem(small_fs: Path) -> None:
    store = DCPCheckpointStore(small_fs / "ckpt")
    store.save(1, {"w": torch.ones(16)}, {"at": 1})
    with pytest.raises(CheckpointError) as caught:
        store.save(2, {"w": torch.ones(1_000_000)}, {"at": 2})  # 4 MB into 2 MiB
    text = str(caught.value)
    assert text.startswith(f"out of disk space while writing checkpoint step 2 to {small_fs / 'ckpt/step_0000002'}: ")
    assert "No space left on device" in text and text.endswith("the previous checkpoint step_0000001 is intact")
    assert tmp_entries(store.root) == []
    target = {"w": torch.zeros(16)}
    assert store.load(store.root, target) == {"at": 1} and target["w"].sum() == 16
    store.save(2, {"w": torch.ones(16)}, {"at": 2})  # the space of the failed attempt was given back


def test_constructor_and_rank_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        DCPCheckpointStore(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="verify"):
        DCPCheckpointStore(tmp_path, verify="md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank=1 but no process group is initialised"):
        DCPCheckpointStore(tmp_path, rank=1).save(1, {"w": torch.ones(1)}, {})
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        DCPCheckpointStore(tmp_path).load(tmp_path, {})


_TWO_RANKS = """
import json, os, sys
from pathlib import Path
import torch
import torch.distributed as dist
from dfm.adapters.checkpoint import DCPCheckpointStore, read_meta
from dfm.ports.checkpoint import CheckpointError


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot serialise this on purpose")


def attempt(fn):
    try:
        fn()
        return None
    except CheckpointError as exc:
        return str(exc)


def main():
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(sys.argv[1])
    store = DCPCheckpointStore(root, keep_last=2)
    for step in (1, 2, 3):
        state = {f"rank{rank}.w": torch.full((4,), 10.0 * step + rank), "shared": {"bias": torch.arange(3.0) + step}}
        store.save(step, state, {"step": step})
    bad = {f"rank{rank}.w": torch.zeros(4)} | ({"oops": Unpicklable()} if rank == 1 else {})
    out = {"failed_save": attempt(lambda: store.save(4, bad, {"step": 4}))}
    target = {f"rank{r}.w": torch.zeros(4) for r in range(world)} | {"shared": {"bias": torch.zeros(3)}}
    out["meta"] = store.load(root, target)
    out["values"] = {key: value.tolist() for key, value in target.items() if key != "shared"}
    out["bias"] = target["shared"]["bias"].tolist()
    out["latest"] = store.latest().step
    out["listed"] = [info.step for info in store.list()]
    step_dir = root / "step_0000003"
    out["files"] = sorted(p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    dist.barrier()
    if rank == 0:  # same size, one byte changed in the file rank 1 wrote and hashes
        path = root / "step_0000003" / "tensors" / "shard-00002-model-00001-of-00001.safetensors"
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(blob)
    dist.barrier()
    out["corrupt_load"] = attempt(lambda: store.load(root, {f"rank{rank}.w": torch.zeros(4)}))
    (root.parent / f"result{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_save_and_load_collectively(tmp_path: Path) -> None:
    """Two gloo processes: rank-specific tensors merge in one checkpoint; failures and corruption agree."""
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(_TWO_RANKS))
    root = tmp_path / "ckpt"
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(root)], env=env | {"RANK": str(rank)}, stderr=subprocess.PIPE
        )
        for rank in range(2)
    ]
    try:
        errors = [proc.communicate(timeout=60)[1].decode() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], errors
    results = [json.loads((tmp_path / f"result{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["meta"] == {"step": 3} and result["latest"] == 3 and result["listed"] == [2, 3]
        assert result["values"] == {"rank0.w": [30.0] * 4, "rank1.w": [31.0] * 4}
        assert result["bias"] == [3.0, 4.0, 5.0]
        shards = {f"tensors/shard-0000{r + 1}-model-00001-of-00001.safetensors" for r in range(2)}
        assert set(result["files"]) == shards | {"state.json", "meta.json", "manifest.json"}
        assert "could not save checkpoint step 4" in result["failed_save"]
        assert "oops is a Unpicklable" in result["failed_save"]
        assert result["failed_save"].endswith("the previous checkpoint step_0000003 is intact")
        assert "tensors/shard-00002-model-00001-of-00001.safetensors has sha256" in result["corrupt_load"]
    assert "rank 1 failed" in results[0]["corrupt_load"]  # rank 1 found it; rank 0 raised with it
    assert tmp_entries(root) == []
