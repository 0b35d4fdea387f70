"""What one features batch's representation statistics cost a statistics worker.

Why: every ``probe.features`` batch becomes one ``representation`` job (rank, centred
rank, normalised std, pairwise cosine: docs/statistics.md); the job runs in a worker
process with one BLAS thread, so its CPU time is what the agent spends per batch.
Printed: the median CPU seconds of ``representation_stats`` over ``--repeats`` runs,
one BLAS thread, for each shape (rows x dim) of float32 Gaussian features.

    python bench/bench_representation.py
    python bench/bench_representation.py --shapes 2048x768 4096x1024 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from agent.analysis.representation import representation_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["256x64", "2048x128", "2048x768"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'rows x dim':>12}  {'CPU s (median, 1 thread)':>26}")
    with threadpool_limits(1):
        for shape in args.shapes:
            rows, dim = (int(part) for part in shape.split("x"))
            features = rng.standard_normal((rows, dim)).astype(np.float32)
            times = []
            for _ in range(args.repeats):
                start = time.process_time()
                representation_stats(features)
                times.append(time.process_time() - start)
            print(f"{shape:>12}  {statistics.median(times):>26.4f}")


if __name__ == "__main__":
    main()
