"""Multi-process tests on CPU: launch one process per rank (gloo), collect each rank's JSON result.

The parent (:func:`run_ranks`) sets what ``torchrun`` would (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, a free ``MASTER_PORT``) plus ``OMP_NUM_THREADS=1``, and polls the ranks: when one
fails, the others (stuck in their next collective) are killed and the failing rank's traceback is
raised. A worker script ends with ``run_worker(main)``: ``main(argv)`` returns a JSON-able dict.

Worker scripts need an ``if __name__ == "__main__":`` guard around ``run_worker`` (some torch
machinery re-imports the main module). ``tests/`` and the repository root are put on ``PYTHONPATH``,
so workers import ``support`` and ``dfm`` as tests do.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parents[1]
RESULT_VAR = "DFM_TEST_RESULT"
"""Environment variable naming the JSON file a worker writes its result to."""
_TAIL = 6000
_PORTS = random.SystemRandom()  # not the global generator, which tests seed: workers would pick the same ports


def free_port() -> int:
    """A TCP port nothing listens on right now (for ``MASTER_PORT``), below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, which the outgoing connections of
    every running job (gloo's pair connections among them) draw from too; between this check and the master's
    ``listen`` one of them may take it ("Connection reset by peer" while the ranks meet). Ports below the range are
    never handed out on their own, so only another explicit bind can race for one.
    """
    low = _ephemeral_floor()
    for _ in range(64):
        port = _PORTS.randrange(20000, low) if low > 20000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise AssertionError("no free TCP port below the ephemeral range after 64 tries")


def _ephemeral_floor() -> int:
    """The first port of Linux's ephemeral range (``ip_local_port_range``; 32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def run_ranks(target: str | Path, world: int, args: Sequence[str] = (), timeout: float = 120.0) -> list[dict[str, Any]]:
    """Run ``target`` as ``world`` gloo ranks and return their results in rank order.

    Args:
        target: A worker script (a path ending in ``.py``) or a module name (run with ``python -m``).
        world: Number of ranks.
        args: Command-line arguments given to every rank.
        timeout: Seconds the whole job may take.

    Raises:
        AssertionError: If a rank fails (with its stderr, the traceback included) or the job times out.
    """
    command = [str(target)] if str(target).endswith(".py") else ["-m", str(target)]
    path = os.pathsep.join([str(TESTS), str(TESTS.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    base = os.environ | {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": path,
    }
    with tempfile.TemporaryDirectory(prefix="dfm-ranks-") as tmp:
        root = Path(tmp)
        logs = [(root / f"rank{rank}.out").open("wb") for rank in range(world)]
        procs = [
            subprocess.Popen(
                [sys.executable, *command, *args],
                env=base | {"RANK": str(r), "LOCAL_RANK": str(r), RESULT_VAR: str(root / f"rank{r}.json")},
                stdout=logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]
        try:
            failed = _wait(procs, timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for log in logs:
                log.close()
        output = [_tail(root / f"rank{r}.out") for r in range(world)]
        if failed == "timeout":
            report = "\n".join(f"--- rank {r} ---\n{text}" for r, text in enumerate(output))
            raise AssertionError(f"{world} ranks of {target} did not finish within {timeout:.0f} s\n{report}")
        if failed:  # a peer of the rank that failed first may fail too, on its broken connection
            report = "\n".join(f"--- rank {r} (exit code {procs[r].returncode}) ---\n{output[r]}" for r in failed)
            raise AssertionError(f"ranks {failed} of {world} ({target}) failed:\n{report}")
        return [json.loads((root / f"rank{r}.json").read_text()) for r in range(world)]


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int] | str:
    """``[]`` when all succeed, the failed ranks (those seen failing first leading), or ``"timeout"``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc in procs]
        failing = [r for r, code in enumerate(codes) if code not in (None, 0)]
        if failing:
            time.sleep(0.5)  # let the peers that fail on the broken connection exit, to report them too
            return failing + [r for r, proc in enumerate(procs) if r not in failing and proc.poll() not in (None, 0)]
        if all(code == 0 for code in codes):
            return []
        time.sleep(0.05)
    return "timeout"


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text if len(text) <= _TAIL else "...\n" + text[-_TAIL:]


def run_worker(main: Callable[[list[str]], dict[str, Any]]) -> None:
    """A worker's entry point: one thread, ``main(sys.argv[1:])``, its result written as JSON.

    The process then exits at once (``os._exit``), with status 0, or 1 after an exception (whose
    traceback goes to stderr), skipping interpreter finalization: ``atexit`` handlers could wait on
    the other ranks, and gloo's worker threads can abort the process ("terminate called without an
    active exception", SIGABRT) when their objects are destroyed while the interpreter is torn down
    (pytorch/pytorch#179291) -- a rare failure CI met after a rank had finished its work.
    """
    torch.set_num_threads(1)
    code = 0
    try:
        result = main(sys.argv[1:])
        Path(os.environ[RESULT_VAR]).write_text(json.dumps(result))
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


def pose_as_rank(monkeypatch: Any, world: int, rank: int = 0) -> None:
    """Set the torchrun environment of ``rank`` of ``world`` in this process (for checks made before
    any process group is joined); ``monkeypatch`` undoes it after the test."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 1}
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def load_worker(path: Path, name: str, device: str | None = None) -> Any:
    """Import the worker script ``path`` as module ``name`` (its shared specs, batches and references).

    With ``device``, the import sees ``DFM_TEST_DEVICE=device`` (workers pick their device at import).
    """
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    previous = os.environ.get("DFM_TEST_DEVICE")
    if device is not None:
        os.environ["DFM_TEST_DEVICE"] = device
    try:
        spec.loader.exec_module(module)
    finally:
        if device is not None:
            if previous is None:
                del os.environ["DFM_TEST_DEVICE"]
            else:
                os.environ["DFM_TEST_DEVICE"] = previous
    return module
