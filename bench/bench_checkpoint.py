"""What ``probe.checkpoint.save`` costs the training thread beside a bare ``torch.save``.

Why: the save runs on the training thread (the trainer asked for it), and its
atomicity has a price: the fsync of the checkpoint, of ``index.json`` and
``latest``, and of the directory. A bare ``torch.save`` returns once the bytes
are in the page cache. Both write the same state into the same directory,
interleaved, so the ratio is taken side by side; telemetry is off (the event
is a queue append either way). Printed: wall and CPU seconds, median of
``--repeats``.

    python bench/bench_checkpoint.py                   # 100 MB of float32
    python bench/bench_checkpoint.py --megabytes 1000 --dir /mnt/fast
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from _common import machine, print_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    os.environ["OUTRIDER_DISABLED"] = "1"
    import torch

    from probe import checkpoint

    state = {"weights": torch.randn(args.megabytes * 1024 * 1024 // 4)}
    folder = tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir)
    timings: dict[str, list[tuple[float, float]]] = {"torch.save": [], "checkpoint.save": []}
    try:
        for step in range(args.repeats):
            for name in timings:
                wall, cpu = time.perf_counter(), time.process_time()
                if name == "torch.save":
                    torch.save(state, os.path.join(folder, "plain.pt"))
                else:
                    checkpoint.save(state, folder, step, keep_last=1)
                timings[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(machine())
    rows = [
        [
            name,
            f"{statistics.median(w for w, _ in runs):.3f}",
            f"{statistics.median(c for _, c in runs):.3f}",
        ]
        for name, runs in timings.items()
    ]
    print(f"{args.megabytes} MB state, median of {args.repeats}, written under {folder}")
    print_table(["save", "wall s", "cpu s"], rows)


if __name__ == "__main__":
    main()
