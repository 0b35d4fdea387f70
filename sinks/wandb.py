"""Weights & Biases: one W&B run per outrider run, living in the agent process.

The trainer never imports wandb. This sink turns run-store entries into
``run.log`` calls on its own worker thread, so W&B's cost (serialising media,
talking to wandb-core, uploading) is the agent's, never the training loop's.
Without an API key the run is written offline under ``<run dir>/wandb/`` for
``wandb sync`` later. See docs/wandb.md.

``import wandb`` happens inside methods only: ``import sinks`` stays cheap,
and, with absolute imports, the name resolves to the real top-level package
even though this module is called ``sinks.wandb``.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import itertools
import logging
import math
import netrc
import operator
import os
import re
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import orjson
import pydantic

from probe import protocol
from sinks import schema
from sinks.base import Batch, Sink, plain_numbers
from sinks.registry import SinkContext

if TYPE_CHECKING:
    from wandb import Run

logger = logging.getLogger("outrider.sinks.wandb")

STEP_KEY = "trainer/step"  # the custom x-axis: any step order is fine, no monotonic warnings
ALERTS_KEY = "outrider/alerts"
TIME_KEY = "_timestamp"  # a history row's wall time; W&B keeps one given, else takes its own
TEXT_ROWS = 200  # rows kept per text table (the newest)
TABLE_INTERVAL = 10.0  # seconds between re-logs of a changing table (each one is a new file)
MAX_HISTOGRAM_BINS = 512  # wandb.Histogram's own limit
CHECKPOINT_MAX_BYTES = 2 * 1024**3  # the default cap on a checkpoint logged as an artifact
ALERT_TITLE_CHARS = 63  # run.alert wants a title under 64 characters
# W&B has no level above ERROR: the agent's critical alerts go out as ERROR.
ALERT_LEVELS = {"info": "INFO", "warning": "WARN", "error": "ERROR", "critical": "ERROR"}
RUN_ID_CHARS = re.compile(r"[^A-Za-z0-9_-]")
MAX_RUN_ID_CHARS = 64

Mode = Literal["online", "offline", "disabled"]
MODES: dict[str, Mode] = {
    "online": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}
#: kinds a rank that is not logged (``ranks: 0``) still hands over: they concern the whole run
WHOLE_RUN_KINDS = frozenset({protocol.RUN_END, schema.ALERT})


class _Skip(ValueError):
    """An entry (or one value in it) that cannot become W&B data."""


# -- pure helpers (tested directly) --------------------------------------------------------------
def wandb_run_id(run_id: str) -> str:
    """A W&B run id for an outrider run id: ``[A-Za-z0-9_-]``, at most 64 characters.

    An id that had to change gets a hash suffix, so ``a.b`` and ``a-b`` stay apart.
    """
    cleaned = RUN_ID_CHARS.sub("-", run_id)
    if cleaned == run_id and len(cleaned) <= MAX_RUN_ID_CHARS:
        return run_id
    digest = hashlib.sha1(run_id.encode()).hexdigest()[:8]
    return f"{cleaned[: MAX_RUN_ID_CHARS - 9]}-{digest}"


def merge_bins(
    counts: Sequence[float], edges: Sequence[float], max_bins: int
) -> tuple[list[float], list[float]]:
    """Merge runs of adjacent bins until at most ``max_bins`` remain; totals are kept."""
    n = len(counts)
    if n <= max_bins:
        return list(counts), list(edges)
    width = -(-n // max_bins)  # ceil
    merged = [math.fsum(counts[i : i + width]) for i in range(0, n, width)]
    return merged, [edges[i] for i in range(0, n, width)] + [edges[-1]]


def api_key_configured() -> bool:
    """Whether W&B credentials exist locally (env or netrc), checked without the network."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    import wandb

    base_url = os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url
    try:
        from wandb.sdk.lib.wbauth import read_netrc_auth
    except ImportError:  # wandb moved its helper: read the same file ourselves
        return _netrc_has(base_url)
    try:
        return bool(read_netrc_auth(host=base_url))
    except Exception as exc:  # a malformed entry: wandb.init would refuse it too
        logger.warning("outrider sink wandb: ignoring the netrc entry for %s: %s", base_url, exc)
        return False


