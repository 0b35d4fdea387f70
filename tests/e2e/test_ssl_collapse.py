"""A real SimSiam collapses without its stop-gradient, and the built-in rule says so.

Two tiny SimSiam trainers (issue 19) run under one real agent with its built-in alert
rules: the same seeded model, data and optimiser, once with the stop-gradient and once
without. Only the second may raise ``representation_collapse``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.helpers import lines, run_trainer, short_ipc_endpoint, start_agent, stop_agent

STEPS = 300
EVERY = 10

# SimSiam (Chen & He 2021) at toy scale: 12 clusters in R^16, two views of each point
# (20% of coordinates dropped, scaled, noised), an MLP encoder with a 64-d output and a
# bottleneck predictor, symmetric negative-cosine loss. Without the stop-gradient the
# encoder is free to map every view to nearly the same vector, and SGD finds that within
# tens of steps: the embeddings' mean pairwise cosine goes 0.26 -> 0.96 and their
# normalised std x sqrt(d) 0.85 -> 0.18 in 300 steps, while the run with it stays at
# ~0.07 and ~0.94. The encoder's last layer has no BatchNorm: a BN output layer keeps
# every dimension at zero mean and unit variance, which holds the collapse off for far
# longer than a test can train. lr 0.1 (instead of 0.05) makes the collapse deeper sooner.
TRAINER = f"""
import json, os, pathlib, time, torch, torch.nn as nn, torch.nn.functional as F, probe
probe.init()
stop_gradient = os.environ["SIMSIAM_STOP_GRADIENT"] == "1"
torch.manual_seed(0)
torch.set_num_threads(1)
inputs, clusters, batch, dim = 16, 12, 256, 64
generator = torch.Generator().manual_seed(1)
centres = 2.0 * torch.randn(clusters, inputs, generator=generator)

def views():
    points = centres[torch.randint(0, clusters, (batch,), generator=generator)]
    points = points + 0.5 * torch.randn(batch, inputs, generator=generator)
    def view():
        keep = (torch.rand(batch, inputs, generator=generator) > 0.2).float()
        scale = 0.8 + 0.4 * torch.rand(batch, 1, generator=generator)
        return points * keep * scale + 0.2 * torch.randn(batch, inputs, generator=generator)
    return view(), view()

encoder = nn.Sequential(
    nn.Linear(inputs, 128), nn.BatchNorm1d(128), nn.ReLU(),
    nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(),
    nn.Linear(128, dim),
)
predictor = nn.Sequential(nn.Linear(dim, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, dim))
params = list(encoder.parameters()) + list(predictor.parameters())
optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-4)

def negative_cosine(p, z):
    return -F.cosine_similarity(p, z.detach() if stop_gradient else z, dim=-1).mean()

store = pathlib.Path(os.environ["RUNS_DIR"]) / os.environ["OUTRIDER_RUN_ID"] / "metrics.jsonl"
judged, position, pending = set(), 0, b""

def wait_until_judged(step):
    global position, pending
    deadline = time.monotonic() + 30
    while step not in judged and time.monotonic() < deadline:
        if store.exists():
            with open(store, "rb") as stored:
                stored.seek(position)
                pending += stored.read()
                position = stored.tell()
            *whole, pending = pending.split(b"\\n")
            for line in whole:
                entry = json.loads(line)
                derived = entry.get("stream") == "agent" and entry.get("metrics", {{}})
                if derived and "features/embedding/rows" in derived:
                    judged.add(entry["step"])
        time.sleep(0.01)

