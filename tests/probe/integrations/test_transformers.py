"""``OutriderCallback`` in a real ``transformers.Trainer``: a GPT-2 built from a tiny
config (no download), a few CPU steps, a real agent process reading it all back."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from transformers import (  # after the offline switches
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

import probe
from probe.integrations.transformers import (
    EVALUATE_EVENT,
    SAVE_EVENT,
    OutriderCallback,
)
from tests.helpers import PYTHON, clean_env, lines, run_info, stop_agent
from tests.host_reads import recording_host_reads
from tests.probe.test_watch import close, optimizer_hook_count

VOCAB, CONTEXT, BATCH, STEPS = 50, 8, 4, 4


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Fixed random token sequences; the labels are the inputs (causal LM)."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(VOCAB, (CONTEXT,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=CONTEXT,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def trainer(output_dir: Path, callbacks: list[Any], **overrides: Any) -> Trainer:
    """A Trainer that evaluates and saves every 2 of its 4 steps, with no other tracker."""
    options: dict[str, Any] = {
        "output_dir": str(output_dir),
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "report_to": "none",
        "use_cpu": True,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    options.update(overrides)
    return Trainer(
        model=tiny_gpt2(),
        args=TrainingArguments(**options),
        train_dataset=Tokens(),
        eval_dataset=Tokens(),
        callbacks=callbacks,
    )


def stored(agent: Any, runs_dir: Path, run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    probe.finish()
    assert stop_agent(agent) == 0
    return lines(runs_dir / run_id), run_info(runs_dir / run_id)


def scalars_at(entries: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Each step's scalar records (the Trainer's logs and the watcher's, separately)."""
    steps: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        if entry["kind"] == "scalars":
            steps.setdefault(entry["step"], []).append(entry["metrics"])
    return steps


def test_trainer_run_is_stored(agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path) -> None:
    """Config (training arguments and model config), every Trainer log at its global step,
    the watcher's records on the same steps (its pre-clip grad_norm equal to the Trainer's),
    evaluate and save events, and no hook left after training."""
    probe.init(endpoint, run_id="hf")
    callback = OutriderCallback(layer_every=2, hist_every=2, activations_every=2)
    fit = trainer(tmp_path / "out", [callback])
    fit.train()
    optimizer = fit.optimizer.optimizer  # the torch optimizer under accelerate's wrapper
    assert callback.watcher is None and optimizer_hook_count(optimizer) == 0
    entries, info = stored(agent, runs_dir, "hf")

    config = info["config"]
    assert config["learning_rate"] == fit.args.learning_rate
    assert config["max_steps"] == STEPS and config["output_dir"] == str(tmp_path / "out")
    assert (config["model_type"], config["n_embd"], config["n_layer"]) == ("gpt2", 16, 1)

    steps = scalars_at(entries)
    assert sorted(steps) == list(range(1, STEPS + 1))
    # Every number the Trainer logged, at the step it logged it.
    history = fit.state.log_history
    assert len(history) == STEPS + 2 + 1  # a log per step, two evaluations, the summary
    for logged in history:
        step = logged["step"]
        want = {k: v for k, v in logged.items() if k != "step" and isinstance(v, (int, float))}
        # the probe adds loss_nonfinite beside a loss
        assert any(want.items() <= metrics.items() for metrics in steps[step]), (step, want)
    # The watcher's records are numbered by the same global step.
    trainer_grad_norms = {h["step"]: h["grad_norm"] for h in history if "grad_norm" in h}
    assert sorted(trainer_grad_norms) == list(range(1, STEPS + 1))
    for step, records in steps.items():
        watched = [m for m in records if "lr" in m]
        assert len(watched) == 1, (step, records)
        metrics = watched[0]
        assert close(metrics["grad_norm"], trainer_grad_norms[step], rel=1e-4), step
        assert trainer_grad_norms[step] > fit.args.max_grad_norm, "the Trainer must clip"
        assert metrics["grad_nonfinite"] == 0
        assert ("param_norm" in metrics) == (step % 2 == 0), step
        assert any(name.startswith("act/") for name in metrics) == (step % 2 == 0), step
        assert ("samples_per_second" in metrics) == (step > 1), step
    histograms = {(e["step"], e["name"]) for e in entries if e["kind"] == "histogram"}
    assert {step for step, name in histograms if name.startswith("weights/")} == {2, 4}

    events = [(e["name"], e["step"], e.get("attrs", {})) for e in entries if e["kind"] == "event"]
    evaluations = [(step, attrs) for name, step, attrs in events if name == EVALUATE_EVENT]
    assert [step for step, _ in evaluations] == [2, 4]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    assert [attrs["eval_loss"] for _, attrs in evaluations] == eval_losses
    saves = [(step, attrs["path"]) for name, step, attrs in events if name == SAVE_EVENT]
    assert saves == [(s, str(tmp_path / "out" / f"checkpoint-{s}")) for s in (2, 4)]
    assert all(Path(path).is_dir() for _, path in saves)


