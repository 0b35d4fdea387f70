"""PyTorch Lightning with outrider: real Trainer fits (tiny model, CPU) into a real agent.

What Lightning logs, the watched steps, the loss, the checkpoints; no added host
read; the entry point that adds the callback under ``outrider run``; DDP on two
CPU processes, where only rank 0 logs Lightning's scalars and every rank's probe
reports.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import sys
import textwrap
from argparse import Namespace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import probe
from probe.integrations import lightning as outrider_lightning
from probe.integrations.lightning import OutriderCallback, OutriderLogger
from tests.helpers import (
    clean_env,
    lines,
    outrider,
    run_info,
    stop_agent,
    trainer_dir,
    trainer_streams,
    wait_for,
)
from tests.host_reads import recording_host_reads

STEPS = 4


class Regression(pl.LightningModule):
    """A two-layer MLP fitting the sum of its inputs; keeps each batch's loss tensor."""

    def __init__(self, lr: float = 0.05, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []  # before Lightning clips them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.detach())
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad.detach().reshape(-1) for p in self.parameters() if p.grad is not None]
        self.grad_norms.append(torch.linalg.vector_norm(torch.cat(grads)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader(batches: int = 16, size: int = 4) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batches * size, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=size)


def trainer(**options: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "max_steps": STEPS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    settings.update(options)
    return pl.Trainer(**settings)


def fit(**options: Any) -> Regression:
    torch.manual_seed(0)
    model = Regression()
    trainer(**options).fit(model, loader())
    return model


@pytest.fixture(autouse=True)
def no_watch_left_behind() -> Iterator[None]:
    """A failed fit must not leave hooks to the next test."""
    yield
    probe.unwatch()


def stored(agent: Any, runs_dir: Path, run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    probe.finish()
    assert stop_agent(agent) == 0
    return lines(runs_dir / run_id, agent_lines=True), run_info(runs_dir / run_id)


def scalars_by_step(entries: list[dict[str, Any]], stream_rank: int = 0) -> dict[int, dict]:
    steps: dict[int, dict[str, Any]] = {}
    for entry in entries:
        if entry["kind"] == "scalars" and entry.get("rank") == stream_rank:
            merged = steps.setdefault(entry["step"], {})
            assert not merged.keys() & entry["metrics"].keys(), f"twice at {entry['step']}"
            merged.update(entry["metrics"])
    return steps


def events(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["kind"] == "event" and e["name"] == name]


# -- the logger and the callback in one fit ------------------------------------------------


def test_a_fit_stores_lightnings_scalars_the_loss_the_watch_and_the_hyperparameters(
    agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path
) -> None:
    """log_metrics' floats at Lightning's steps, the callback's loss equal to them, lr
    and the step's own grad_norm before Lightning's clip (the backward runs inside the
    optimizer's step, in Lightning's closure), run.json's hyperparameters, trainer_end."""
    probe.init(endpoint, run_id="lit")
    model = fit(logger=OutriderLogger(), callbacks=[OutriderCallback()], gradient_clip_val=0.01)
    entries, info = stored(agent, runs_dir, "lit")

    steps = scalars_by_step(entries)
    assert sorted(steps) == list(range(STEPS))
    for step, metrics in steps.items():
        expected = float(model.losses[step])
        assert metrics["train_loss"] == pytest.approx(expected, rel=1e-6)
        assert metrics["loss"] == pytest.approx(expected, rel=1e-6)
        assert metrics["epoch"] == 0
        assert metrics["lr"] == pytest.approx(0.05)
        assert metrics["grad_norm"] == pytest.approx(float(model.grad_norms[step]), rel=1e-5)
        assert metrics["grad_norm"] > 0.01  # so the clip changed the gradients
        assert metrics.keys() >= {"forward_seconds", "backward_seconds"}
    assert info["config"] == {"lr": 0.05, "width": 8}
    assert [e["attrs"]["status"] for e in events(entries, "trainer_end")] == ["success"]
    assert [s["rank"] for s in trainer_streams(info)] == [0]


def test_gradient_accumulation_logs_one_loss_per_optimizer_step(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """With 2 micro-batches per step, ``loss`` is their mean, once per optimizer step,
    at the steps of the watcher's records."""
    probe.init(endpoint, run_id="accumulate")
    model = fit(callbacks=[OutriderCallback()], accumulate_grad_batches=2)
    entries, _ = stored(agent, runs_dir, "accumulate")

    steps = scalars_by_step(entries)
    assert len(model.losses) == 2 * STEPS
    assert sorted(steps) == list(range(STEPS))
    for step, metrics in steps.items():
        mean = (float(model.losses[2 * step]) + float(model.losses[2 * step + 1])) / 2
        assert metrics["loss"] == pytest.approx(mean, rel=1e-6)
        assert "grad_norm" in metrics


class TwoOptimizers(Regression):
    """Manual optimization with two optimizers, one per layer: two steps per batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.losses.append(loss.detach())
        self.log("train_loss", loss)
        for optimizer in self.optimizers():  # type: ignore[union-attr]
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in self.optimizers():  # type: ignore[union-attr]
            optimizer.step()
        return loss

    def configure_optimizers(self) -> Any:
        first, last = self.net[0], self.net[2]
        return [
            torch.optim.SGD(first.parameters(), lr=0.05),
            torch.optim.SGD(last.parameters(), lr=0.01),
        ]


def test_manual_optimization_with_two_optimizers_counts_batches_that_stepped(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """global_step counts both optimizers' steps; the loss and the first optimizer's
    watched steps are numbered by batch, as Lightning numbers log_metrics."""
    probe.init(endpoint, run_id="manual")
    torch.manual_seed(0)
    model = TwoOptimizers()
    fit_trainer = trainer(logger=OutriderLogger(), callbacks=[OutriderCallback()])
    fit_trainer.fit(model, loader())
    entries, _ = stored(agent, runs_dir, "manual")
    assert fit_trainer.global_step == STEPS  # max_steps counts both optimizers' steps
    batches = STEPS // 2
    steps = scalars_by_step(entries)
    assert sorted(steps) == list(range(batches))
    for step, metrics in steps.items():
        assert metrics["loss"] == pytest.approx(float(model.losses[step]), rel=1e-6)
        assert metrics["train_loss"] == metrics["loss"]
        assert metrics["lr"] == pytest.approx(0.05)  # the first optimizer's


def test_a_resumed_fit_goes_on_from_the_checkpoints_step(
    agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path
) -> None:
    """Resuming from a Lightning checkpoint, the watcher and the loss go on at Lightning's
    step, not from 0."""
    probe.init(endpoint, run_id="resume")
    folder = tmp_path / "ckpts"
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
    fit(callbacks=[OutriderCallback(), saver], enable_checkpointing=True, max_steps=2)
    torch.manual_seed(0)
    resumed = trainer(callbacks=[OutriderCallback()], max_steps=STEPS)
    resumed.fit(Regression(), loader(), ckpt_path=str(folder / "epoch=0-step=2.ckpt"))
    entries, _ = stored(agent, runs_dir, "resume")
    steps = scalars_by_step(entries)
    assert sorted(steps) == list(range(STEPS))
    assert all(metrics.keys() >= {"loss", "grad_norm"} for metrics in steps.values())


def test_each_saved_checkpoint_is_an_event_the_agent_verifies(
    agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path
) -> None:
    """after_save_checkpoint sends the file ModelCheckpoint just wrote (path, size,
    global_step), and the agent stores checkpoint_verified with its sha256."""
    probe.init(endpoint, run_id="lit-ckpt")
    folder = tmp_path / "ckpts"
    saver = ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1)
    fit(logger=OutriderLogger(), callbacks=[saver], enable_checkpointing=True)
    probe.flush()
    run_dir = runs_dir / "lit-ckpt"

    def verified() -> list[dict[str, Any]] | None:
        found = events(lines(run_dir, agent_lines=True), "checkpoint_verified")
        return found if len(found) >= 2 else None

    checked = wait_for(verified, 30.0, "two checkpoint_verified events")
    entries, _ = stored(agent, runs_dir, "lit-ckpt")
    saved = {e["step"]: e["attrs"] for e in events(entries, "checkpoint")}
    assert sorted(saved) == [2, 4]
    for step, attrs in saved.items():
        path = folder / f"epoch=0-step={step}.ckpt"
        assert attrs == {"path": str(path.resolve()), "size": path.stat().st_size}
    hashes = {e["attrs"]["path"]: e["attrs"]["sha256"] for e in checked}
    assert hashes == {
        attrs["path"]: hashlib.sha256(Path(attrs["path"]).read_bytes()).hexdigest()
        for attrs in saved.values()
    }
    assert events(entries, "checkpoint_failed") == []


def test_the_pytorch_lightning_package_gets_classes_of_its_own(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """probe.integrations.pytorch_lightning's logger and callback work in a
    pytorch_lightning Trainer, which takes only its own package's classes."""
    import pytorch_lightning

    from probe.integrations import pytorch_lightning as outrider_pl

    class Module(pytorch_lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    probe.init(endpoint, run_id="pl")
    assert not issubclass(outrider_pl.OutriderCallback, pl.Callback)
    pytorch_lightning.Trainer(
        max_steps=2,
        accelerator="cpu",
        log_every_n_steps=1,
        logger=outrider_pl.OutriderLogger(),
        callbacks=[outrider_pl.OutriderCallback()],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(Module(), loader())
    entries, _ = stored(agent, runs_dir, "pl")
    steps = scalars_by_step(entries)
    assert sorted(steps) == [0, 1]
    assert all(m.keys() >= {"train_loss", "loss", "grad_norm"} for m in steps.values())


def test_hyperparameters_become_one_level_of_json_like_values() -> None:
    """Nested maps and namespaces flatten to a/b; tensors, callables and objects become
    text (a tensor without reading its values)."""
    params = {
        "optim": {"lr": 0.1, "betas": (0.9, 0.99), "sched": Namespace(kind="cosine")},
        "init": torch.ones(3),
        "act": nn.functional.relu,
        "path": Path("/data"),
        "name": None,
    }
    with recording_host_reads(source=None) as reads:
        plain = outrider_lightning.plain_params(params)
    assert reads.seen == []
    assert plain == {
        "optim/lr": 0.1,
        "optim/betas": [0.9, 0.99],
        "optim/sched/kind": "cosine",
        "init": "Tensor(shape=[3], dtype=torch.float32)",
        "act": "relu",
        "path": "/data",
        "name": None,
    }


def test_a_logger_off_rank_zero_sends_nothing(
    agent: Any, endpoint: str, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The logger's methods are Lightning's rank_zero_only: on another rank they do nothing."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    probe.init(endpoint, run_id="rank1")
    logger = OutriderLogger()
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger.log_metrics({"train_loss": 1.0}, step=0)
    logger.log_hyperparams({"lr": 0.1})
    logger.finalize("success")
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    logger.log_metrics({"train_loss": 2.0}, step=1)
    entries, info = stored(agent, runs_dir, "rank1")
    assert [(e["step"], e["metrics"]) for e in entries if e["kind"] == "scalars"] == [
        (1, {"train_loss": 2.0})
    ]
    assert info["config"] == {}
    assert events(entries, "trainer_end") == []


def test_save_is_a_no_op_and_the_version_is_the_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning calls save() after every log_metrics: it does nothing; version names the run."""
    monkeypatch.setenv("OUTRIDER_RUN_ID", "run-7")
    logger = OutriderLogger()
    assert logger.save() is None
    assert (logger.name, logger.version) == ("outrider", "run-7")
    assert OutriderLogger(name="exp", version=3).version == 3
    assert logger.save_dir is None


# -- no host read, no collective -----------------------------------------------------------


def count_host_reads(**options: Any) -> list[str]:
    """Every host read of this thread during a fit (by any code: Lightning's own too)."""
    with recording_host_reads(source=None) as reads:
        fit(**options)
    return reads.seen


@pytest.mark.parametrize("lightning_logger", [False, True], ids=["no-logger", "csv-logger"])
def test_outrider_adds_no_host_read_to_a_fit(
    agent: Any, endpoint: str, tmp_path: Path, lightning_logger: bool
) -> None:
    """A fit with outrider reads tensors on the host exactly as often as without it.

    Without a logger, the callback alone (Lightning turns logged tensors into floats
    only for loggers); with Lightning's CSV logger, outrider's logger beside it too.
    """
    csv: list[Any] = [CSVLogger(tmp_path / "csv")] if lightning_logger else []
    without = count_host_reads(logger=csv or False)
    probe.init(endpoint, run_id="reads")
    with_outrider = count_host_reads(
        logger=[*csv, OutriderLogger()] if csv else False,
        callbacks=[OutriderCallback(layer_every=1, hist_every=2, activations_every=2)],
    )
    assert probe._watchers == []  # unwatched at the end of the fit
    assert probe.flush() and probe.stats()["sent"] > 0
    added = sorted(set(with_outrider) - set(without))
    assert len(with_outrider) == len(without), f"outrider added host reads: {added}"
    assert without  # the recorder sees Lightning's own reads, so it would see ours


# -- the entry point -----------------------------------------------------------------------


def test_the_entry_points_are_registered() -> None:
    """Both packages' callbacks_factory groups name outrider's factories."""
    for group, target in (
        ("lightning.pytorch.callbacks_factory", "probe.integrations.lightning"),
        ("pytorch_lightning.callbacks_factory", "probe.integrations.pytorch_lightning"),
    ):
        found = {e.value for e in importlib.metadata.entry_points(group=group)}
        assert f"{target}:callbacks_factory" in found, (group, found)


def test_the_factory_adds_the_callback_only_under_outrider_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No endpoint, or telemetry switched off: nothing; under outrider run: one callback
    of the right package."""
    from probe.integrations import pytorch_lightning as outrider_pl

    monkeypatch.delenv("OUTRIDER_ENDPOINT", raising=False)
    assert outrider_lightning.callbacks_factory() == []
    monkeypatch.setenv("OUTRIDER_ENDPOINT", "ipc:///nowhere/agent.sock")
    monkeypatch.setenv("OUTRIDER_DISABLED", "1")
    assert outrider_lightning.callbacks_factory() == []
    monkeypatch.delenv("OUTRIDER_DISABLED")
    [callback] = outrider_lightning.callbacks_factory()
    assert isinstance(callback, pl.Callback) and callback.automatic
    import pytorch_lightning

    [other] = outrider_pl.callbacks_factory()
    assert isinstance(other, pytorch_lightning.Callback)
    assert not isinstance(other, pl.Callback)


def test_a_trainer_under_outrider_run_gets_the_callback_once(
    agent: Any, endpoint: str, runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning loads the entry point itself; a callback the user added takes the
    automatic one's place (one watcher, one loss per step)."""
    monkeypatch.setenv("OUTRIDER_ENDPOINT", endpoint)
    monkeypatch.setenv("OUTRIDER_RUN_ID", "auto")
    plain = trainer()
    [automatic] = [cb for cb in plain.callbacks if isinstance(cb, OutriderCallback)]
    assert automatic.automatic

    mine = OutriderCallback(log_every=2)
    both = trainer(callbacks=[mine])
    model = Regression()
    both.fit(model, loader())
    ours = [cb for cb in both.callbacks if isinstance(cb, OutriderCallback)]
    assert len(ours) == 2 and [cb.active for cb in ours] == [True, False]
    entries, _ = stored(agent, runs_dir, "auto")
    steps = scalars_by_step(entries)
    assert sorted(steps) == list(range(STEPS))
    assert [step for step, metrics in steps.items() if "grad_norm" in metrics] == [0, 2]


# -- DDP on two CPU processes, under outrider run ------------------------------------------

DDP_TRAINER = """
import os
import traceback

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import probe
from probe.integrations.lightning import OutriderLogger

PROBE_DIR = os.path.dirname(probe.__file__) + os.sep
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
    "broadcast_object_list", "barrier", "reduce", "gather", "gather_object", "scatter",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
)
from_probe = []


def seen(name, collective):
    def call(*args, **kwargs):
        if any(f.filename.startswith(PROBE_DIR) for f in traceback.extract_stack()):
            from_probe.append(name)
        return collective(*args, **kwargs)
    return call


for name in COLLECTIVES:
    setattr(dist, name, seen(name, getattr(dist, name)))


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=4)
    trainer = pl.Trainer(
        strategy="ddp", devices=2, accelerator="cpu", max_steps=3, log_every_n_steps=1,
        logger=OutriderLogger(), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Regression(), data)
    assert trainer.world_size == 2
    if from_probe:
        raise SystemExit(f"collectives called from outrider's code: {from_probe}")
"""


@pytest.mark.slow
@pytest.mark.serial
def test_ddp_only_rank_zero_logs_lightnings_scalars_and_every_rank_reports(
    tmp_path: Path,
) -> None:
    """Two gloo processes under outrider run, the callback from the entry point: train_loss
    from rank 0 only; loss, grad_norm and lr from both ranks, each its own stream; no
    collective called from outrider's code."""
    work = trainer_dir(tmp_path / "work", {"train.py": textwrap.dedent(DDP_TRAINER)})
    runs = tmp_path / "runs"
    done = outrider(
        "run", "--runs-dir", str(runs), "--run-id", "ddp", "-q", "--",
        sys.executable, "train.py", cwd=work, timeout=90.0, env=clean_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    entries = lines(runs / "ddp")
    info = run_info(runs / "ddp")
    assert sorted(s["rank"] for s in trainer_streams(info)) == [0, 1]
    for rank in (0, 1):
        steps = scalars_by_step(entries, rank)
        assert sorted(steps) == [0, 1, 2], (rank, steps)
        assert all(
            m.keys() >= {"loss", "grad_norm", "lr", "forward_seconds"} for m in steps.values()
        )
        lightning_logged = [s for s, metrics in steps.items() if "train_loss" in metrics]
        assert lightning_logged == ([0, 1, 2] if rank == 0 else [])