for step in range({STEPS}):
    first, second = views()
    z1, z2 = encoder(first), encoder(second)
    loss = 0.5 * negative_cosine(predictor(z1), z2) + 0.5 * negative_cosine(predictor(z2), z1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    probe.log({{"loss": loss.detach()}}, step=step)
    probe.features("embedding", z1, step=step, every={EVERY})
    if step in (0, {STEPS // 2}):
        # A toy step takes ~4 ms: batches that come faster than the agent's analysis replace
        # each other (newest wins), where a real run's, seconds apart, are all judged. The
        # untrained step-0 batch (the baseline's start) and one mid-run are waited for.
        probe.flush(5)
        wait_until_judged(step)
probe.finish()
"""

# Statistics jobs at normal priority and without a CPU cap: on a busy 2-core machine an
# idle-class worker may get no CPU before the run ends, and this test is about the rule.
CONFIG = "stats: {idle: false, cpu_share: 0, feature_map: 'off', dashboard_seconds: 0}\n"
LAST = (STEPS - 1) // EVERY * EVERY


def _statistics(run_dir: Path) -> dict[int, dict[str, float]]:
    """features/embedding/* per step, from the agent's derived lines."""
    by_step: dict[int, dict[str, float]] = {}
    for entry in lines(run_dir, agent_lines=True):
        if entry["stream"] == "agent" and entry["kind"] == "scalars":
            for name, value in entry["metrics"].items():
                if name.startswith("features/embedding/"):
                    by_step.setdefault(entry["step"], {})[name.rpartition("/")[2]] = value
    return by_step


def _alerts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "alerts.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.serial
def test_simsiam_without_stop_gradient_raises_collapse_and_with_it_stays_silent(
    tmp_path: Path,
) -> None:
    """Built-in rules: the collapsing run fires representation_collapse, the healthy one not."""
    config = tmp_path / "agent.yaml"
    config.write_text(CONFIG)
    endpoint = short_ipc_endpoint()
    runs = tmp_path / "runs"
    agent = start_agent(endpoint, runs, "--config", str(config))
    try:
        for run, stop_gradient in (("healthy", "1"), ("collapsed", "0")):
            environment = {"SIMSIAM_STOP_GRADIENT": stop_gradient, "RUNS_DIR": str(runs)}
            done = run_trainer(TRAINER, endpoint, run, timeout=120, **environment)
            assert done.returncode == 0, done.stderr
    finally:
        assert stop_agent(agent, timeout=60) == 0

    healthy, collapsed = _statistics(runs / "healthy"), _statistics(runs / "collapsed")
    for judged in (healthy, collapsed):
        assert {0, STEPS // 2, LAST} <= set(judged)
    # Both start from the same untrained network (same seeds): the same step-0 batch.
    assert healthy[0]["mean_pairwise_cosine"] == pytest.approx(collapsed[0]["mean_pairwise_cosine"])
    end_healthy, end_collapsed = healthy[LAST], collapsed[LAST]
    measures = (
        "mean_pairwise_cosine",
        "collapse_ratio",
        "effective_rank",
        "centered_effective_rank",
    )
    print(f"{'':>20}", *(f"{m:>24}" for m in measures))  # the figures docs/statistics.md shows
    for label, stats in (
        ("untrained (step 0)", healthy[0]),
        (f"stop-gradient, {LAST}", end_healthy),
        (f"without it, {LAST}", end_collapsed),
    ):
        print(f"{label:>20}", *(f"{stats[m]:>24.3g}" for m in measures))
    assert end_healthy["mean_pairwise_cosine"] < 0.3
    assert end_healthy["collapse_ratio"] > 0.7
    assert end_collapsed["mean_pairwise_cosine"] > 0.9
    assert end_collapsed["collapse_ratio"] < 0.35 * collapsed[0]["collapse_ratio"]

    assert [a for a in _alerts(runs / "healthy") if a["name"] == "representation_collapse"] == []
    fired = [a for a in _alerts(runs / "collapsed") if a["name"] == "representation_collapse"]
    assert len(fired) == 1
    alert = fired[0]
    assert alert["severity"] == "error"
    assert alert["attrs"]["stream"] == "features/embedding"
    assert alert["message"].startswith("representation collapse in features/embedding: ")
    assert alert["step"] <= STEPS // 2  # caught while the run was still training
