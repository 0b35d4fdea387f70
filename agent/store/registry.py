"""The runs the agent has open: one RunStore each, opened on a run's first record.

The number of open runs is bounded, so a flood of made-up run ids costs a
counter, not a directory each. A run's environment (git and its patch, NVML,
packages) is collected on a helper thread, never on the receive thread. A run whose
directory cannot be written is still opened: its records are counted as not
stored until the disk takes them again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.store import runinfo
from agent.store.run_store import RunStore

MAX_OPEN_RUNS = 64


class OpenRuns:
    """Run id -> RunStore. Only the receive loop's thread opens, writes and flushes them;
    ``items()`` hands another thread (a scrape of the agent's health) a copy."""

    def __init__(
        self,
        runs_dir: Path,
        *,
        declared_run: str | None = None,
        meta: dict[str, Any] | None = None,
        histogram_bins: int = 64,
    ) -> None:
        self.runs_dir = runs_dir
        self.declared_run = declared_run  # the run `outrider run` started, with its metadata
        self.meta = meta or {}
        self.histogram_bins = histogram_bins
        self.stores: dict[str, RunStore] = {}

    def __iter__(self) -> Iterator[RunStore]:
        return iter(self.stores.values())

    def __len__(self) -> int:
        return len(self.stores)

    def items(self) -> list[tuple[str, RunStore]]:
        """(run id, store) pairs, copied: safe to read from another thread."""
        return list(self.stores.items())

    def get(self, run_id: str) -> RunStore | None:
        return self.stores.get(run_id)

    def open(self, run_id: str) -> RunStore | None:
        """The run's store, created on first use; None when MAX_OPEN_RUNS are open."""
        store = self.stores.get(run_id)
        if store is not None:
            return store
        if len(self.stores) >= MAX_OPEN_RUNS:
            return None
        meta = dict(self.meta) if run_id == self.declared_run else None
        store = RunStore(self.runs_dir, run_id, meta, self.histogram_bins)
        cwd = self.meta.get("cwd") if meta is not None else None
        store.collect_info_later(lambda: runinfo.collect(cwd, store.dir))
        self.stores[run_id] = store
        store.write_info()
        return store

    def open_declared(self) -> None:
        """With --run-id, the run directory and run.json exist before the trainer starts."""
        if self.declared_run is not None:
            self.open(self.declared_run)

    def learn_cwd(self, store: RunStore, hello: dict[str, Any]) -> None:
        """A run the agent was not told about gets git info from its trainer's directory."""
        if "git" not in store.info and isinstance(hello.get("cwd"), str):
            store.info["git"] = None  # asked once per run, even outside a repository
            cwd = hello["cwd"]
            store.collect_info_later(lambda: {"git": runinfo.git_info(cwd, store.dir)})

    def flush(self) -> list[RunStore]:
        """Write every run's pending lines; returns the runs that could not store them all."""
        return [store for store in self.stores.values() if store.flush()]

    def take_alarms(self) -> list[tuple[str, dict[str, Any]]]:
        """(run id, store_failed alert) of each run store that began failing since last asked."""
        taken = []
        for run_id, store in self.stores.items():
            while store.alarms:
                taken.append((run_id, store.alarms.pop(0)))
        return taken

    def write_changed_info(self) -> None:
        """run.json of every run whose accounting or environment changed."""
        for store in self.stores.values():
            store.merge_collected()
            if store.dirty or store.failure is not None:  # a failing store checks each beat
                store.write_info()

    def all_streams_said_bye(self) -> bool:
        return all(
            ledger.said_bye for store in self.stores.values() for ledger in store.streams.values()
        )
