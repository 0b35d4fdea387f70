"""What writing an offline W&B run at its end costs (the W&B sink's ``offline_at_end``).

With W&B offline, the sink starts no W&B run while the training runs; at the run's end it
writes the W&B run from the run store. That work comes after the trainer has exited, but
it must fit the agent's ``sink_close_timeout``. This stores runs of several lengths with a
real agent (``outrider simulate``, run store only), then times the sink's own path on
each: starting W&B, reading ``metrics.jsonl``, the rows, finishing the run.

    .venv/bin/python bench/bench_wandb_at_end.py --steps 2000,20000,100000

Figures are printed, never asserted: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, machine, print_table


def store_run(runs_dir: Path, run_id: str, steps: int) -> Path:
    """A simulated run of ``steps`` steps, stored by a real agent with no sinks."""
    subprocess.run(
        [
            *(sys.executable, "-P", "-m", "agent", "simulate", "--steps", str(steps)),
            *("--steps-per-second", "4000", "--sinks", "none", "--runs-dir", str(runs_dir)),
            *("--run-id", run_id, "-q"),
        ],
        cwd=ROOT,
        env=dict(os.environ, OUTRIDER_DASHBOARD="off"),
        check=True,
    )
    return runs_dir / run_id


def write_at_end(runs_dir: Path, run_dir: Path) -> tuple[float, float]:
    """Wall and CPU seconds of the sink writing the stored run (as at an agent's stop)."""
    from sinks.registry import SinkContext
    from sinks.wandb import WandbSink

    sink = WandbSink(WandbSink.Options(mode="offline"), SinkContext(runs_dir))
    sink.prepare()
    wall, cpu = time.perf_counter(), time.process_time()
    sink.deferred[run_dir.name] = run_dir
    sink.close(timeout=300)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="2000,20000", help="run lengths, comma-separated")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="wandb-at-end-") as tmp:
        os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=tmp)
        runs_dir = Path(tmp) / "runs"
        for steps in (int(n) for n in args.steps.split(",")):
            run_dir = store_run(runs_dir, f"steps-{steps}", steps)
            lines = (run_dir / "metrics.jsonl").read_bytes().count(b"\n")
            wall, cpu = write_at_end(runs_dir, run_dir)
            rows.append(
                [f"{steps:,}", f"{lines:,}", f"{wall:.1f}", f"{cpu:.1f}", f"{lines / wall:,.0f}"]
            )
    print_table(["steps", "stored lines", "wall s", "CPU s (sink)", "lines/s"], rows)


if __name__ == "__main__":
    main()
