"""What `probe.benchmark_inference` reports for two tiny models: an MLP and an LSTM.

Why: docs/inference.md shows the figures a user gets, made by this script. No
agent is needed (telemetry is off, the result is returned all the same). The
figures are wall-clock latencies on whatever machine runs it: on a shared one,
read the int8 rows as what quantization does here, not as a promise.

    python bench/bench_inference.py                  # ~10 s on CPU
    python bench/bench_inference.py --device cuda    # fp32 on the GPU; int8 is skipped there
"""

from __future__ import annotations

import argparse
import os

import torch

import probe


class TinyLSTM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(64, 256, batch_first=True)
        self.head = torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rows", type=int, default=64, help="distinct example rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OUTRIDER_DISABLED", "1")
    torch.manual_seed(0)
    models = {
        "mlp 256-1024-1024-10": (
            torch.nn.Sequential(
                torch.nn.Linear(256, 1024),
                torch.nn.ReLU(),
                torch.nn.Linear(1024, 1024),
                torch.nn.ReLU(),
                torch.nn.Linear(1024, 10),
            ),
            torch.randn(args.rows, 256),
        ),
        "lstm 64->256, 32 steps": (TinyLSTM(), torch.randn(args.rows, 32, 64)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}")
    for name, (model, example) in models.items():
        model.to(args.device)
        result = probe.benchmark_inference(
            model, example.to(args.device), iters=args.iters, warmup=5
        )
        print(f"\n{name}  (peak memory: {result.get('memory_source')})")
        print(
            f"{'batch':>6} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9}"
            f" {'samples/s':>11} {'peak MiB':>9}"
        )
        for row in result["batches"]:
            print(
                f"{row['batch_size']:>6} {row['latency_p50_seconds'] * 1e3:>9.3f}"
                f" {row['latency_p90_seconds'] * 1e3:>9.3f}"
                f" {row['latency_p99_seconds'] * 1e3:>9.3f} {row['samples_per_second']:>11.0f}"
                f" {row['peak_memory_bytes'] / 2**20:>9.2f}"
            )
        q = result.get("quantized", {})
        if q.get("status") == "done":
            print(
                f"int8 dynamic ({q['engine']}): size {q['size_bytes_fp32'] / 2**20:.2f} ->"
                f" {q['size_bytes_int8'] / 2**20:.2f} MiB (x{q['size_ratio']:.2f}),"
                f" batch-1 p50 {q['latency_p50_seconds_fp32'] * 1e3:.3f} ->"
                f" {q['latency_p50_seconds_int8'] * 1e3:.3f} ms,"
                f" max abs diff {q['max_abs_diff']:.2g},"
                f" top-1 agreement {q.get('top1_agreement', float('nan')):.0%}"
            )
        else:
            print(f"int8 dynamic: {q.get('status', 'off')} ({q.get('reason', '')})")
        if "error" in result:
            print(f"error: {result['error']}")


if __name__ == "__main__":
    main()
