"""Who is sending: run id, ranks, host and pid of this stream.

Read from the variables `outrider run` and `torchrun` set, so the one-line
``probe.init()`` needs no arguments in the common cases.
"""

from __future__ import annotations

import binascii
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from probe import protocol


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        return default


def new_run_id() -> str:
    """A sortable, collision-resistant run id: ``YYYYmmdd-HHMMSS-xxxxxx``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
    return f"{stamp}-{binascii.hexlify(os.urandom(3)).decode()}"


def host_name() -> str:
    """The host this process reports: OUTRIDER_HOST, else the hostname (a Pod's is its own
    name; the node's comes in through the downward API)."""
    return os.environ.get(protocol.ENV_HOST) or socket.gethostname()


def trainer_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables that shape how this trainer runs (protocol.TRAINER_ENV_PREFIXES), for
    run.json: sorted, at most MAX_TRAINER_ENV_VARS, values cut, nothing named like a secret."""
    source = os.environ if environ is None else environ
    kept: dict[str, str] = {}
    for name in sorted(source):
        if len(kept) >= protocol.MAX_TRAINER_ENV_VARS:
            break
        upper = name.upper()
        if not upper.startswith(protocol.TRAINER_ENV_PREFIXES):
            continue
        if any(marker in upper for marker in protocol.SECRET_ENV_MARKERS):
            continue
        value = source[name]
        if isinstance(value, str):
            kept[name] = value[: protocol.MAX_TRAINER_ENV_CHARS]
    return kept


def new_stream_id() -> str:
    """Random per-process stream id; a forked child draws a new one."""
    return binascii.hexlify(os.urandom(6)).decode()


@dataclass
class Identity:
    run: str
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    host: str = field(default_factory=host_name)
    pid: int = field(default_factory=os.getpid)
    stream: str = field(default_factory=new_stream_id)
    restart: int = field(default_factory=lambda: _env_int("TORCHELASTIC_RESTART_COUNT", 0))

    @classmethod
    def from_env(
        cls,
        run: str | None = None,
        rank: int | None = None,
        local_rank: int | None = None,
        world_size: int | None = None,
    ) -> Identity:
        """Fill what the caller left out from OUTRIDER_RUN_ID and torchrun's RANK etc."""
        run_id = (
            run
            or os.environ.get(protocol.ENV_RUN_ID)
            or os.environ.get("TORCHELASTIC_RUN_ID")
            or new_run_id()
        )
        return cls(
            run=run_id,
            rank=rank if rank is not None else _env_int("RANK", 0),
            local_rank=local_rank if local_rank is not None else _env_int("LOCAL_RANK", 0),
            world_size=world_size if world_size is not None else _env_int("WORLD_SIZE", 1),
        )

    def envelope(self) -> dict[str, object]:
        keys = (*protocol.ENVELOPE_KEYS, *protocol.OPTIONAL_ENVELOPE)
        return {key: getattr(self, key) for key in keys}

    def forked(self) -> Identity:
        """The identity of a forked child: same run and ranks, its own pid and stream."""
        return Identity(
            run=self.run,
            rank=self.rank,
            local_rank=self.local_rank,
            world_size=self.world_size,
            host=self.host,
            restart=self.restart,
        )
