"""probe.watch with no optimizer, a wrapped one, or something it cannot watch.

The trainer is PyTorch's word-language-model example in small: an LSTM language
model, a hand-written SGD update and ``clip_grad_norm_``. Real agent process;
expected numbers computed in the test with plain torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import probe
from probe import internal
from tests.probe.test_no_host_sync import recording_host_reads
from tests.probe.test_watch import (
    ORIGINAL_CLIP,
    by_step,
    close,
    forward_hook_count,
    histograms,
    norm,
    optimizer_hook_count,
    stored_run,
)

VOCAB, EMBED, HIDDEN, BPTT, BATCH = 30, 8, 12, 5, 4


class WordLanguageModel(nn.Module):
    """Embedding, LSTM, decoder: the example's RNNModel('LSTM') in small."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Embedding(VOCAB, EMBED)
        self.rnn = nn.LSTM(EMBED, HIDDEN)
        self.decoder = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor, hidden: Any) -> tuple[torch.Tensor, Any]:
        output, hidden = self.rnn(self.encoder(ids), hidden)
        return self.decoder(output).view(-1, VOCAB), hidden

    def init_hidden(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, BATCH, HIDDEN), torch.zeros(1, BATCH, HIDDEN)


def corpus_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(VOCAB, (BPTT + 1, BATCH), generator=generator)
    return ids[:-1], ids[1:].reshape(-1)


def manual_step(model: WordLanguageModel, hidden: Any, step: int) -> Any:
    """The first half of an iteration of the example's train(): forward and backward."""
    data, targets = corpus_batch(step)
    hidden = tuple(h.detach() for h in hidden)  # repackage_hidden
    model.zero_grad()
    output, hidden = model(data, hidden)
    nn.functional.cross_entropy(output, targets).backward()
    return hidden


def update(model: nn.Module, lr: float, clip: float) -> None:
    """The second half: clip_grad_norm_ and the hand-written SGD update."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    for p in model.parameters():
        p.data.add_(p.grad, alpha=-lr)


def test_word_language_model_without_an_optimizer(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Manual SGD: pre-clip grad norms, weight norms, update ratios and step times are
    recorded for each step at its own number; an evaluation forward closes no step."""
    probe.init(endpoint, run_id="wlm")
    model = WordLanguageModel()
    model.train()
    watcher = probe.watch(model, layer_every=2, hist_every=3, activations_every=0)
    hidden = model.init_hidden()
    lr, clip, steps = 5.0, 0.25, 5
    expected = []
    for step in range(steps):
        hidden = manual_step(model, hidden, step)
        names = [name for name, _ in model.named_parameters()]
        want = {
            "grad_norm": norm([p.grad for p in model.parameters()]),
            **{f"grad_norm/layer/{n}": norm([p.grad]) for n, p in model.named_parameters()},
            "param_norm": norm(list(model.parameters())),
            **{f"param_norm/layer/{n}": norm([p]) for n, p in model.named_parameters()},
        }
        before = [p.detach().clone() for p in model.parameters()]
        update(model, lr, clip)
        assert norm([p.grad for p in model.parameters()]) < want["grad_norm"], "must clip"
        moved = norm([p - b for p, b in zip(model.parameters(), before, strict=True)])
        want["update_ratio/group0"] = moved / norm(before)
        expected.append(want)
        if step == 1:
            with torch.no_grad():
                model.eval()
                model(*corpus_batch(99)[:1], model.init_hidden())
                model.train()
    assert watcher.step == steps - 1, "the last step is still open until the next forward"
    stored = stored_run(agent, runs_dir, "wlm")[0]  # finish() closes it
    got = by_step(stored)
    assert sorted(got) == list(range(steps))
    for step, want in enumerate(expected):
        metrics = got[step]
        assert "lr" not in metrics
        assert metrics["grad_nonfinite"] == 0
        assert close(metrics["grad_norm"], want["grad_norm"]), step
        layers = step % 2 == 0
        for name, value in want.items():
            if name != "grad_norm":
                assert (name in metrics) == layers, (step, name)
                if layers:
                    assert close(metrics[name], value), (step, name, metrics[name], value)
        timed = 0 < step < steps - 1  # from the 2nd step; the one closed by finish() has none
        assert ("step_time_seconds" in metrics) == timed, step
        assert metrics["forward_seconds"] > 0 and metrics["backward_seconds"] > 0
    assert {step for step, _ in histograms(stored)} == {0, 3}
    assert (0, f"grads/{names[0]}") in histograms(stored)
    assert torch.nn.utils.clip_grad_norm_ is ORIGINAL_CLIP


