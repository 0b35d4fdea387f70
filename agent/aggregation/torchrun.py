"""What a ``torchrun`` command line says about the job: nodes, this node's rank, rank 0's host.

``outrider run -- torchrun --nnodes 2 --node-rank 0 --master-addr HOST ...``
needs no aggregation options: a multi-node launch forwards to an aggregator
at rank 0's host (``--master-addr``, or the ``--rdzv-endpoint`` host), and the
node of node rank 0 starts it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: the launchers we read (``python -m torch.distributed.run`` too)
LAUNCHERS = frozenset({"torchrun"})
MODULES = frozenset({"torch.distributed.run", "torch.distributed.launch"})

_VALUES = {
    "nnodes": "nnodes",
    "node-rank": "node_rank",
    "master-addr": "master_addr",
    "rdzv-endpoint": "rdzv_endpoint",
    "rdzv-id": "rdzv_id",
}


#: torchrun's options that take no value; every other option takes one
_FLAGS = frozenset({"standalone", "no-python", "run-path", "log-line-prefix-template-off"})


@dataclass(frozen=True)
class TorchrunLaunch:
    """The job-level options of one torchrun command line (None: not given)."""

    nnodes: str | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    rdzv_endpoint: str | None = None
    rdzv_id: str | None = None

    @property
    def max_nodes(self) -> int:
        """``--nnodes N`` or ``MIN:MAX`` -> the most nodes the job may have (1 if unsure)."""
        text = (self.nnodes or "1").rpartition(":")[2]
        try:
            return int(text)
        except ValueError:
            return 1

    @property
    def multi_node(self) -> bool:
        return self.max_nodes > 1

    @property
    def rank0_host(self) -> str | None:
        """Where rank 0's node is: ``--master-addr``, else the rendezvous endpoint's host."""
        if self.master_addr:
            return self.master_addr
        if self.rdzv_endpoint:
            host = self.rdzv_endpoint.rpartition(":")[0] or self.rdzv_endpoint
            return host.strip("[]")
        return None

    @property
    def job_id(self) -> str | None:
        """A run id every node shares: ``--rdzv-id`` unless it is torchrun's placeholder."""
        return self.rdzv_id if self.rdzv_id and self.rdzv_id != "none" else None


def parse(command: list[str]) -> TorchrunLaunch | None:
    """The torchrun options of ``command``; None when it is not a torchrun launch."""
    if not command:
        return None
    args: list[str]
    if os.path.basename(command[0]) in LAUNCHERS:
        args = command[1:]
    elif len(command) >= 3 and command[1] == "-m" and command[2] in MODULES:
        args = command[3:]
    else:
        return None
    found: dict[str, str] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if token == "--" or not token.startswith("-") or token in ("-m", "--module"):
            break  # the script (or module) and its own arguments start here
        name, sep, value = token.lstrip("-").partition("=")
        name = name.replace("_", "-")
        if not sep and name not in _FLAGS and index + 1 < len(args):
            value = args[index + 1]
            index += 1
        key = _VALUES.get(name)
        if key is not None:
            found[key] = value
        index += 1
    node_rank = found.pop("node_rank", None)
    try:
        rank = int(node_rank) if node_rank is not None else None
    except ValueError:
        rank = None
    return TorchrunLaunch(node_rank=rank, **found)
