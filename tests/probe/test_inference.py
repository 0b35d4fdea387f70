"""probe.benchmark_inference on tiny CPU models, against a real agent and `outrider show`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import probe
from probe import internal
from probe.inference import percentile
from tests.helpers import clean_env, lines, outrider, stop_agent

LATENCIES = ("latency_p50_seconds", "latency_p90_seconds", "latency_p99_seconds")


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


class TinyLSTM(torch.nn.Module):
    """A sequence classifier: LSTM then a linear head on the last time step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = torch.nn.LSTM(16, 64, batch_first=True)
        self.head = torch.nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])  # type: ignore[no-any-return]


class Broken(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("shape mismatch in block 3")


def check_figures(result: dict[str, Any], batch_sizes: tuple[int, ...]) -> None:
    assert "error" not in result, result.get("error")
    assert result["device"] == "cpu"
    assert [row["batch_size"] for row in result["batches"]] == list(batch_sizes)
    for row in result["batches"]:
        p50, p90, p99 = (row[key] for key in LATENCIES)
        assert 0 < p50 <= p90 <= p99
        assert row["samples_per_second"] > 0
        assert row["peak_memory_bytes"] >= 0


@pytest.mark.parametrize(
    ("make", "shape"),
    [(mlp, (16, 32)), (TinyLSTM, (16, 12, 16))],
    ids=["mlp", "lstm"],
)
def test_figures_and_int8_agreement(make: Any, shape: tuple[int, ...]) -> None:
    """Latency percentiles ordered, throughput positive, int8 smaller and close to fp32
    on all 16 example rows (batch sizes take the first rows)."""
    model = make().train()
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    result = probe.benchmark_inference(model, example, batch_sizes=(1, 4), warmup=1, iters=5)
    check_figures(result, (1, 4))
    assert model.training, "the model's training mode was not restored"
    quantized = result["quantized"]
    assert quantized["status"] == "done"
    assert quantized["size_bytes_int8"] < quantized["size_bytes_fp32"]
    assert quantized["size_ratio"] < 0.5
    assert quantized["latency_p50_seconds_fp32"] > 0 and quantized["latency_p50_seconds_int8"] > 0
    with torch.no_grad():
        scale = float(model.eval()(example).abs().max())
    assert quantized["max_abs_diff"] < 0.05 * scale
    assert quantized["top1_agreement"] >= 0.9


def test_eval_mode_is_kept_and_quantize_can_be_off() -> None:
    """A model in eval mode stays in eval mode; quantize=False measures no int8 model."""
    model = mlp().eval()
    result = probe.benchmark_inference(
        model, torch.randn(1, 32), batch_sizes=(2,), iters=3, quantize=False
    )
    check_figures(result, (2,))
    assert not model.training and "quantized" not in result


def test_batches_repeat_a_multi_input_example() -> None:
    """Tuple inputs are repeated along dim 0 each; a non-tensor argument passes through."""
    seen: list[tuple[int, int, str]] = []

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 2)

        def forward(self, a: torch.Tensor, b: torch.Tensor, tag: str) -> torch.Tensor:
            seen.append((a.shape[0], b.shape[0], tag))
            return self.layer(a) + b  # type: ignore[no-any-return]

    example = (torch.randn(1, 3), torch.randn(1, 2), "x")
    result = probe.benchmark_inference(
        TwoInputs(), example, batch_sizes=(1, 3), warmup=0, iters=1, quantize=False
    )
    check_figures(result, (1, 3))
    assert seen == [(1, 1, "x"), (3, 3, "x")]


def test_quantization_skipped_without_quantizable_layers() -> None:
    """A model with no nn.Linear or nn.LSTM records int8 as skipped, with the reason."""
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3), torch.nn.ReLU())
    result = probe.benchmark_inference(model, torch.randn(1, 2, 8), batch_sizes=(1,), iters=2)
    check_figures(result, (1,))
    assert result["quantized"]["status"] == "skipped"
    assert "nn.Linear" in result["quantized"]["reason"]


