"""Compare the per-step losses of training runs against a reference run (the loss-parity figures).

    python scripts/compare_losses.py REFERENCE_RUN_DIR RUN_DIR [RUN_DIR ...]

Reads each run's ``metrics.jsonl`` and prints one JSON line per run: the steps both logged, the largest and the
mean relative difference of the loss from the reference's at the same step, and both runs' mean loss.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def losses(run: Path) -> dict[int, float]:
    """``{step: loss}`` of a run directory's ``metrics.jsonl`` (the last line of a step wins, as after a resume)."""
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "step" in row:
            out[int(row["step"])] = float(row["loss"])
    return out


def compare(reference: dict[int, float], other: dict[int, float]) -> dict[str, float | int]:
    """The relative differences of ``other``'s losses from ``reference``'s over the steps both have."""
    steps = sorted(set(reference) & set(other))
    if not steps:
        raise SystemExit("no step logged by both runs")
    rel = [abs(other[s] - reference[s]) / abs(reference[s]) for s in steps]
    return {
        "steps": len(steps),
        "max_rel_diff": max(rel),
        "mean_rel_diff": statistics.fmean(rel),
        "mean_loss": statistics.fmean(other[s] for s in steps),
        "reference_mean_loss": statistics.fmean(reference[s] for s in steps),
    }


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    reference = losses(Path(argv[0]))
    for run in map(Path, argv[1:]):
        print(json.dumps({"run": run.name or str(run), **compare(reference, losses(run))}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