def test_other_ranks_watch_without_logging(
    agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path
) -> None:
    """On a process other than the world's zero, the callback watches the model and sends
    no configuration, logs or events: those are rank zero's, the same on every rank."""
    probe.init(endpoint, run_id="rank1", rank=1, world_size=2)
    model = tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    state = TrainerState(is_world_process_zero=False, is_local_process_zero=False)
    control = TrainerControl()
    callback = OutriderCallback(activations_every=0)
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    for step in range(2):
        callback.on_pre_optimizer_step(args, state, control)
        batch = Tokens()[step]
        loss = model(input_ids=batch["input_ids"][None], labels=batch["labels"][None]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step += 1
        callback.on_log(args, state, control, logs={"loss": 1.0})
    callback.on_evaluate(args, state, control, metrics={"eval_loss": 1.0})
    callback.on_save(args, state, control)
    callback.on_train_end(args, state, control)
    entries, info = stored(agent, runs_dir, "rank1")
    assert info["config"] == {}
    assert [e for e in entries if e["kind"] in ("event", "config")] == []
    steps = scalars_at(entries)
    assert sorted(steps) == [1, 2]
    assert all("loss" not in m and "grad_norm" in m for records in steps.values() for m in records)


def test_no_host_reads_are_added(agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path) -> None:
    """The training thread makes the same .item()/float()/.cpu() reads (each a host sync
    on a GPU) in a fit with the callback as in one without; differences are listed."""
    probe.init(endpoint, run_id="reads")
    trainer(tmp_path / "warm", []).train()  # first-use paths (lazy imports, caches)
    with recording_host_reads(source=None) as without:
        trainer(tmp_path / "without", []).train()
    callback = OutriderCallback(layer_every=1, hist_every=1, activations_every=1)
    with recording_host_reads(source=None) as with_outrider:
        trainer(tmp_path / "with", [callback]).train()
    added = Counter(with_outrider.seen) - Counter(without.seen)
    missing = Counter(without.seen) - Counter(with_outrider.seen)
    assert not added and not missing, f"added: {dict(added)}\nmissing: {dict(missing)}"
    assert without.seen, "the Trainer's own reads (its loss .item()) must be seen"
    entries, _ = stored(agent, runs_dir, "reads")
    watched = [e for e in entries if e["kind"] == "scalars" and "param_norm" in e["metrics"]]
    assert len(watched) == STEPS, "the fit with the callback was watched on every step"


def test_callback_options_are_checked() -> None:
    """A misspelt or negative watch option is a ValueError when the callback is made,
    not an internal error in the middle of training."""
    with pytest.raises(ValueError, match=r"unknown probe\.watch option"):
        OutriderCallback(hist_evry=10)
    with pytest.raises(ValueError, match="start_step"):
        OutriderCallback(start_step=3)
    with pytest.raises(ValueError, match="layer_every must be >= 0"):
        OutriderCallback(layer_every=-1)


def test_import_probe_leaves_the_frameworks_out(tmp_path: Path) -> None:
    """``import probe`` and ``import probe.integrations`` import no framework."""
    code = (
        "import sys, probe, probe.integrations, probe.integrations.plain\n"
        "heavy = ('torch', 'transformers', 'accelerate', 'lightning', 'numpy')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run(
        [PYTHON, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
