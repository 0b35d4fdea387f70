"""probe.watch against plain PyTorch: real agent process, real small models on CPU.

Every expected number is computed in the test with ordinary torch calls and
compared with what the agent stored in metrics.jsonl.
"""

from __future__ import annotations

import importlib
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import probe
from tests.helpers import lines, run_info, stop_agent

ORIGINAL_CLIP = torch.nn.utils.clip_grad_norm_  # the real one, taken before any watch


@pytest.fixture(autouse=True)
def no_watch_left_behind() -> Iterator[None]:
    """A failed test must not leave hooks or the clip patch to the next one."""
    yield
    probe.unwatch()


# -- helpers -------------------------------------------------------------------------------


def stored_run(agent: Any, runs_dir: Path, run_id: str) -> tuple[list[dict], dict]:
    """Finish the probe, stop the agent, and read back what it stored."""
    probe.finish()
    assert stop_agent(agent) == 0
    run_dir = runs_dir / run_id
    return lines(run_dir), run_info(run_dir)


def by_step(stored: list[dict]) -> dict[int, dict[str, Any]]:
    """All scalars of each step, merged across records (a name never arrives twice)."""
    steps: dict[int, dict[str, Any]] = {}
    for line in stored:
        if line["kind"] == "scalars":
            merged = steps.setdefault(line["step"], {})
            assert not merged.keys() & line["metrics"].keys(), "a metric arrived twice"
            merged.update(line["metrics"])
    return steps


def histograms(stored: list[dict]) -> dict[tuple[int, str], dict]:
    return {(line["step"], line["name"]): line for line in stored if line["kind"] == "histogram"}


def steps_with(steps: dict[int, dict[str, Any]], prefix: str) -> set[int]:
    return {step for step, metrics in steps.items() if any(k.startswith(prefix) for k in metrics)}


def layer_names(metrics: dict[str, Any], prefix: str) -> set[str]:
    return {name.removeprefix(prefix) for name in metrics if name.startswith(prefix)}


def norm(tensors: list[torch.Tensor]) -> float:
    """The 2-norm of all elements of ``tensors`` together, in float64."""
    return float(
        torch.linalg.vector_norm(torch.cat([t.detach().double().reshape(-1) for t in tensors]))
    )


def close(value: Any, expected: float, rel: float = 1e-5) -> bool:
    return value == pytest.approx(expected, rel=rel, abs=1e-7)


def mlp(seed: int = 0, width: int = 16) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))


def batch(step: int, size: int = 8, features: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, features, generator=generator)
    return x, x.sum(dim=1, keepdim=True)