def test_a_failing_model_is_reported_not_raised() -> None:
    """A forward that raises: no exception, `error` says why, not counted as a probe bug."""
    before = internal.error_count()
    result = probe.benchmark_inference(Broken(), torch.randn(1, 4))
    assert result["error"] == "RuntimeError: shape mismatch in block 3"
    assert result["batches"] == []
    assert internal.error_count() == before  # internal.RAISE is on: a recorded bug would raise


def test_not_a_module_is_reported_not_raised() -> None:
    """A plain function instead of an nn.Module: `error` names what is needed."""
    result = probe.benchmark_inference(lambda x: x * 2, torch.randn(1, 4))
    assert result["error"] == "TypeError: needs a torch.nn.Module, got function"


@pytest.mark.parametrize(
    "arguments", [{"iters": 0}, {"warmup": -1}, {"batch_sizes": ()}, {"batch_sizes": (1, 0)}]
)
def test_bad_arguments_raise_value_error(arguments: dict[str, Any]) -> None:
    """Misuse is a ValueError at the call, like probe.watch's."""
    with pytest.raises(ValueError, match="benchmark_inference needs"):
        probe.benchmark_inference(mlp(), torch.randn(1, 32), **arguments)


def test_percentile_interpolates_between_ranks() -> None:
    """p50 of 1..5 is 3, p90 is 4.6, p99 4.96: linear between neighbouring ranks."""
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert percentile(values, 50) == 3.0
    assert percentile(values, 90) == pytest.approx(4.6)
    assert percentile(values, 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0


def show(runs_dir: Path, run_id: str) -> str:
    done = outrider("show", run_id, "--runs-dir", str(runs_dir), env=clean_env())
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_figures_reach_the_run_store_and_show(agent, endpoint: str, runs_dir: Path) -> None:
    """Scalars under inference/ and the whole result as an event; `outrider show` prints it."""
    probe.init(endpoint, run_id="infer")
    result = probe.benchmark_inference(
        mlp(), torch.randn(1, 32), batch_sizes=(1, 8), warmup=1, iters=4, step=7
    )
    probe.finish()
    assert stop_agent(agent) == 0
    stored = lines(runs_dir / "infer")
    [scalars] = [
        line for line in stored if "inference/batch8/samples_per_second" in line.get("metrics", {})
    ]
    assert scalars["step"] == 7
    metrics = scalars["metrics"]
    for row in result["batches"]:
        for key in (*LATENCIES, "samples_per_second", "peak_memory_bytes"):
            assert metrics[f"inference/batch{row['batch_size']}/{key}"] == row[key]
    assert metrics["inference/quantized/size_ratio"] == result["quantized"]["size_ratio"]
    [event] = [line for line in stored if line.get("name") == "inference_benchmark"]
    assert event["step"] == 7 and event["attrs"] == result

    text = show(runs_dir, "infer")
    section = text[text.index("INFERENCE @ step 7") :].splitlines()
    assert section[1].split() == [
        "BATCH",
        "P50",
        "MS",
        "P90",
        "MS",
        "P99",
        "MS",
        "SAMPLES/S",
        "PEAK",
        "MIB",
    ]
    assert [row.split()[0] for row in section[2:4]] == ["1", "8"]
    p50_ms = float(section[3].split()[1])
    assert p50_ms == pytest.approx(result["batches"][1]["latency_p50_seconds"] * 1e3, rel=1e-3)
    assert section[4].startswith("int8 dynamic (") and "top-1 agreement 100%" in section[4]


def test_a_failing_model_shows_its_error(agent, endpoint: str, runs_dir: Path) -> None:
    """The failed benchmark still reaches the run, and `outrider show` prints its error."""
    probe.init(endpoint, run_id="broken")
    probe.benchmark_inference(Broken(), torch.randn(1, 4))
    probe.finish()
    assert stop_agent(agent) == 0
    text = show(runs_dir, "broken")
    assert "INFERENCE" in text
    assert "error: RuntimeError: shape mismatch in block 3" in text