def test_without_an_optimizer_the_training_thread_reads_nothing(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """The parameters' hooks and the step end read no tensor value on the training thread."""
    probe.init(endpoint, run_id="wlm-no-read")
    model = WordLanguageModel()
    probe.watch(model, layer_every=1, hist_every=1, activations_every=1)
    hidden = model.init_hidden()
    seen, expected = [], []
    for step in range(3):
        with recording_host_reads() as reads:
            hidden = manual_step(model, hidden, step)
        seen += reads.seen
        expected.append(norm([p.grad for p in model.parameters()]))  # the test may read
        with recording_host_reads() as reads:
            update(model, 1.0, 0.25)
        seen += reads.seen
    with recording_host_reads() as reads:
        probe.unwatch()
    seen += reads.seen
    assert seen == []
    got = by_step(stored_run(agent, runs_dir, "wlm-no-read")[0])
    assert [got[step]["grad_norm"] for step in range(3)] == pytest.approx(expected, rel=1e-5)
    assert "act/decoder/mean" in got[0]


class AcceleratedLike(torch.optim.Optimizer):
    """accelerate's shape: an Optimizer subclass that never runs Optimizer.__init__."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self) -> Any:  # type: ignore[override]  # forwarded, as accelerate does
        return self.optimizer.param_groups

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]  # forwarded
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)


class LightningLike:
    """Lightning's shape: the optimizer kept under ``_optimizer``."""

    def __init__(self, optimizer: Any) -> None:
        self._optimizer = optimizer

    def step(self, closure: Any = None) -> Any:
        return self._optimizer.step(closure)

    def zero_grad(self) -> None:
        self._optimizer.zero_grad()


WRAPPERS = {
    "plain": lambda opt: opt,
    "accelerate": AcceleratedLike,
    "lightning": LightningLike,
    "lightning-over-accelerate": lambda opt: LightningLike(AcceleratedLike(opt)),
}


def _trained_with(wrap: str, agent: Any, endpoint: str, runs_dir: Path) -> dict[int, dict]:
    probe.init(endpoint, run_id=wrap)
    model = WordLanguageModel()
    inner = torch.optim.SGD(model.parameters(), lr=0.5)
    opt = WRAPPERS[wrap](inner)
    probe.watch(model, opt, layer_every=1)
    hidden = model.init_hidden()
    for step in range(3):
        hidden = manual_step(model, hidden, step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
    return by_step(stored_run(agent, runs_dir, wrap)[0])


@pytest.mark.parametrize("wrap", sorted(set(WRAPPERS) - {"plain"}))
def test_a_wrapped_optimizer_records_what_the_plain_one_does(
    agent: Any, endpoint: str, runs_dir: Path, wrap: str
) -> None:
    """A wrapper is looked through: the same metrics, the same values, lr included."""
    wrapped = _trained_with(wrap, agent, endpoint, runs_dir)
    plain = _trained_with("plain", probe_agent_again(agent, endpoint, runs_dir), endpoint, runs_dir)
    assert sorted(wrapped) == sorted(plain) == [0, 1, 2]
    for step in plain:
        timing = {"step_time_seconds", "steps_per_second", "forward_seconds", "backward_seconds"}
        assert set(wrapped[step]) == set(plain[step])
        assert "lr" in wrapped[step] and "update_ratio/group0" in wrapped[step]
        for name, value in plain[step].items():
            if name not in timing:
                assert close(wrapped[step][name], value), (step, name)


def probe_agent_again(agent: Any, endpoint: str, runs_dir: Path) -> Any:
    """A fresh agent on the same endpoint, for a second run in one test."""
    from tests.helpers import start_agent

    probe._reset_for_tests()
    return start_agent(endpoint, runs_dir)


def test_the_real_accelerated_optimizer_is_looked_through() -> None:
    """accelerate's own AcceleratedOptimizer, where accelerate is installed."""
    accelerate = pytest.importorskip("accelerate")
    from probe.watcher import find_optimizer

    model = nn.Linear(4, 4)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = accelerate.Accelerator(cpu=True).prepare_optimizer(inner)
    assert isinstance(wrapped, accelerate.optimizer.AcceleratedOptimizer)
    assert find_optimizer(wrapped) is inner


@pytest.mark.parametrize(
    ("model", "optimizer", "watched", "warns"),
    [
        (lambda: WordLanguageModel(), lambda m: None, True, 0),
        (lambda: WordLanguageModel(), lambda m: object(), True, 1),
        (lambda: WordLanguageModel(), lambda m: LightningLike(object()), True, 1),
        (lambda: "not a model", lambda m: None, False, 1),
        (
            lambda: object(),
            lambda m: torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=1),
            False,
            1,
        ),
    ],
    ids=["none", "object", "wrapped-object", "string-model", "object-model"],
)
def test_nothing_given_to_watch_raises_into_the_trainer(
    endpoint: str,
    runs_dir: Path,
    agent: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    model: Any,
    optimizer: Any,
    watched: bool,
    warns: int,
) -> None:
    """As users run it (errors swallowed): no exception, at most one warning, no internal
    error; the watcher's methods work; a real model is still watched without lr."""
    monkeypatch.setattr(internal, "RAISE", False)
    monkeypatch.setattr(internal, "_seen", set())
    probe.init(endpoint, run_id="odd")
    errors = internal.error_count()
    net = model()
    opt = optimizer(net)
    with caplog.at_level(logging.WARNING, logger="outrider.probe"):
        probe.watch(net, opt, layer_every=1).unwatch()
        watcher = probe.watch(net, opt, layer_every=1)  # a second call: no second warning
        assert list(watcher.data([1, 2])) == [1, 2]
        if watched:
            hidden = net.init_hidden()
            for step in range(2):
                hidden = manual_step(net, hidden, step)
                update(net, 0.1, 1.0)
        watcher.unwatch()
        probe.unwatch()
    warnings = [r.getMessage() for r in caplog.records if "probe.watch" in r.getMessage()]
    assert len(warnings) == warns, warnings
    assert internal.error_count() == errors
    assert torch.nn.utils.clip_grad_norm_ is ORIGINAL_CLIP
    if isinstance(net, nn.Module):
        assert forward_hook_count(net) == 0
    if isinstance(opt, torch.optim.Optimizer):
        assert optimizer_hook_count(opt) == 0
    got = by_step(stored_run(agent, runs_dir, "odd")[0])
    if watched:
        assert "grad_norm" in got[0] and "param_norm" in got[1] and "lr" not in got[0]
    else:
        assert got == {}


def test_a_negative_interval_is_still_a_set_up_error(endpoint: str) -> None:
    """A bad argument is the one thing watch raises for, before any hook exists."""
    probe.init(endpoint, run_id="bad")
    with pytest.raises(ValueError, match="layer_every"):
        probe.watch(WordLanguageModel(), layer_every=-1)