def _netrc_has(base_url: str) -> bool:
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        entry = netrc.netrc(path).authenticators(urlsplit(base_url).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str) -> Mode:
    """``auto`` is WANDB_MODE when set, else online with credentials, else offline."""
    if mode != "auto":
        return MODES[mode]
    wanted = MODES.get(os.environ.get("WANDB_MODE", "").lower())
    if wanted is not None:
        return wanted
    return "online" if api_key_configured() else "offline"


def _number(value: Any) -> float | int | None:
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return schema.decode_number(value)
    return None


def _step(entry: Mapping[str, Any]) -> int | None:
    step = entry.get("step")
    if step is None or (isinstance(step, int) and not isinstance(step, bool)):
        return step
    raise _Skip(f"step {step!r} is not an integer")


def _string(entry: Mapping[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise _Skip(f"{key!r} is missing or not a string")
    return value


#: one W&B history row: the trainer's step (None: none known) and the values logged at it
Row = tuple[int | None, dict[str, Any]]


def fold_rows(rows: Sequence[Row]) -> Row:
    """Rows of several steps as one: each metric's latest value, at the newest step (the
    agent's statistics of an earlier step arrive after the trainer's newer ones)."""
    step: int | None = None
    folded: dict[str, Any] = {}
    for row_step, values in rows:
        folded.update(values)
        if row_step is not None:
            step = row_step if step is None else max(step, row_step)
    return step, folded


def _histogram_parts(entry: Mapping[str, Any], max_bins: int) -> tuple[list[float], list[float]]:
    counts, edges = entry.get("counts"), entry.get("edges")
    if not isinstance(counts, list) or not isinstance(edges, list) or not counts:
        raise _Skip("counts and edges must be non-empty lists")
    if len(edges) != len(counts) + 1:
        raise _Skip(f"{len(edges)} edges for {len(counts)} counts (want counts + 1)")
    # W&B takes no non-finite spelling here: anything but plain finite numbers is refused.
    if not (
        plain_numbers(counts)
        and plain_numbers(edges)
        and all(map(math.isfinite, counts))
        and all(map(math.isfinite, edges))
    ):
        raise _Skip("counts and edges must be finite numbers")
    if not all(map(operator.le, itertools.repeat(0), counts)) or not all(
        map(operator.le, edges, itertools.islice(edges, 1, None))
    ):
        raise _Skip("counts must be >= 0 and edges non-decreasing")
    return merge_bins(counts, edges, max_bins)


def _run_json_config(run_dir: Path) -> dict[str, Any]:
    """The run.json facts worth seeing in W&B: command, host, versions, git commit."""
    try:
        info = orjson.loads((run_dir / "run.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    if not isinstance(info, dict):
        return {}
    config: dict[str, Any] = {}
    for key, name in (("host", "host"), ("python", "python"), ("torch", "torch")):
        if isinstance(info.get(key), str):
            config[f"outrider/{name}"] = info[key]
    if isinstance(info.get("outrider"), str):
        config["outrider/version"] = info["outrider"]
    command = info.get("command")
    if isinstance(command, list) and all(isinstance(a, str) for a in command):
        config["outrider/command"] = shlex.join(command)
    git = info.get("git")
    if isinstance(git, dict):
        for key in ("commit", "branch", "dirty"):
            if git.get(key) is not None:
                config[f"outrider/git_{key}"] = git[key]
    return config


# -- per-run state -------------------------------------------------------------------------------
@dataclass
class _Table:
    columns: tuple[str, ...]
    rows: collections.deque[tuple[Any, ...]] = field(
        default_factory=lambda: collections.deque(maxlen=TEXT_ROWS)
    )
    step: int | None = None
    dirty: bool = False
    logged_at: float = -math.inf


@dataclass
class _Run:
    run: Run
    mode: Mode
    run_dir: Path
    rows: list[Row] = field(default_factory=list)
    tables: dict[str, _Table] = field(default_factory=dict)
    exit_status: int | None = None
    ending: bool = False
    rows_logged_at: float = -math.inf
    record_t: float = -math.inf  # the newest record time seen (rows fold by it from the store)

    def add(self, step: int | None, values: dict[str, Any]) -> None:
        """Values of one step coalesce into one history row."""
        if self.rows and self.rows[-1][0] == step:
            self.rows[-1][1].update(values)
        else:
            self.rows.append((step, values))

    def table(self, key: str, columns: tuple[str, ...]) -> _Table:
        table = self.tables.get(key)
        if table is None or table.columns != columns:
            table = self.tables[key] = _Table(columns)
        return table


@dataclass
class _Deferred:
    """A run to write from its run store once it is over: at its ``run_end`` (the
    launcher's, which ``outrider run`` sends last) or, for trainers that reached the agent
    without a launcher (a long-lived agent), once every stream seen, and at least as many
    as the run has ranks, said bye."""

    run_dir: Path
    streams: set[str] = field(default_factory=set)
    byes: set[str] = field(default_factory=set)
    world_size: int = 1  # the most ranks a stream announced: that many must say bye
    launched: bool = False

    def take(self, batch: Batch) -> bool:
        """Note the batch; True once the run is over."""
        source = batch.source
        if source.stream == schema.AGENT_STREAM:
            return False
        kinds = {entry.get("kind") for entry in batch.entries}
        if protocol.RUN_END in kinds:
            return True
        if source.rank < 0:  # the launcher's stream: its run_end will say when
            self.launched = True
            return False
        self.streams.add(source.stream)
        self.world_size = max(self.world_size, source.world_size)
        if protocol.BYE in kinds:
            self.byes.add(source.stream)
        return not self.launched and self.streams <= self.byes and len(self.byes) >= self.world_size


#: turns one entry of a run into W&B data: (run, batch, entry, name prefix of its rank)
_Handler = Callable[[_Run, Batch, Mapping[str, Any], str], None]


class WandbSink(Sink):
    """Logs each outrider run to its own W&B run (offline without credentials)."""

    name = "wandb"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")

        project: str = pydantic.Field(default="outrider", description="W&B project.")
        entity: str | None = pydantic.Field(
            default=None, description="W&B entity (user or team); None: the key's default."
        )
        mode: Literal["auto", "online", "offline", "disabled"] = pydantic.Field(
            default="auto",
            description="auto: WANDB_MODE if set, else online when an API key is configured "
            "(WANDB_API_KEY or netrc), else offline.",
        )
        dir: str | None = pydantic.Field(
            default=None,
            description="Directory that receives wandb/; None: the outrider run's directory.",
        )
        ranks: Literal["0", "all"] = pydantic.Field(
            default="0",
            description="0: rank 0's data only; all: other ranks' data as rank<N>/<name>.",
        )
        init_timeout: float = pydantic.Field(
            default=60.0,
            gt=0,
            description="Seconds wandb.init may take (online: reaching the server); a run that "
            "cannot start is skipped for W&B, its data stays in the run store.",
        )
        finish_timeout: float = pydantic.Field(
            default=30.0,
            gt=0,
            description="Seconds a run may take to finish (upload) before it is abandoned; "
            "what did not upload stays on disk for `wandb sync`.",
        )
        histogram_bins: int = pydantic.Field(
            default=MAX_HISTOGRAM_BINS,
            ge=1,
            le=MAX_HISTOGRAM_BINS,
            description="Most bins per histogram; adjacent bins are merged beyond it.",
        )
        rows_per_second: float = pydantic.Field(
            default=0.2,
            ge=0,
            description="Most W&B history rows a run gets per second (default: one every 5 s; "
            "a row of a few hundred values costs W&B ~8 ms of CPU, and W&B advises under "
            "100,000 points per metric): the rows in between are folded into the next, each "
            "metric's latest value at the latest step. 0: a row for every step. The run store "
            "and TensorBoard keep every step either way.",
        )
        offline_at_end: bool = pydantic.Field(
            default=True,
            description="Offline, write each W&B run once its outrider run ends, from the run "
            "store, instead of keeping W&B's service busy beside the trainer (it wakes about "
            "100 times a second). The offline run, and what `wandb sync` uploads, is the same; "
            "rows are folded by the records' own times. false: write as the run goes.",
        )
        tags: list[str] = pydantic.Field(default_factory=list, description="W&B run tags.")
        group: str | None = pydantic.Field(
            default=None, description="W&B run group, e.g. to gather a distributed sweep."
        )
        alerts: bool = pydantic.Field(
            default=True, description="Send alert entries as W&B alerts (online runs only)."
        )
        checkpoints_as_artifacts: bool = pydantic.Field(
            default=False,
            description="Log each checkpoint the agent verified as a W&B artifact of type "
            "model (aliases latest, and best for the best save so far). W&B copies the file "
            "into its staging directory until it is uploaded (or synced, offline).",
        )
        checkpoint_max_bytes: int = pydantic.Field(
            default=CHECKPOINT_MAX_BYTES,
            ge=1,
            description="Checkpoints larger than this are not logged as artifacts (counted "
            "and logged as skipped).",
        )

        @pydantic.field_validator("ranks", mode="before")
        @classmethod
        def _rank_zero_as_number(cls, value: Any) -> Any:
            return "0" if value == 0 and not isinstance(value, bool) else value

    def __init__(self, options: Options | None = None, context: SinkContext | None = None) -> None:
        if importlib.util.find_spec("wandb") is None:
            raise ImportError("the wandb sink needs the wandb package: pip install wandb")
        self.options = options or self.Options()
        self.context = context
        # Creating or finishing a W&B run may legitimately take this long.
        self.stall_after = max(self.options.init_timeout, self.options.finish_timeout) + 30.0
        self.runs: dict[str, _Run] = {}  # open W&B runs by outrider run id
        self.ended: set[str] = set()  # finished by run_end; later data is dropped
        self.failed: dict[str, str] = {}  # outrider run id -> why wandb.init failed
        self.skipped = 0  # bad entries, and single bad values inside scalars entries
        self.dropped: dict[str, int] = {}  # reason -> entries never delivered
        self.abandoned = 0  # runs whose finish outlasted finish_timeout
        self.checkpoint_artifacts = 0  # checkpoints logged as artifacts
        self.checkpoints_skipped: dict[str, int] = {}  # reason -> checkpoints not logged
        self._mode: Mode | None = None
        self._warned: set[str] = set()
        # offline_at_end: the runs to write from their run store, by outrider run id
        self.deferred: dict[str, _Deferred] = {}
        self._from_store = False  # writing a deferred run: rows fold by the records' times
        # The kinds that become W&B data, each with what it becomes; every other kind is not.
        self._handlers: dict[str, _Handler] = {
            protocol.SCALARS: self._scalars,
            schema.HISTOGRAM: self._histogram,
            protocol.TEXT: self._text,
            schema.IMAGE: self._image,
            protocol.CONFIG: self._config,
            protocol.HELLO: self._hello,
            schema.ALERT: self._alert,
            protocol.RUN_END: self._run_end,
        }
        if self.options.checkpoints_as_artifacts:
            self._handlers[protocol.EVENT] = self._checkpoint

    # -- the Sink contract -------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Skipped entries, undelivered entries by reason, abandoned runs."""
        counts = {f"dropped_{reason}": n for reason, n in self.dropped.items()}
        counts["skipped"] = self.skipped
        counts["abandoned_runs"] = self.abandoned
        if self.options.checkpoints_as_artifacts:
            counts["checkpoint_artifacts"] = self.checkpoint_artifacts
            for reason, n in self.checkpoints_skipped.items():
                counts[f"checkpoint_artifacts_skipped_{reason}"] = n
        return counts

    def prepare(self) -> None:
        """Import wandb, and what ``wandb.init`` imports on every run start, ahead of the run.

        Together about 1.5 s of CPU (wandb's launch-job module builds pydantic
        models on import); paid at the first record, it fell on the trainer's
        first steps.
        """
        if self.mode == "disabled":
            return
        import wandb  # noqa: F401

        try:  # wandb's internals: a later release may move it, which only costs the time
            importlib.import_module("wandb.sdk.launch.inputs.internal")
        except ImportError as exc:
            logger.debug("outrider sink wandb: no launch-inputs module to preload: %s", exc)

    def export(self, batches: Sequence[Batch]) -> None:
        if self.mode == "disabled":
            return
        defer = self.writes_at_end and not self._from_store
        for batch in batches:
            run_id = batch.source.run
            if run_id in self.ended or run_id in self.failed:
                reason = "after_run_end" if run_id in self.ended else "init_failed"
                wanted = sum(1 for e in batch.entries if e.get("kind") in self._handlers)
                self._drop(reason, wanted)
                continue
            if defer:
                deferred = self.deferred.get(run_id)
                if deferred is None:
                    deferred = self.deferred[run_id] = _Deferred(Path(batch.run_dir))
                if deferred.take(batch):
                    self._write_from_store(run_id)
                continue
            for entry in batch.entries:
                self._entry(batch, entry)
            state = self.runs.get(run_id)
            if state is not None and state.ending:
                self._end(run_id, state)
        for state in self.runs.values():
            self._log_rows(state)

    @property
    def writes_at_end(self) -> bool:
        """Whether runs are written from the run store at their end (offline_at_end)."""
        return self.options.offline_at_end and self.mode == "offline"

    def _write_from_store(self, run_id: str) -> None:
        """The deferred run, from its stored lines (sinks/stored.py), as if it came live,
        then finished; its rows are folded by the records' own times."""
        from sinks import stored

        run_dir = self.deferred.pop(run_id).run_dir
        sources = stored.Sources(stored.load_info(run_dir), run_id)
        self._from_store = True
        try:
            lines = stored.run_end_last(stored.iter_lines(run_dir))
            for batch in stored.batches(lines, sources, run_dir):
                self.export([batch])
            state = self.runs.get(run_id)
            if state is not None:  # no run_end stored: over all the same (every bye, a stop)
                self._end(run_id, state)
        finally:
            self._from_store = False

    def flush(self, timeout: float) -> None:
        for state in self.runs.values():
            self._log_rows(state)
            self._log_tables(state, TABLE_INTERVAL)

    def close(self, timeout: float) -> None:
        """Write the deferred runs from their run store, then finish every open run; each
        may take up to ``finish_timeout`` (in parallel)."""
        for run_id in list(self.deferred):
            try:
                self._write_from_store(run_id)
            except Exception as exc:
                logger.warning("outrider sink wandb: run %s not written: %s", run_id, exc)
        for run_id, state in self.runs.items():
            try:
                self._log_rows(state, last=True)
                self._log_tables(state)
            except Exception as exc:
                logger.warning("outrider sink wandb: run %s: last data not logged: %s", run_id, exc)
        self._finish(
            [(run_id, state.run, state.exit_status) for run_id, state in self.runs.items()]
        )
        self.runs.clear()

    # -- runs --------------------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        if self._mode is None:
            self._mode = resolve_mode(self.options.mode)
        return self._mode

    def _run_for(self, batch: Batch) -> _Run | None:
        run_id = batch.source.run
        state = self.runs.get(run_id)
        if state is None and run_id not in self.failed:
            state = self._start(batch)
        return state

    def _start(self, batch: Batch) -> _Run | None:
        """Create (or resume) the W&B run; slow, which is fine on the sink's own thread."""
        import wandb

        run_id, run_dir = batch.source.run, Path(batch.run_dir)
        directory = Path(self.options.dir) if self.options.dir else run_dir
        settings = wandb.Settings(
            console="off",  # never capture the agent's stdout/stderr
            silent=True,
            save_code=False,
            disable_git=True,  # the agent's cwd says nothing about the trainer's code
            disable_job_creation=True,
            x_disable_meta=True,
            x_disable_stats=True,  # outrider reports the GPUs itself
            x_save_requirements=False,
            reinit="create_new",  # several outrider runs may be open at once
            init_timeout=self.options.init_timeout,  # also bounds the agent's exit meanwhile
            finish_timeout=self.options.finish_timeout,
        )
        try:
            directory.mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=self.options.project,
                entity=self.options.entity,
                id=wandb_run_id(run_id),
                name=run_id,
                group=self.options.group,
                tags=self.options.tags or None,
                dir=str(directory),
                mode=self.mode,
                resume="allow",
                config=_run_json_config(run_dir),
                settings=settings,
            )
            run.define_metric(STEP_KEY)
            run.define_metric("*", step_metric=STEP_KEY)
        except Exception as exc:  # wandb-core keeps the id busy: no retry in this process
            self.failed[run_id] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "outrider sink wandb: cannot start a W&B run for %s (%s); its data stays in the "
                "run store only",
                run_id,
                self.failed[run_id],
            )
            return None
        state = self.runs[run_id] = _Run(run, self.mode, run_dir)
        return state

    def _end(self, run_id: str, state: _Run) -> None:
        """run_end: the exit status into the summary, then a bounded finish."""
        self._log_rows(state, last=True)
        self._log_tables(state)
        if state.exit_status is not None:
            state.run.summary["exit_status"] = state.exit_status
        del self.runs[run_id]
        self.ended.add(run_id)
        self._finish([(run_id, state.run, state.exit_status)])

    def _finish(self, finishing: list[tuple[str, Run, int | None]]) -> None:
        """``run.finish`` on helper threads; any still going after finish_timeout is abandoned."""
        waiting: list[tuple[str, threading.Event]] = []
        for run_id, run, exit_code in finishing:
            done = threading.Event()
            threading.Thread(
                target=_finish_run,
                args=(run_id, run, exit_code, done),
                name=f"outrider-wandb-finish-{run_id}",
                daemon=True,
            ).start()
            waiting.append((run_id, done))
        deadline = time.monotonic() + self.options.finish_timeout
        for run_id, done in waiting:
            if not done.wait(max(0.0, deadline - time.monotonic())):
                self.abandoned += 1
                logger.warning(
                    "outrider sink wandb: run %s did not finish within %.1f s; abandoned "
                    "(what it did not upload stays on disk for `wandb sync`)",
                    run_id,
                    self.options.finish_timeout,
                )

    # -- entries -----------------------------------------------------------------------------
    def _entry(self, batch: Batch, entry: Mapping[str, Any]) -> None:
        kind = entry.get("kind")
        handle = self._handlers.get(kind) if isinstance(kind, str) else None
        if handle is None:
            return  # heartbeats, probe counters, raw tensors, ...: not W&B data
        rank = entry.get("rank", batch.source.rank)
        if not isinstance(rank, int):
            rank = batch.source.rank
        prefix = self._prefix(rank)
        if prefix is None and kind not in WHOLE_RUN_KINDS:
            return
        state = self._run_for(batch)
        if state is None:
            self._drop("init_failed", 1)
            return
        try:
            handle(state, batch, entry, prefix or "")
        except Exception as exc:  # bad input must not cost the rest of the batch
            self.skipped += 1
            self._warn_once(f"{kind}:{type(exc).__name__}", f"skipped a {kind} entry: {exc}")

    def _prefix(self, rank: int) -> str | None:
        """The name prefix for a rank's data, None when the rank is not wanted."""
        if rank <= 0:
            return ""
        return f"rank{rank}/" if self.options.ranks == "all" else None

    def _scalars(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        metrics, step = entry.get("metrics"), _step(entry)
        if not isinstance(metrics, dict):
            raise _Skip("metrics is not a map")
        t = entry.get("t")
        if plain_numbers(metrics.values()) and all(isinstance(n, str) and n for n in metrics):
            # A copy: the entry is every sink's, and the row gets the step key added.
            values = {prefix + n: v for n, v in metrics.items()} if prefix else {**metrics}
        else:
            values = {}
            for name, value in metrics.items():
                number = _number(value)
                if number is None or not isinstance(name, str) or not name:
                    self.skipped += 1
                    self._warn_once(
                        f"value:{name}", f"skipped scalar {name!r}: {value!r} is no number"
                    )
                    continue
                values[prefix + name] = number
            if not values:
                return
        if type(t) is float and math.isfinite(t):
            values[TIME_KEY] = t  # the trainer's time, not the sink's: a replay keeps its times
            state.record_t = max(state.record_t, t)
        state.add(step, values)
        if self._from_store:  # a batch of stored lines spans more than one row's interval
            self._log_rows(state)

    def _histogram(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        import numpy as np
        import wandb

        name, step = _string(entry, "name"), _step(entry)
        counts, edges = _histogram_parts(entry, self.options.histogram_bins)
        histogram = wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
        state.add(step, {prefix + name: histogram})

    def _text(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        name, text, step = _string(entry, "name"), entry.get("text"), _step(entry)
        if not isinstance(text, str):
            raise _Skip("text is not a string")
        table = state.table(prefix + name, ("step", "text"))
        table.rows.append((step, text))
        table.step, table.dirty = step, True

    def _image(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        import wandb

        name, step = _string(entry, "name"), _step(entry)
        path = state.run_dir / _string(entry, "path")  # an absolute path replaces run_dir
        if not path.is_file():
            raise _Skip(f"no image file at {path}")
        caption = entry.get("caption")
        image = wandb.Image(str(path), caption=caption if isinstance(caption, str) else None)
        state.add(step, {prefix + name: image})

    def _config(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        params = entry.get("params")
        if not isinstance(params, dict):
            raise _Skip("params is not a map")
        # wandb's Config.update has no annotations
        state.run.config.update(params, allow_val_change=True)  # type: ignore[no-untyped-call]

    def _hello(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        if prefix:
            return  # the run describes rank 0's process
        config = _run_json_config(state.run_dir)  # re-read: the agent may know git by now
        config["outrider/host"] = batch.source.host
        config["outrider/world_size"] = batch.source.world_size
        argv = entry.get("argv")
        if isinstance(argv, list) and all(isinstance(a, str) for a in argv):
            config["outrider/argv"] = shlex.join(argv)
        for key in ("cwd", "python", "torch"):
            if isinstance(entry.get(key), str):
                config[f"outrider/{key}"] = entry[key]
        state.run.config.update(config, allow_val_change=True)  # type: ignore[no-untyped-call]

    def _alert(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        name, message, step = _string(entry, "name"), _string(entry, "message"), _step(entry)
        severity = entry.get("severity", "warning")
        level = ALERT_LEVELS.get(severity) if isinstance(severity, str) else None
        if level is None:
            raise _Skip(f"severity {severity!r} is not one of {', '.join(ALERT_LEVELS)}")
        table = state.table(ALERTS_KEY, ("step", "severity", "name", "message"))
        table.rows.append((step, severity, name, message))
        table.step, table.dirty = step, True
        if state.mode == "online" and self.options.alerts:
            state.run.alert(title=name[:ALERT_TITLE_CHARS], text=message, level=level)

    def _checkpoint(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        """A checkpoint the agent verified, as a ``model`` artifact of the run: on this sink's
        thread, where W&B's hashing and copying of the file cost the agent, not the trainer."""
        attrs = entry.get("attrs")
        if entry.get("name") != schema.CHECKPOINT_VERIFIED or not isinstance(attrs, dict):
            return
        import wandb

        path = Path(_string(attrs, "path"))
        step = _step(entry)
        try:
            size = path.stat().st_size
        except OSError as exc:
            self._skip_checkpoint("missing", f"{path} is gone ({exc.strerror})")
            return
        limit = self.options.checkpoint_max_bytes
        if size > limit:
            self._skip_checkpoint(
                "too_large", f"{path} is {size} bytes, over checkpoint_max_bytes ({limit})"
            )
            return
        metadata = {"step": step, "size": size, "path": str(path)}
        if isinstance(attrs.get("sha256"), str):
            metadata["sha256"] = attrs["sha256"]
        suffix = f"-{prefix.rstrip('/')}" if prefix else ""
        artifact = wandb.Artifact(f"model-{state.run.id}{suffix}", type="model", metadata=metadata)
        try:
            artifact.add_file(str(path), name=path.name)  # a copy: rotation may delete the file
        except (OSError, ValueError) as exc:
            self._skip_checkpoint("missing", f"{path} could not be read ({exc})")
            return
        aliases = ["latest", "best"] if attrs.get("best") is True else ["latest"]
        state.run.log_artifact(artifact, aliases=aliases)
        self.checkpoint_artifacts += 1

    def _skip_checkpoint(self, reason: str, detail: str) -> None:
        self.checkpoints_skipped[reason] = self.checkpoints_skipped.get(reason, 0) + 1
        logger.warning("outrider sink wandb: checkpoint not logged as an artifact: %s", detail)

    def _run_end(self, state: _Run, batch: Batch, entry: Mapping[str, Any], prefix: str) -> None:
        status = entry.get("exit_status")
        if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
            raise _Skip(f"exit_status {status!r} is not an integer")
        state.exit_status, state.ending = status, True

    # -- delivery ----------------------------------------------------------------------------
    def _log_rows(self, state: _Run, *, last: bool = False) -> None:
        """The gathered rows to W&B; under ``rows_per_second``, folded into one, and only once
        the interval since the last row has passed (``last``: at a run's end, at once)."""
        if not state.rows:
            return
        rate = self.options.rows_per_second
        now = state.record_t if self._from_store else time.monotonic()
        if rate > 0 and not last and now - state.rows_logged_at < 1.0 / rate:
            return
        rows, state.rows = state.rows, []
        state.rows_logged_at = now
        if rate > 0:
            rows = [fold_rows(rows)]
        for step, values in rows:
            if step is not None:
                values[STEP_KEY] = step
            state.run.log(values)  # never step=: trainer/step is the x-axis

    def _log_tables(self, state: _Run, interval: float = 0.0) -> None:
        """Changed tables, each at most once per ``interval``: every log writes the whole table."""
        import wandb

        now = time.monotonic()
        for key, table in state.tables.items():
            if not table.dirty or now - table.logged_at < interval:
                continue
            table.dirty, table.logged_at = False, now
            data = wandb.Table(
                columns=list(table.columns),
                data=[list(row) for row in table.rows],
                allow_mixed_types=True,  # a step may be None
            )
            values: dict[str, Any] = {key: data}
            if table.step is not None:
                values[STEP_KEY] = table.step
            state.run.log(values)

    def _drop(self, reason: str, entries: int) -> None:
        if entries:
            self.dropped[reason] = self.dropped.get(reason, 0) + entries

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and len(self._warned) < 1000:
            self._warned.add(key)
            logger.warning("outrider sink wandb: %s", message)


def _finish_run(run_id: str, run: Run, exit_code: int | None, done: threading.Event) -> None:
    try:
        run.finish(exit_code=exit_code)
    except Exception as exc:
        logger.warning("outrider sink wandb: finishing run %s failed: %s", run_id, exc)
    finally:
        done.set()
