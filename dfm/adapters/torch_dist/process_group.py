"""The default process group: read the launcher's environment, initialise once, tear down.

``torchrun`` (and any launcher that mimics it) starts one process per rank with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set. Without them the process is
a world of one: it gets a process group over an in-memory store, so the same runtime code (device
meshes, DTensor, DCP) runs unchanged in a single process. The backend follows the device: ``gloo``
on the CPU, ``nccl`` on CUDA (bound to the device ``LOCAL_RANK`` names).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta

import attrs
import structlog
import torch
import torch.distributed as dist

_log = structlog.get_logger(__name__)

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""The environment variables a ``torchrun`` worker gets (and :meth:`DistEnv.from_env` reads)."""

DEFAULT_TIMEOUT = timedelta(minutes=10)
"""How long a collective may wait for the other ranks before it fails."""


@attrs.frozen(kw_only=True)
class DistEnv:
    """Where this process sits among the processes the launcher started."""

    rank: int = 0
    """Global rank."""
    world_size: int = 1
    """Number of processes in the job."""
    local_rank: int = 0
    """Rank on this host (selects the GPU)."""
    master_addr: str | None = None
    """Host of the rendezvous store (rank 0); ``None`` in a single process without a launcher."""
    master_port: int | None = None
    """Port of the rendezvous store."""

    @property
    def launched(self) -> bool:
        """Whether a launcher set the environment (otherwise this is a lone process)."""
        return self.master_addr is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read :data:`TORCHRUN_VARS` from ``environ`` (default ``os.environ``).

        None of ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` set: a lone process (rank 0 of 1; a stray
        ``MASTER_ADDR``/``MASTER_PORT`` is ignored). Otherwise all five must be set, and be consistent.

        Raises:
            ValueError: If only some of the variables are set, or a value is not a valid number/rank.
        """
        env = os.environ if environ is None else environ
        present = [name for name in TORCHRUN_VARS if env.get(name)]
        if not {"RANK", "WORLD_SIZE", "LOCAL_RANK"} & set(present):
            return cls()
        missing = [name for name in TORCHRUN_VARS if name not in present]
        if missing:
            raise ValueError(
                f"incomplete torchrun environment: {', '.join(present)} set but {', '.join(missing)} not; "
                "launch with `torchrun --nproc-per-node N -m dfm.app.train ...`, or unset "
                f"{', '.join(present)} to run as a single process"
            )
        values = {name: _integer(env, name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or not 0 <= local <= rank:
            raise ValueError(
                f"inconsistent torchrun environment: RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world} "
                "(need WORLD_SIZE >= 1 and 0 <= LOCAL_RANK <= RANK < WORLD_SIZE)"
            )
        return cls(
            rank=rank,
            world_size=world,
            local_rank=local,
            master_addr=env["MASTER_ADDR"],
            master_port=values["MASTER_PORT"],
        )

    def device(self, device_type: str) -> torch.device:
        """This rank's device of ``device_type``: ``cpu``, or ``cuda:LOCAL_RANK``."""
        return torch.device("cuda", self.local_rank) if device_type == "cuda" else torch.device(device_type)


def _integer(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"torchrun environment variable {name} must be an integer, got {env[name]!r}") from None


def init_process_group(
    device: torch.device | str,
    timeout: timedelta = DEFAULT_TIMEOUT,
    *,
    min_world_size: int = 1,
    env: DistEnv | None = None,
) -> DistEnv:
    """Initialise the default process group for ``device``'s type, once (later calls check and return).

    Args:
        device: ``"cpu"`` (``gloo``) or ``"cuda"``/``"cuda:N"`` (``nccl``; the rank uses ``cuda:LOCAL_RANK``,
            which becomes the current device and the group's ``device_id``).
        timeout: How long collectives wait for the other ranks.
        min_world_size: The number of processes the caller's parallel layout needs at least.
        env: The launcher's environment (default: :meth:`DistEnv.from_env`).

    Returns:
        The environment the group was built from.

    Raises:
        ValueError: If the layout needs more processes than were launched (in particular when no
            launcher set the environment), if CUDA is asked for but unavailable, or if a group already
            exists with another rank/world size.
    """
    env = DistEnv.from_env() if env is None else env
    device_type = torch.device(device).type
    if env.world_size < min_world_size:
        how = (
            "this process was not started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are "
            "unset)"
            if not env.launched
            else f"only {env.world_size} were launched (WORLD_SIZE={env.world_size})"
        )
        raise ValueError(
            f"the parallel layout needs at least {min_world_size} processes, but {how}; launch with "
            f"`torchrun --nproc-per-node {min_world_size} -m dfm.app.train ...`, or reduce the parallel sizes"
        )
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
            raise ValueError(
                f"a process group already exists with rank {dist.get_rank()} of {dist.get_world_size()}, "
                f"but the environment says rank {env.rank} of {env.world_size}"
            )
        return env
    if device_type == "cuda":
        if not torch.cuda.is_available() or env.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r} needs CUDA device {env.local_rank} (LOCAL_RANK), but "
                f"{torch.cuda.device_count()} are visible"
            )
        torch.cuda.set_device(env.local_rank)
    elif device_type != "cpu":
        raise ValueError(f"no process-group backend for device type {device_type!r}; use 'cpu' or 'cuda'")
    backend = "nccl" if device_type == "cuda" else "gloo"
    device_id = env.device(device_type) if device_type == "cuda" else None
    if env.launched:
        dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    else:  # a lone process: rendezvous through an in-memory store, no port needed
        dist.init_process_group(
            backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, device_id=device_id
        )
    _log.info("process group ready", backend=backend, rank=env.rank, world_size=env.world_size)
    return env


def destroy() -> None:
    """Destroy the default process group and every subgroup (nothing to do when there is none)."""
    if dist.is_initialized():
        dist.destroy_process_group()