def backward(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """The step's gradients: its batch, zeroed gradients, one MSE backward pass."""
    x, y = batch(step)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()


def forward_hook_count(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def optimizer_hook_count(optimizer: torch.optim.Optimizer) -> int:
    return len(optimizer._optimizer_step_pre_hooks) + len(optimizer._optimizer_step_post_hooks)


WATCH_BASE = {"grad_norm", "grad_nonfinite", "lr"}
TIMING = {"step_time_seconds", "steps_per_second"}  # every step from the 2nd, whatever is due
SECTIONS = {"forward_seconds", "backward_seconds"}  # every step with a forward and a backward
SECTION_HOOKS = 1  # the forward hook (and a pre-hook) on the model that time its forwards


# -- values against plain PyTorch ----------------------------------------------------------


@pytest.mark.parametrize("max_norm", [None, 0.05, 1e6], ids=["no-clip", "clipping", "clip-no-op"])
def test_grad_norms_are_the_pre_clip_norms(
    agent: Any, endpoint: str, runs_dir: Path, max_norm: float | None
) -> None:
    """grad_norm and grad_norm/layer/* are the norms before clip_grad_norm_, as it returns them."""
    probe.init(endpoint, run_id="clip")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe.watch(model, opt, layer_every=1)
    expected: list[tuple[float, dict[str, float]]] = []
    for step in range(4):
        backward(model, opt, step)
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        total = norm(list(grads.values()))
        if max_norm is not None:
            returned = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            assert close(float(returned), total)
            total = float(returned)  # the trainer's own pre-clip norm
            after = norm([p.grad for p in model.parameters()])
            if max_norm < 1:
                assert after == pytest.approx(max_norm, rel=1e-3), "the test must really clip"
        expected.append((total, {name: norm([g]) for name, g in grads.items()}))
        opt.step()
    steps = by_step(stored_run(agent, runs_dir, "clip")[0])
    assert sorted(steps) == [0, 1, 2, 3]
    for step, (total, layers) in enumerate(expected):
        assert close(steps[step]["grad_norm"], total), step
        assert steps[step]["grad_nonfinite"] == 0
        for name, value in layers.items():
            assert close(steps[step][f"grad_norm/layer/{name}"], value), (step, name)


def test_groups_clipped_separately_log_their_own_pre_clip_norms(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Two clip_grad_norm_ calls, one per group, each undone with its own factor."""
    probe.init(endpoint, run_id="clip-groups")
    model = mlp()
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    opt = torch.optim.SGD([{"params": groups[0]}, {"params": groups[1]}], lr=0.05)
    probe.watch(model, opt)
    expected = []
    for step in range(3):
        backward(model, opt, step)
        before = [norm([p.grad for p in group]) for group in groups]
        torch.nn.utils.clip_grad_norm_(groups[0], 0.01)
        torch.nn.utils.clip_grad_norm_(groups[1], 0.02)
        assert norm([p.grad for p in groups[0]]) == pytest.approx(0.01, rel=1e-3)
        expected.append(before)
        opt.step()
    steps = by_step(stored_run(agent, runs_dir, "clip-groups")[0])
    for step, before in enumerate(expected):
        assert close(steps[step]["grad_norm/group0"], before[0]), step
        assert close(steps[step]["grad_norm/group1"], before[1]), step
        assert close(steps[step]["grad_norm"], (before[0] ** 2 + before[1] ** 2) ** 0.5), step


@pytest.mark.parametrize("how", ["one group only", "norm_type inf", "error_if_nonfinite"])
def test_other_clip_calls_still_log_pre_clip_norms(
    agent: Any, endpoint: str, runs_dir: Path, how: str
) -> None:
    """Clipping a subset, or with arguments the norm-reusing path leaves to torch (another
    norm type, error_if_nonfinite): the logged norms are still those before clipping."""
    run_id = f"clip-{how.replace(' ', '-')}"
    probe.init(endpoint, run_id=run_id)
    model = mlp()
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    opt = torch.optim.SGD([{"params": groups[0]}, {"params": groups[1]}], lr=0.05)
    probe.watch(model, opt, layer_every=1)
    expected = []
    for step in range(3):
        backward(model, opt, step)
        layers = {name: norm([p.grad]) for name, p in model.named_parameters()}
        before = norm([p.grad for p in model.parameters()])
        if how == "one group only":
            torch.nn.utils.clip_grad_norm_(groups[0], 0.01)
        elif how == "norm_type inf":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.001, norm_type=math.inf)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01, error_if_nonfinite=True)
        clipped = groups[0] if how == "one group only" else list(model.parameters())
        assert norm([p.grad for p in clipped]) < 0.05, "the test must really clip"
        expected.append((before, layers))
        opt.step()
    steps = by_step(stored_run(agent, runs_dir, run_id)[0])
    for step, (before, layers) in enumerate(expected):
        assert close(steps[step]["grad_norm"], before), step
        for name, value in layers.items():
            assert close(steps[step][f"grad_norm/layer/{name}"], value), (step, name)


def test_clip_with_a_given_norm_logs_pre_clip_norms(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """accelerate's clip (and so the Hugging Face Trainer's): get_total_norm, then
    clip_grads_with_norm_ with that norm; the logged norms are those before it, and
    unwatch puts torch's function back."""
    original = torch.nn.utils.clip_grads_with_norm_
    probe.init(endpoint, run_id="clip-with-norm")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watcher = probe.watch(model, opt, layer_every=1)
    assert torch.nn.utils.clip_grads_with_norm_ is not original
    expected = []
    for step in range(3):
        backward(model, opt, step)
        layers = {name: norm([p.grad]) for name, p in model.named_parameters()}
        params = list(model.parameters())
        total = torch.nn.utils.get_total_norm([p.grad for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, 0.01, total)
        assert norm([p.grad for p in params]) == pytest.approx(0.01, rel=1e-3), "must clip"
        expected.append((float(total), layers))
        opt.step()
    watcher.unwatch()
    assert torch.nn.utils.clip_grads_with_norm_ is original
    steps = by_step(stored_run(agent, runs_dir, "clip-with-norm")[0])
    for step, (total, layers) in enumerate(expected):
        assert close(steps[step]["grad_norm"], total), step
        for name, value in layers.items():
            assert close(steps[step][f"grad_norm/layer/{name}"], value), (step, name)


def test_one_clip_over_two_models_logs_only_the_watched_models_norms(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """clip_grad_norm_ over a watched and an unwatched model together: the watched one's
    grad_norm and layer norms are of its own gradients (pre-clip), not of both models'."""
    probe.init(endpoint, run_id="clip-two")
    model, other = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe.watch(model, opt, layer_every=1)
    expected = []
    for step in range(3):
        x, y = batch(step)
        opt.zero_grad()
        other.zero_grad()
        (nn.functional.mse_loss(model(x), y) + nn.functional.mse_loss(other(x), y)).backward()
        layers = {name: norm([p.grad]) for name, p in model.named_parameters()}
        mine = norm([p.grad for p in model.parameters()])
        both = norm([p.grad for p in [*model.parameters(), *other.parameters()]])
        assert both > mine * 1.01, "the other model must add to the joint norm"
        returned = torch.nn.utils.clip_grad_norm_([*model.parameters(), *other.parameters()], 0.01)
        assert close(float(returned), both)
        expected.append((mine, layers))
        opt.step()
    steps = by_step(stored_run(agent, runs_dir, "clip-two")[0])
    for step, (mine, layers) in enumerate(expected):
        assert close(steps[step]["grad_norm"], mine), step
        assert {k for k in steps[step] if k.startswith("grad_norm/layer/")} == {
            f"grad_norm/layer/{name}" for name in layers
        }
        for name, value in layers.items():
            assert close(steps[step][f"grad_norm/layer/{name}"], value), (step, name)


def test_watched_clip_grad_norm_clips_exactly_as_torch_does(agent: Any, endpoint: str) -> None:
    """The norm-reusing clip returns torch's total norm and leaves torch's gradients."""
    probe.init(endpoint, run_id="clip-exact")
    model, twin = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe.watch(model, opt, layer_every=1)
    assert torch.nn.utils.clip_grad_norm_ is not ORIGINAL_CLIP
    for net in (model, twin):
        x, y = batch(0)
        nn.functional.mse_loss(net(x), y).backward()
    ours = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    theirs = ORIGINAL_CLIP(twin.parameters(), 0.05)
    assert torch.equal(ours, theirs)
    for mine, reference in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(mine.grad, reference.grad)


def test_param_groups_lr_schedule_layer_norms_and_update_ratios(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Per-group grad norm, lr and update ratio, and per-parameter norms, match plain PyTorch."""
    probe.init(endpoint, run_id="groups")
    model = mlp()
    groups = [list(model[0].parameters()), list(model[2].parameters())]
    opt = torch.optim.SGD(
        [{"params": groups[0], "lr": 0.1}, {"params": groups[1], "lr": 0.02}], momentum=0.9
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    probe.watch(model, opt, layer_every=1)
    expected = []
    for step in range(4):
        backward(model, opt, step)
        before = [[p.detach().clone() for p in group] for group in groups]
        want: dict[str, float] = {
            "grad_norm": norm([p.grad for p in model.parameters()]),
            "param_norm": norm(list(model.parameters())),
            "lr": opt.param_groups[0]["lr"],
        }
        for index, group in enumerate(groups):
            want[f"grad_norm/group{index}"] = norm([p.grad for p in group])
            want[f"lr/group{index}"] = opt.param_groups[index]["lr"]
        for name, p in model.named_parameters():
            want[f"grad_norm/layer/{name}"] = norm([p.grad])
            want[f"param_norm/layer/{name}"] = norm([p])
        opt.step()
        schedule.step()
        for index, group in enumerate(groups):
            moved = norm([p - b for p, b in zip(group, before[index], strict=True)])
            want[f"update_ratio/group{index}"] = moved / norm(before[index])
        expected.append(want)
    assert expected[0]["lr/group1"] != expected[3]["lr/group1"], "the schedule must change lr"
    steps = by_step(stored_run(agent, runs_dir, "groups")[0])
    for step, want in enumerate(expected):
        got = steps[step]
        assert set(want) <= set(got), set(want) - set(got)
        for name, value in want.items():
            assert close(got[name], value), (step, name, got[name], value)


class SlowLoader:
    """A data loader whose every batch takes ``delay`` seconds to arrive."""

    def __init__(self, batches: int, delay: float) -> None:
        self.batches = batches
        self.delay = delay

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step in range(self.batches):
            time.sleep(self.delay)
            yield batch(step, size=4)


def test_step_time_throughput_and_data_wait(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """Step time and throughput from the 2nd step on; data wait covers the loader's delay."""
    delay, compute = 0.03, 0.02
    probe.init(endpoint, run_id="timing")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = probe.watch(model, opt, batch_size=4, tokens_per_step=4 * 128)
    for x, y in watcher.data(SlowLoader(5, delay)):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        time.sleep(compute)
        opt.step()
    steps = by_step(stored_run(agent, runs_dir, "timing")[0])
    assert sorted(steps) == [0, 1, 2, 3, 4]
    timing = {"step_time_seconds", "steps_per_second", "samples_per_second", "tokens_per_second"}
    assert not timing & set(steps[0]), "the first step has no previous step to time from"
    for step in range(5):
        got = steps[step]
        assert got["data_wait_seconds"] >= delay
        if step == 0:
            continue
        assert timing <= set(got)
        step_time = got["step_time_seconds"]
        # The step interval holds this step's batch wait and its compute.
        assert step_time >= got["data_wait_seconds"] + compute - 1e-4
        assert close(got["steps_per_second"], 1 / step_time)
        assert close(got["samples_per_second"], 4 / step_time)
        assert close(got["tokens_per_second"], 512 / step_time)


def test_activation_stats_match_a_forward_hook(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """act/<module>/mean|std|zero_fraction equal the same statistics from the test's own hook."""
    probe.init(endpoint, run_id="activations")
    model = mlp(width=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen: dict[str, torch.Tensor] = {}
    for name, module in model.named_children():
        module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
    probe.watch(model, opt, activations_every=1)
    expected = []
    for step in range(3):
        backward(model, opt, step)
        want = {}
        for name, out in seen.items():
            want[f"act/{name}/mean"] = float(out.mean())
            want[f"act/{name}/std"] = float(out.std())
            want[f"act/{name}/zero_fraction"] = float((out == 0).double().mean())
        expected.append(want)
        opt.step()
    assert 0.1 < expected[0]["act/1/zero_fraction"] < 0.9, "ReLU should zero some, not all"
    steps = by_step(stored_run(agent, runs_dir, "activations")[0])
    for step, want in enumerate(expected):
        got = {k: v for k, v in steps[step].items() if k.startswith("act/")}
        assert set(got) == set(want)
        for name, value in want.items():
            assert close(got[name], value), (step, name)


class Outputs(nn.Module):
    """Leaf modules whose outputs are the test's tensors, beside a trainable linear layer."""

    def __init__(self, outputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 1)
        self.leaves = nn.ModuleDict({name: Emit(value) for name, value in outputs.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for leaf in self.leaves.values():
            leaf(x)
        return self.linear(x)


class Emit(nn.Module):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


def test_activation_stats_stay_exact_where_a_sum_of_squares_would_not(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """A saturated sigmoid (std 2e-4 under a mean of 1), a large offset, a constant, half
    precision, outputs far larger than the sample and negative zeros: each within 1e-4 of
    float64."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(16, 128, 512, generator=generator)
    outputs = {
        "saturated": torch.sigmoid(8 + 0.5 * noise),
        "offset": 100 + 0.01 * noise,
        "constant": torch.full((300, 100), 5.0),
        "bf16": (1 + noise[:4]).bfloat16(),
        "relu": torch.relu(noise[:2]),
        "one": torch.tensor([3.0]),
        "signed_zeros": torch.tensor([0.0, -0.0, 1.5, -2.0, -0.0]),
    }
    probe.init(endpoint, run_id="activation-precision")
    model = Outputs(outputs)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe.watch(model, opt, activations_every=1)
    steps = 8  # each step's samples start at random: the centring differs from step to step
    for step in range(steps):
        backward(model, opt, step)
        opt.step()
    stored = by_step(stored_run(agent, runs_dir, "activation-precision")[0])
    assert sorted(stored) == list(range(steps))
    for step, got in stored.items():
        for name, value in outputs.items():
            exact = value.double()
            std = float(exact.std()) if exact.numel() > 1 else 0.0
            where = f"{name} at step {step}"
            assert close(got[f"act/leaves.{name}/mean"], float(exact.mean()), rel=1e-6), where
            assert close(got[f"act/leaves.{name}/std"], std, rel=1e-4), where
            zeros = float((exact == 0).double().mean())
            assert got[f"act/leaves.{name}/zero_fraction"] == pytest.approx(zeros, abs=1e-7), where
        assert 0.4 < got["act/leaves.relu/zero_fraction"] < 0.6


def test_sampling_leaves_the_trainers_random_numbers_alone(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Histograms and activation samples every step, with dropout in the model: the same
    weights, bit for bit, as the same training unwatched."""

    def train(watched: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 4096), nn.Dropout(0.5), nn.Linear(4096, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        if watched:
            probe.watch(model, opt, hist_every=1, activations_every=1)
        for step in range(3):
            backward(model, opt, step)
            opt.step()
        if watched:
            probe.unwatch()
        return [p.detach().clone() for p in model.parameters()]

    probe.init(endpoint, run_id="rng")
    watched = train(True)
    plain = train(False)
    assert all(torch.equal(a, b) for a, b in zip(watched, plain, strict=True))
    stored = stored_run(agent, runs_dir, "rng")[0]
    sampled = [h for (step, name), h in histograms(stored).items() if name == "weights/0.weight"]
    assert len(sampled) == 3 and all(h["count"] == 8192 for h in sampled)  # 32,768 sampled


def test_histogram_samples_visit_every_column() -> None:
    """A sample of a (rows, columns) tensor is spread over every column, whatever the
    shape's powers of two, and is a view: nothing is computed, nothing waits."""
    from probe import values

    for rows, columns in [(64, 512), (1024, 768), (3, 100_000), (10_000, 1)]:
        tensor = torch.arange(columns).repeat(rows, 1)
        sample = values.sample_tensor(tensor, values.HISTOGRAM_SAMPLE)
        assert sample.numel() == values.HISTOGRAM_SAMPLE
        assert sample.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
        seen = torch.bincount(sample, minlength=columns)
        if columns <= values.HISTOGRAM_SAMPLE:
            assert int((seen == 0).sum()) == 0, (rows, columns)
            assert int(seen.max()) - int(seen.min()) <= 1, (rows, columns)  # evenly
        else:
            assert int((seen > 1).sum()) == 0, (rows, columns)  # no column twice


def test_histograms_of_weights_and_gradients(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """weights/, grads/ and activations/ histograms hold every element of small tensors."""
    probe.init(endpoint, run_id="hist")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.watch(model, opt, hist_every=2)
    expected: dict[tuple[int, str], torch.Tensor] = {}
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        first = model[0](x)  # the model's forward, one leaf at a time: outputs at hand
        hidden = model[1](first)
        out = model[2](hidden)
        nn.functional.mse_loss(out, y).backward()
        if step == 0:  # an activation step (activations_every=100): leaf outputs too
            expected[(0, "activations/0")] = first.detach()
            expected[(0, "activations/1")] = hidden.detach()
            expected[(0, "activations/2")] = out.detach()
        if step % 2 == 0:
            for name, p in model.named_parameters():
                expected[(step, f"weights/{name}")] = p.detach().clone()
                expected[(step, f"grads/{name}")] = p.grad.clone()
        opt.step()
    found = histograms(stored_run(agent, runs_dir, "hist")[0])
    assert set(found) == set(expected)
    for key, tensor in expected.items():
        line = found[key]
        assert line["count"] == tensor.numel() == sum(line["counts"]), key
        assert line["min"] == pytest.approx(float(tensor.min()))  # the weights before the step
        assert line["max"] == pytest.approx(float(tensor.max()))
        assert line["sum"] == pytest.approx(float(tensor.double().sum()), rel=1e-4, abs=1e-5)


def test_nonfinite_gradient_sets_grad_nonfinite(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """An inf or NaN gradient makes grad_nonfinite 1 on that step and 0 on finite steps."""
    probe.init(endpoint, run_id="nonfinite-grad")
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.watch(model, opt, layer_every=1)
    poison = {1: ("weight", math.inf), 2: ("bias", math.nan)}
    for step in range(4):
        x, y = batch(step, features=4)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        saved = [p.detach().clone() for p in model.parameters()]
        if step in poison:
            name, value = poison[step]
            getattr(model, name).grad.view(-1)[0] = value
        opt.step()
        if step in poison:
            with torch.no_grad():  # keep the weights finite for the next step
                for p, s in zip(model.parameters(), saved, strict=True):
                    p.copy_(s)
    steps = by_step(stored_run(agent, runs_dir, "nonfinite-grad")[0])
    assert [steps[s]["grad_nonfinite"] for s in range(4)] == [0, 1, 1, 0]
    assert steps[1]["grad_norm"] == "Infinity"
    assert steps[1]["grad_norm/layer/weight"] == "Infinity"
    assert isinstance(steps[1]["grad_norm/layer/bias"], float)
    assert steps[2]["grad_norm"] == "NaN"
    assert isinstance(steps[3]["grad_norm"], float)


def test_nonfinite_loss_sets_loss_nonfinite(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """probe.log of a NaN loss tensor stores loss_nonfinite 1 (and the NaN batch's grads flag 1)."""
    probe.init(endpoint, run_id="nonfinite-loss")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe.watch(model, opt)
    for step in range(3):
        x, y = batch(step)
        if step == 1:
            x[0, 0] = math.nan
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        probe.log({"loss": loss}, step=step)
        saved = [p.detach().clone() for p in model.parameters()]
        opt.step()
        with torch.no_grad():  # keep the weights finite for the next step
            for p, s in zip(model.parameters(), saved, strict=True):
                p.copy_(s)
    steps = by_step(stored_run(agent, runs_dir, "nonfinite-loss")[0])
    assert [steps[s]["loss_nonfinite"] for s in range(3)] == [0, 1, 0]
    assert steps[1]["loss"] == "NaN"
    assert [steps[s]["grad_nonfinite"] for s in range(3)] == [0, 1, 0]


# -- frequencies and hooks -------------------------------------------------------------------


def test_each_kind_arrives_on_exactly_its_steps(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """log_every=2, layer_every=3, hist_every=4, activations_every=5: each kind on its steps."""
    probe.init(endpoint, run_id="every")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe.watch(model, opt, log_every=2, layer_every=3, hist_every=4, activations_every=5)
    for step in range(12):
        backward(model, opt, step)
        opt.step()
    stored = stored_run(agent, runs_dir, "every")[0]
    steps = by_step(stored)
    log, layer = {0, 2, 4, 6, 8, 10}, {0, 3, 6, 9}
    assert steps_with(steps, "lr") == log
    assert steps_with(steps, "step_time_seconds") == set(range(1, 12))  # every step, from the 2nd
    assert steps_with(steps, "grad_norm") == log | layer  # a layer step carries the total too
    for prefix in ("grad_norm/layer/", "param_norm", "update_ratio/"):
        assert steps_with(steps, prefix) == layer, prefix
    assert steps_with(steps, "act/") == {0, 5, 10}
    found = histograms(stored)
    assert {step for step, name in found if not name.startswith("activations/")} == {0, 4, 8}
    assert {step for step, name in found if name.startswith("activations/")} == {0, 5, 10}
    for step in set(range(12)) - log - layer - {5}:  # nothing due: step timing only
        assert set(steps[step]) == TIMING | SECTIONS, step


@pytest.mark.parametrize("log_every", [0, 1])
def test_zero_switches_a_kind_off(
    agent: Any, endpoint: str, runs_dir: Path, log_every: int
) -> None:
    """0 for a kind means none of it, ever (step timing is not a kind), and no forward hooks
    but the section timer's."""
    probe.init(endpoint, run_id="off")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe.watch(model, opt, log_every=log_every, layer_every=0, hist_every=0, activations_every=0)
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        assert forward_hook_count(model) == SECTION_HOOKS
        opt.step()
        probe.log({"loss": loss}, step=step)
    stored = stored_run(agent, runs_dir, "off")[0]
    assert not histograms(stored)
    steps = by_step(stored)
    assert sorted(steps) == [0, 1, 2, 3]
    for step, metrics in steps.items():
        watched = set(metrics) - {"loss", "loss_nonfinite"}
        if log_every == 0:
            assert watched == (TIMING | SECTIONS if step else SECTIONS), step
        else:
            assert watched >= WATCH_BASE, step
            assert not {k for k in watched if "/layer/" in k or k.startswith(("act/", "update_"))}


def test_activation_hooks_only_on_activation_steps_and_eval_is_ignored(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Forward hooks exist only for an activation step; no_grad evaluation forwards never count."""
    probe.init(endpoint, run_id="hooks")
    torch.manual_seed(0)
    model = nn.ModuleDict({"body": mlp(), "eval_head": nn.Linear(1, 1)})
    opt = torch.optim.SGD(model.body.parameters(), lr=0.01)
    leaves = 4  # body.0, body.1, body.2, eval_head
    probe.watch(model, opt, activations_every=3)
    hooks_before_step = []
    expected = {}
    for step in range(7):
        hooks_before_step.append(forward_hook_count(model))
        x, y = batch(step)
        opt.zero_grad()
        h = model.body[0](x)
        r = model.body[1](h)
        out = model.body[2](r)
        nn.functional.mse_loss(out, y).backward()
        expected[step] = {"body.0": h.detach(), "body.1": r.detach(), "body.2": out.detach()}
        with torch.no_grad():  # an evaluation between backward and step: very different inputs
            model.eval_head(model.body(x * 100 - 50))
        opt.step()
        with torch.no_grad():  # and one between steps, while the next step's hooks are on
            model.eval_head(model.body(-x))
        with torch.inference_mode():
            model.eval_head(model.body(x + 7))
    assert [n - SECTION_HOOKS for n in hooks_before_step] == [leaves, 0, 0, leaves, 0, 0, leaves]
    steps = by_step(stored_run(agent, runs_dir, "hooks")[0])
    assert steps_with(steps, "act/") == {0, 3, 6}
    for step in (0, 3, 6):
        got = {k: v for k, v in steps[step].items() if k.startswith("act/")}
        assert {k.split("/")[1] for k in got} == {"body.0", "body.1", "body.2"}
        for module, out in expected[step].items():
            assert close(got[f"act/{module}/mean"], float(out.mean())), (step, module)
            assert close(got[f"act/{module}/std"], float(out.std())), (step, module)


@pytest.mark.parametrize("how", ["watcher", "module"])
def test_unwatch_removes_every_hook_and_the_clip_patch(
    agent: Any, endpoint: str, runs_dir: Path, how: str
) -> None:
    """After unwatch: no optimizer or forward hooks, the original clip_grad_norm_, no records."""
    probe.init(endpoint, run_id="unwatch")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = probe.watch(model, opt, layer_every=1, hist_every=1, activations_every=1)
    assert optimizer_hook_count(opt) == 2
    assert torch.nn.utils.clip_grad_norm_ is not ORIGINAL_CLIP
    for step in range(6):
        if step == 2:
            assert forward_hook_count(model) == 3 + SECTION_HOOKS
            watcher.unwatch() if how == "watcher" else probe.unwatch()
            assert optimizer_hook_count(opt) == 0
            assert forward_hook_count(model) == 0
            assert sum(len(module._forward_pre_hooks) for module in model.modules()) == 0
            assert torch.nn.utils.clip_grad_norm_ is ORIGINAL_CLIP
            assert torch.nn.utils.clip_grad.clip_grad_norm_ is ORIGINAL_CLIP
        x, y = batch(step)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        probe.log({"loss": loss}, step=step)
    stored = stored_run(agent, runs_dir, "unwatch")[0]
    steps = by_step(stored)
    assert set(steps[1]) >= WATCH_BASE
    for step in range(2, 6):
        assert set(steps[step]) == {"loss", "loss_nonfinite"}, step
    assert {step for step, _ in histograms(stored)} == {0, 1}


def test_clip_patch_stays_until_the_last_watcher_goes(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Two watchers: a clip of one model's grads is not the other's; the patch outlives one."""
    probe.init(endpoint, run_id="two")
    models = [mlp(seed=1), mlp(seed=2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    watchers = [probe.watch(models[0], opts[0]), probe.watch(models[1], opts[1], start_step=100)]
    expected = {}
    for step in range(3):
        if step == 1:
            watchers[0].unwatch()
            assert torch.nn.utils.clip_grad_norm_ is not ORIGINAL_CLIP
        for index, (model, opt) in enumerate(zip(models, opts, strict=True)):
            backward(model, opt, step)
            expected[(index, step)] = norm([p.grad for p in model.parameters()])
            if index == 0 or step > 0:  # at step 0 only the first model clips
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
                assert close(float(total), expected[(index, step)])
            opt.step()
    watchers[1].unwatch()
    assert torch.nn.utils.clip_grad_norm_ is ORIGINAL_CLIP
    steps = by_step(stored_run(agent, runs_dir, "two")[0])
    assert sorted(steps) == [0, 100, 101, 102]
    assert close(steps[0]["grad_norm"], expected[(0, 0)])
    for step in range(3):
        assert close(steps[100 + step]["grad_norm"], expected[(1, step)])


def test_gradient_accumulation_records_once_per_optimizer_step(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """4 micro-batches per optimizer step: one record per step, the norm of the summed grads."""
    probe.init(endpoint, run_id="accumulate")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe.watch(model, opt, layer_every=1, activations_every=1)
    expected = []
    for step in range(3):
        opt.zero_grad()
        for micro in range(4):
            x, y = batch(10 * step + micro)
            (nn.functional.mse_loss(model(x), y) / 4).backward()
        expected.append(norm([p.grad for p in model.parameters()]))
        opt.step()
    stored = stored_run(agent, runs_dir, "accumulate")[0]
    with_norm = [line for line in stored if "grad_norm" in line.get("metrics", {})]
    assert [line["step"] for line in with_norm] == [0, 1, 2]
    for step, line in enumerate(with_norm):
        assert close(line["metrics"]["grad_norm"], expected[step])


@pytest.mark.parametrize("passed_as", ["positional", "keyword"])
def test_a_closure_step_logs_the_gradients_its_closure_computed(
    agent: Any, endpoint: str, runs_dir: Path, passed_as: str
) -> None:
    """optimizer.step(closure) (Lightning, LBFGS) runs the backward inside the step: the
    norms, the update ratio and the section times are of that backward, a clip inside the
    closure undone."""
    probe.init(endpoint, run_id="closure")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe.watch(model, opt, layer_every=1)
    expected = []
    for step in range(3):

        def closure(step: int = step) -> torch.Tensor:
            x, y = batch(step)
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            expected.append(norm([p.grad for p in model.parameters()]))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            return loss

        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure) if passed_as == "positional" else opt.step(closure=closure)
        moved = norm([p.detach() - b for p, b in zip(model.parameters(), before, strict=True)])
        assert moved == pytest.approx(0.05 * 0.01, rel=1e-3), "the closure's clip applies"
    steps = by_step(stored_run(agent, runs_dir, "closure")[0])
    assert sorted(steps) == [0, 1, 2]
    for step, metrics in steps.items():
        assert close(metrics["grad_norm"], expected[step]), step
        assert metrics["update_ratio/group0"] > 0
        assert metrics.keys() >= SECTIONS, step


def _cpu_grad_scaler() -> Any:
    try:
        return torch.amp.GradScaler("cpu")
    except (AttributeError, TypeError, RuntimeError) as exc:
        pytest.skip(
            f"torch.amp.GradScaler('cpu') is not available in torch {torch.__version__}: {exc}"
        )


def test_amp_grad_scaler_norms_are_of_unscaled_grads(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Under bf16 autocast and a GradScaler, norms are of the unscaled (pre-clip) gradients."""
    scaler = _cpu_grad_scaler()
    probe.init(endpoint, run_id="amp")
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe.watch(model, opt, layer_every=1)
    expected = []
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scale = float(scaler.get_scale())
        assert scale > 1, "the grads must really be scaled"
        layers = {name: norm([p.grad]) / scale for name, p in model.named_parameters()}
        total = norm([p.grad for p in model.parameters()]) / scale
        if step % 2:  # the documented recipe for clipping under a scaler
            scaler.unscale_(opt)
            returned = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01))
            assert close(returned, total)
        expected.append((total, layers))
        scaler.step(opt)
        scaler.update()
    steps = by_step(stored_run(agent, runs_dir, "amp")[0])
    assert sorted(steps) == [0, 1, 2, 3]
    for step, (total, layers) in enumerate(expected):
        assert close(steps[step]["grad_norm"], total, rel=1e-4), step
        for name, value in layers.items():
            assert close(steps[step][f"grad_norm/layer/{name}"], value, rel=1e-4), (step, name)


class PartlyTrained(nn.Module):
    """A frozen input layer, a trained trunk and head, and a branch forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(8, 8)
        self.trunk = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.trunk(self.frozen(x))))


def test_frozen_and_unused_parameters(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """Parameters without a gradient are left out of grad norms but kept in param norms."""
    probe.init(endpoint, run_id="frozen")
    model = PartlyTrained()
    idle = [*model.frozen.parameters(), *model.unused.parameters()]
    trained = [*model.trunk.parameters(), *model.head.parameters()]
    opt = torch.optim.SGD([{"params": idle}, {"params": trained}], lr=0.05)
    probe.watch(model, opt, layer_every=1, hist_every=1, activations_every=1)
    expected = []
    for step in range(3):
        backward(model, opt, step)
        assert all(p.grad is None for p in idle)
        expected.append((norm([p.grad for p in trained]), norm(list(model.parameters()))))
        opt.step()
    stored = stored_run(agent, runs_dir, "frozen")[0]
    steps = by_step(stored)
    names = [name for name, _ in model.named_parameters()]
    with_grad = [n for n in names if n.startswith(("trunk", "head"))]
    for step, (grad_total, param_total) in enumerate(expected):
        got = steps[step]
        assert close(got["grad_norm"], grad_total)
        assert got["grad_norm/group0"] == 0.0
        assert close(got["grad_norm/group1"], grad_total)
        assert layer_names(got, "grad_norm/layer/") == set(with_grad)
        assert layer_names(got, "param_norm/layer/") == set(names)
        assert close(got["param_norm"], param_total)
        assert got["update_ratio/group0"] == 0.0
        assert got["update_ratio/group1"] > 0
        assert "act/unused/mean" not in got
    found = histograms(stored)
    assert "grads/frozen.weight" not in {name for _, name in found}
    assert (0, "weights/frozen.weight") in found


class SparseBag(nn.Module):
    """An embedding with sparse gradients feeding a dense head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8, sparse=True)
        self.head = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


def test_sparse_gradients_are_skipped_without_an_error(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """A sparse-gradient embedding is left out of grad norms and grad histograms, no error."""
    probe.init(endpoint, run_id="sparse")
    model = SparseBag()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probe.watch(model, opt, layer_every=1, hist_every=1, activations_every=1)
    expected = []
    for step in range(3):
        ids = torch.randint(50, (4, 6), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(ids).sum().backward()
        assert model.embed.weight.grad is not None and model.embed.weight.grad.is_sparse
        expected.append(norm([p.grad for p in model.head.parameters()]))
        opt.step()
    stored = stored_run(agent, runs_dir, "sparse")[0]
    steps = by_step(stored)
    for step, total in enumerate(expected):
        got = steps[step]
        assert close(got["grad_norm"], total)
        assert layer_names(got, "grad_norm/layer/") == {"head.weight", "head.bias"}
        assert "param_norm/layer/embed.weight" in got
    names = {name for _, name in histograms(stored)}
    assert "weights/embed.weight" in names and "grads/embed.weight" not in names
    assert "grads/head.weight" in names


def test_many_parameter_tensors_are_split_across_records(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """1,200 parameter tensors: per-layer metrics split under the agent's limit, none rejected."""
    probe.init(endpoint, run_id="many")
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(600))

    def forward(x: torch.Tensor) -> torch.Tensor:
        for layer in layers:
            x = x + 0.1 * layer(x)
        return x

    opt = torch.optim.SGD(layers.parameters(), lr=0.01)
    probe.watch(layers, opt, layer_every=1, activations_every=2)
    expected = []
    for step in range(3):
        x, y = batch(step, features=4)
        opt.zero_grad()
        nn.functional.mse_loss(forward(x), y.expand(-1, 4)).backward()
        expected.append({name: norm([p.grad]) for name, p in layers.named_parameters()})
        opt.step()
    stored, info = stored_run(agent, runs_dir, "many")
    assert info["agent"]["rejected_records"] == {}
    assert info["agent"]["rejected_messages"] == {}
    records = [line for line in stored if line["kind"] == "scalars"]
    assert max(len(line["metrics"]) for line in records) <= 1024
    steps = by_step(stored)
    names = [name for name, _ in layers.named_parameters()]
    assert len(names) == 1200
    for step, want in enumerate(expected):
        got = steps[step]
        assert sum(1 for line in records if line["step"] == step) >= 3
        assert {f"param_norm/layer/{n}" for n in names} <= set(got)
        acts = {k for k in got if k.startswith("act/")}
        assert len(acts) == (3 * 600 if step % 2 == 0 else 0)
        for name, value in want.items():
            assert close(got[f"grad_norm/layer/{name}"], value), (step, name)


@pytest.mark.parametrize("how", ["OUTRIDER_DISABLED", "no-endpoint", "enabled=False"])
def test_watch_with_telemetry_off_is_inert(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """With telemetry off, watch hooks nothing and returns an object whose data()/unwatch() work."""
    monkeypatch.setenv("OUTRIDER_ENDPOINT", endpoint)
    if how == "OUTRIDER_DISABLED":
        monkeypatch.setenv("OUTRIDER_DISABLED", "1")
    elif how == "no-endpoint":
        monkeypatch.delenv("OUTRIDER_ENDPOINT")
    else:
        assert not probe.init(endpoint, enabled=False)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    watcher = probe.watch(model, opt, layer_every=1, hist_every=1, activations_every=1)
    assert not probe.is_enabled()
    assert optimizer_hook_count(opt) == 0
    assert forward_hook_count(model) == 0
    assert torch.nn.utils.clip_grad_norm_ is ORIGINAL_CLIP
    data = [batch(step) for step in range(3)]
    seen = list(watcher.data(data))
    assert len(seen) == 3 and all(a is b for a, b in zip(seen, data, strict=True))
    for x, y in watcher.data(data):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    watcher.unwatch()
    probe.unwatch()
    assert probe.stats() == {}


def test_probe_watch_stays_the_function_once_its_module_is_loaded() -> None:
    """Loading the hooks' module (as watch() itself does) never replaces probe.watch()."""
    importlib.import_module("probe.watcher")
    assert callable(probe.watch) and probe.watch.__name__ == "watch"


# -- the CUDA path ---------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_values_arrive_without_a_sync_on_the_training_thread(
    agent: Any, endpoint: str, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA, watch's hooks never sync the training thread, and the values still arrive."""
    probe.init(endpoint, run_id="cuda")
    model = mlp(width=64).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe.watch(model, opt, layer_every=1, hist_every=1, activations_every=1)
    main = threading.get_ident()
    forbidden = threading.Event()  # set while a training-thread sync would be a bug

    def guard(name: str, original: Any, tensors_only: bool) -> Any:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            on_gpu = not tensors_only or (args and getattr(args[0], "is_cuda", False))
            if forbidden.is_set() and threading.get_ident() == main and on_gpu:
                raise AssertionError(f"{name} on the training thread during a watched step")
            return original(*args, **kwargs)

        return guarded

    for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(
            torch.Tensor, name, guard(f"Tensor.{name}", getattr(torch.Tensor, name), True)
        )
    monkeypatch.setattr(
        torch.cuda, "synchronize", guard("cuda.synchronize", torch.cuda.synchronize, False)
    )
    for cls in (torch.cuda.Event, torch.cuda.Stream):
        monkeypatch.setattr(
            cls, "synchronize", guard(f"{cls.__name__}.synchronize", cls.synchronize, False)
        )
    previous_mode = torch.cuda.get_sync_debug_mode()
    expected = []
    try:
        for step in range(3):
            x, y = (t.cuda() for t in batch(step))
            opt.zero_grad()
            forbidden.set()
            torch.cuda.set_sync_debug_mode("error")
            nn.functional.mse_loss(model(x), y).backward()
            torch.cuda.set_sync_debug_mode(previous_mode)
            forbidden.clear()
            expected.append(norm([p.grad for p in model.parameters()]))  # the test may sync
            forbidden.set()
            torch.cuda.set_sync_debug_mode("error")
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
            torch.cuda.set_sync_debug_mode(previous_mode)
            forbidden.clear()
    finally:
        torch.cuda.set_sync_debug_mode(previous_mode)
        forbidden.clear()
    stored = stored_run(agent, runs_dir, "cuda")[0]
    steps = by_step(stored)
    for step, total in enumerate(expected):
        got = steps[step]
        assert close(got["grad_norm"], total, rel=1e-4), step
        allocated = got["cuda_memory_allocated_bytes"]
        assert 0 < allocated <= got["cuda_memory_peak_bytes"] <= torch.cuda.max_memory_allocated()
        assert allocated <= got["cuda_memory_reserved_bytes"] <= torch.cuda.max_memory_reserved()
        assert {"act/0/mean", "act/1/zero_fraction", "param_norm/layer/0.weight"} <= set(got)
    assert (2, "grads/2.weight") in histograms(stored)
