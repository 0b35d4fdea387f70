"""The wire format shared by the probe and the agent (see docs/protocol.md).

One ZeroMQ message is one msgpack array ``[VERSION, envelope, records]``. The
envelope names the stream the records come from, so the identity fields every
record carries (run id, ranks, host, pid) travel once per batch. A record is
``[kind, seq, t, step, body]``: ``seq`` counts every record the stream ever
produced (dropped ones included), which is what lets the agent prove that
received + dropped == sent.

Version 2 adds the scalar block, ``[SCALAR_ROWS, names, seqs, ts, steps,
rows]``: consecutive ``scalars`` records with the same metric names, the
names once and each record's values as one array in their order. A trainer
logs the same names step after step, so most of a batch is one block.

This module is imported by the probe at start-up, so it holds constants only.
"""

from __future__ import annotations

from typing import Final

VERSION: Final = 2
#: versions the agent reads: 1 (no scalar blocks) from probes older than this one
READABLE_VERSIONS: Final = frozenset({1, 2})

# Record kinds.
HELLO: Final = "hello"
SCALARS: Final = "scalars"
TENSOR: Final = "tensor"
TEXT: Final = "text"
EVENT: Final = "event"
CONFIG: Final = "config"
HEARTBEAT: Final = "heartbeat"
PROBE_STATS: Final = "probe_stats"
BYE: Final = "bye"
RUN_END: Final = "run_end"  # sent by `outrider run` once the trainer has exited

# The scalar block of version 2: not a record kind of its own; it carries `scalars` records.
SCALAR_ROWS: Final = "scalar_rows"

KINDS: Final = frozenset(
    {HELLO, SCALARS, TENSOR, TEXT, EVENT, CONFIG, HEARTBEAT, PROBE_STATS, BYE, RUN_END}
)

#: the event ``probe.benchmark_inference`` logs its whole result in; `outrider show` reads it
INFERENCE_EVENT: Final = "inference_benchmark"

# Envelope keys: what identifies a stream (one sender in one process).
ENVELOPE_KEYS: Final = ("run", "stream", "rank", "local_rank", "world_size", "host", "pid")
#: Envelope keys a probe may leave out, with the value an agent assumes. ``restart`` is
#: torchrun's restart count (TORCHELASTIC_RESTART_COUNT): a global rank names a different
#: process after each restart, so the job tier keys a rank's data by (host, local rank,
#: restart), never by the rank alone.
OPTIONAL_ENVELOPE: Final = {"restart": 0}

# Reasons the probe drops a record; each is counted and reported in probe_stats.
DROP_QUEUE_FULL: Final = "queue_full"  # the training thread outran the sender
DROP_NO_AGENT: Final = "no_agent"  # nothing was connected when the batch was sent
DROP_BACKPRESSURE: Final = "backpressure"  # connected, but the ZeroMQ high-water mark was hit
DROP_TOO_LARGE: Final = "too_large"  # a tensor or text over the size limit
DROP_UNENCODABLE: Final = "unencodable"  # a value msgpack cannot carry
DROP_SHUTDOWN: Final = "shutdown"  # still queued when the exit flush timed out
DROP_REASONS: Final = (
    DROP_QUEUE_FULL,
    DROP_NO_AGENT,
    DROP_BACKPRESSURE,
    DROP_TOO_LARGE,
    DROP_UNENCODABLE,
    DROP_SHUTDOWN,
)

# Hard limits; the agent enforces them on decode, the probe stays under them.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
MAX_TENSOR_BYTES: Final = 8 * 1024 * 1024
MAX_TEXT_CHARS: Final = 64 * 1024
MAX_NAME_CHARS: Final = 256
MAX_RECORDS_PER_MESSAGE: Final = 4096
MAX_METRICS_PER_RECORD: Final = 1024
MAX_HISTOGRAM_BINS: Final = 512  # W&B's limit, and plenty for TensorBoard

#: The trainer's environment variables its hello carries (run.json ``environment``): those
#: that set how it runs on its devices and in its job, matched by name prefix. A name that
#: looks like a credential is never sent, whatever its prefix; values are cut to a length.
TRAINER_ENV_PREFIXES: Final = (
    "CUDA_",
    "CUDNN_",
    "CUBLAS_",
    "NCCL_",
    "NVIDIA_",
    "TORCH_",
    "PYTORCH_",
    "TORCHELASTIC_",
    "OMP_",
    "MKL_",
    "KMP_",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_JOB_",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "SLURM_NODEID",
)
SECRET_ENV_MARKERS: Final = ("TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH")
MAX_TRAINER_ENV_VARS: Final = 64
MAX_TRAINER_ENV_CHARS: Final = 256

# Environment variables set by `outrider run` and read by `probe.init()`.
ENV_ENDPOINT: Final = "OUTRIDER_ENDPOINT"
ENV_RUN_ID: Final = "OUTRIDER_RUN_ID"
ENV_DISABLED: Final = "OUTRIDER_DISABLED"
ENV_QUEUE_SIZE: Final = "OUTRIDER_QUEUE_SIZE"
ENV_FLUSH_INTERVAL: Final = "OUTRIDER_FLUSH_INTERVAL"
ENV_BUSY_FLUSH_INTERVAL: Final = "OUTRIDER_BUSY_FLUSH_INTERVAL"
#: the `host` label of a trainer's and an agent's series (default: the hostname); in
#: Kubernetes, the node's name from the downward API
ENV_HOST: Final = "OUTRIDER_HOST"
