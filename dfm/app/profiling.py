"""``--profile DIR`` of the benchmarks: a ``torch.profiler`` trace and the top operators by self time."""

from __future__ import annotations

from pathlib import Path

import torch


def profiler() -> torch.profiler.profile:
    """A profiler of CPU and (where present) CUDA activity, without shapes (small traces)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=False)


def write_profile(prof: torch.profiler.profile, out: Path) -> None:
    """Write ``trace_rank{r}.json`` (chrome://tracing, Perfetto) and ``top_ops_rank{r}.txt`` (the 40 operators
    with the most self CUDA time, or CPU time without CUDA) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    prof.export_chrome_trace(str(out / f"trace_rank{rank}.json"))
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (out / f"top_ops_rank{rank}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
