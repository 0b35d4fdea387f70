"""Reading a torchrun command line: nodes, this node's rank, where rank 0 is."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from agent.aggregation import torchrun
from agent.cli.jobs import job_run_id, resolve_job_tier


def test_static_two_node_launch() -> None:
    launch = torchrun.parse(
        ["torchrun", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.1.2.3",
         "--nproc-per-node", "8", "train.py", "--nnodes", "99"]
    )  # fmt: skip
    assert launch is not None
    assert (launch.max_nodes, launch.node_rank, launch.rank0_host) == (2, 1, "10.1.2.3")
    assert launch.multi_node


def test_equals_forms_underscores_and_the_module_launcher() -> None:
    launch = torchrun.parse(
        ["python", "-m", "torch.distributed.run", "--nnodes=1:4", "--rdzv_endpoint=[::1]:29400",
         "--rdzv-id=job42", "--standalone", "train.py"]
    )  # fmt: skip
    assert launch is not None
    assert (launch.max_nodes, launch.rank0_host, launch.job_id) == (4, "::1", "job42")
    assert launch.node_rank is None


def test_not_torchrun_and_single_node() -> None:
    assert torchrun.parse(["python", "train.py"]) is None
    single = torchrun.parse(["torchrun", "--standalone", "--nproc-per-node", "2", "t.py"])
    assert single is not None and not single.multi_node
    assert torchrun.parse(["torchrun", "--rdzv-id", "none", "t.py"]).job_id is None  # type: ignore[union-attr]


def test_job_tier_auto_serves_on_node_rank_zero_only() -> None:
    said: list[str] = []
    base = ["torchrun", "--nnodes", "2", "--master-addr", "127.0.0.1", "t.py"]
    zero = resolve_job_tier([*base[:3], "--node-rank", "0", *base[3:]], "auto", None, None,
                            False, said.append)  # fmt: skip
    one = resolve_job_tier([*base[:3], "--node-rank", "1", *base[3:]], "auto", None, None,
                           False, said.append)  # fmt: skip
    assert zero is not None and one is not None
    assert zero.serve and not one.serve
    assert zero.forward_to == one.forward_to == "127.0.0.1:29460"
    assert resolve_job_tier(["python", "t.py"], "auto", None, None, False, said.append) is None
    assert resolve_job_tier(base, "off", None, None, False, said.append) is None


def test_job_tier_off_loopback_needs_keys(tmp_path: Path) -> None:
    command = ["torchrun", "--nnodes", "2", "--master-addr", "10.0.0.5", "t.py"]
    with pytest.raises(click.UsageError, match="--keys"):
        resolve_job_tier(command, "auto", None, None, False, print)
    tier = resolve_job_tier(command, "auto", None, tmp_path, False, print)
    assert tier is not None and tier.keys_dir == tmp_path
    assert resolve_job_tier(command, "auto", None, None, True, print) is not None


def test_job_run_id_prefers_the_given_id() -> None:
    command = ["torchrun", "--nnodes", "2", "--rdzv-id", "r9", "t.py"]
    assert job_run_id(command, "mine") == "mine"
    assert job_run_id(command, None) == "r9"
    assert job_run_id(["python", "t.py"], None) is None
