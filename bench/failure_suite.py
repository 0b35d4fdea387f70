"""The failure suite: does each alert rule catch the failure it is for, how fast, and
does it stay quiet on healthy training?

Small CPU trainers of four families (an MLP, a CNN, an LSTM, SimSiam), with
SGD+momentum or AdamW and constant, cosine or warm-up schedules, with and
without clipping, each run as a real trainer under a real agent (``outrider
run``). Failures are injected at a known step, the onset: a NaN, a corrupt
batch (a spike the run recovers from), a runaway learning rate, exploding and
vanishing gradients, a learning rate dropped to ~0, a tiny training set,
SimSiam without its stop-gradient, a leak of step graphs, a 30 s hang, a
SIGKILL. The agent's config shortens the two rules that wait minutes
(``stalled``: 15 s, ``memory_leak``: a 15 s window) so a run takes ~30 s.

Printed: per rule, the failures it caught of those it should, the median and
max latency in steps from the onset, and its false alarms (warning or above)
on the healthy runs and the spike run; then per scenario, what fired where.

    python bench/failure_suite.py                      # everything, 2 runs at a time
    python bench/failure_suite.py --quick              # what CI runs (~2 min)
    python bench/failure_suite.py nan leak --json out.json
    python bench/failure_suite.py --list
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.failures, as CI imports it

from bench._common import machine
from bench.failures.report import as_json, print_tables, score
from bench.failures.runner import RunResult, run_suite
from bench.failures.scenarios import QUICK, SCENARIOS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("scenarios", nargs="*", help="scenario names (default: all)")
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2)")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--workdir", type=Path, help="keep each run's directory here")
    p.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = p.parse_args()

    if args.list:
        for scenario in SCENARIOS.values():
            expected = "/".join(scenario.expected) or "no warning+ alert"
            print(f"{scenario.name:24s} {scenario.setup():34s} -> {expected}")
        return
    names = list(QUICK) if args.quick else args.scenarios or list(SCENARIOS)
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario {', '.join(unknown)}; --list shows them")
    scenarios = [SCENARIOS[name] for name in names]

    print(f"failure suite: {len(scenarios)} runs, {args.jobs} at a time | {machine()}")
    started = time.monotonic()

    printing = threading.Lock()  # runs end on their own threads

    def progress(result: RunResult) -> None:
        alerts = " ".join(sorted({a.name for a in result.alerts})) or "no alerts"
        with printing:
            print(
                f"  {result.scenario.name:24s} {result.wall_seconds:5.0f} s"
                f"  exit {result.exit_status}  {alerts}",
                flush=True,
            )

    with tempfile.TemporaryDirectory(prefix="failure-suite-") as tmp:
        workdir = args.workdir or Path(tmp)
        results = run_suite(scenarios, workdir, jobs=args.jobs, on_result=progress)
    wall = time.monotonic() - started
    scores = [score(result) for result in results]
    print_tables(scores)
    print(f"\n{wall:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(as_json(scores, wall), indent=1))
        print(f"results in {args.json}")


if __name__ == "__main__":
    main()
