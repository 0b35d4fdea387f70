"""probe.features and probe.evaluate_lm against a real agent, checked with plain PyTorch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import probe
from tests.helpers import lines, run_info, stop_agent, trainer_streams


@pytest.fixture
def agent_options(tmp_path: Path) -> tuple[str, ...]:
    """No statistics: these tests check what the probe ships and the run store keeps; a map
    and the statistics of each batch at the agent's exit only take time (the wide batch's:
    about 9 s)."""
    config = tmp_path / "agent.yaml"
    config.write_text("stats: {enabled: false}\n")
    return ("--config", str(config))


def finish(agent, runs_dir: Path, run_id: str) -> list[dict]:
    probe.finish()
    assert stop_agent(agent) == 0
    return lines(runs_dir / run_id)


def tensor_rows(runs_dir: Path, run_id: str, line: dict) -> np.ndarray:
    blob = (runs_dir / run_id / "tensors.bin").read_bytes()
    data = blob[line["offset"] : line["offset"] + line["nbytes"]]
    return np.frombuffer(data, dtype=np.float32).reshape(line["shape"])


def test_features_are_row_sampled_and_throttled(agent, endpoint: str, runs_dir: Path) -> None:
    """Only every `every` steps, at most max_rows rows, each a real row of the input."""
    probe.init(endpoint, run_id="features")
    batches = {}
    for step in range(10):
        h = torch.randn(4, 300, 8)  # (batch, time, dim): 1,200 rows
        batches[step] = h.reshape(-1, 8)
        probe.features("hidden", h, step=step, every=5, max_rows=256)
    stored = finish(agent, runs_dir, "features")
    shipped = [line for line in stored if line.get("as") == "features"]
    assert [line["step"] for line in shipped] == [0, 5]
    for line in shipped:
        assert line["shape"] == [256, 8] and line["dtype"] == "float32"
        rows = tensor_rows(runs_dir, "features", line)
        source = batches[line["step"]].numpy()
        matches = (rows[:, None, :] == source[None, :, :]).all(-1)
        assert matches.any(1).all(), "a shipped row is not a row of the input"
        assert len({tuple(r) for r in rows}) == 256, "rows were sampled with repetition"


def test_paired_features_take_the_same_rows(agent, endpoint: str, runs_dir: Path) -> None:
    """A teacher paired with a student ships the rows of the same samples."""
    probe.init(endpoint, run_id="pairs")
    student = torch.randn(1000, 4)
    teacher = student * 10  # row i of the teacher belongs to row i of the student
    probe.features("student", student, step=0, max_rows=100)
    probe.features("teacher", teacher, step=0, max_rows=100, pair="student")
    stored = finish(agent, runs_dir, "pairs")
    by_name = {line["name"]: line for line in stored if line.get("as") == "features"}
    assert by_name["teacher"]["pair"] == "student"
    s = tensor_rows(runs_dir, "pairs", by_name["student"])
    t = tensor_rows(runs_dir, "pairs", by_name["teacher"])
    assert np.allclose(t, s * 10)


def test_wide_features_stay_under_the_tensor_limit(agent, endpoint: str, runs_dir: Path) -> None:
    """Rows are cut so the batch fits the 8 MiB wire limit, instead of being dropped."""
    probe.init(endpoint, run_id="wide")
    probe.features("wide", torch.randn(4096, 2048, dtype=torch.float16), step=0)
    stored = finish(agent, runs_dir, "wide")
    [line] = [line for line in stored if line.get("as") == "features"]
    assert line["shape"] == [1024, 2048] and line["nbytes"] <= 8 * 1024 * 1024


class TinyLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 16)
        self.head = torch.nn.Linear(16, 11)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.head(self.emb(x)), None  # (logits, aux) like many LM codebases


def test_evaluate_lm_matches_plain_pytorch(agent, endpoint: str, runs_dir: Path) -> None:
    """val/loss, val/perplexity and val/accuracy equal a direct computation; mode restored."""
    probe.init(endpoint, run_id="eval")
    torch.manual_seed(0)
    model = TinyLM().train()
    batches = [(torch.randint(11, (3, 7)), torch.randint(11, (3, 7))) for _ in range(4)]
    batches[1][1][0, :3] = -100  # ignored positions
    results = probe.evaluate_lm(model, batches, step=42)
    assert model.training
    with torch.no_grad():
        logits = torch.cat([model(x)[0].reshape(-1, 11) for x, _ in batches])
        targets = torch.cat([y.reshape(-1) for _, y in batches])
    keep = targets != -100
    expected_loss = F.cross_entropy(logits[keep], targets[keep]).item()
    expected_accuracy = (logits[keep].argmax(-1) == targets[keep]).float().mean().item()
    assert math.isclose(results["val/loss"].item(), expected_loss, rel_tol=1e-5)
    stored = finish(agent, runs_dir, "eval")
    [line] = [line for line in stored if "val/loss" in line.get("metrics", {})]
    assert line["step"] == 42
    metrics = line["metrics"]
    assert math.isclose(metrics["val/loss"], expected_loss, rel_tol=1e-5)
    assert math.isclose(metrics["val/perplexity"], math.exp(expected_loss), rel_tol=1e-5)
    assert math.isclose(metrics["val/accuracy"], expected_accuracy, rel_tol=1e-6)
    [stream] = trainer_streams(run_info(runs_dir / "eval"))
    assert stream["invalid_values"] == 0
