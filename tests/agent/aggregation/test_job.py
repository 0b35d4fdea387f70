"""The aggregator's view of one job: items in, a job run store and run.json out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from agent.aggregation import wire
from agent.aggregation.config import AggregationSettings
from agent.aggregation.job import JobView
from agent.store.run_store import RunStore
from tests.agent.aggregation.factory import summary


class Node:
    """One node agent's uplink stream: numbers its items as the Uplink does."""

    def __init__(self, name: str, agent: str = "a1") -> None:
        self.envelope = {"job": "job", "node": name, "agent": agent, "pid": 7}
        self.seq = 0

    def item(self, kind: str, body: dict[str, Any]) -> wire.Item:
        """The next item; heartbeats, accounting and bye carry the stream's counters, as
        the Uplink adds them (and wire.decode requires)."""
        seq, self.seq = self.seq, self.seq + 1
        if kind in wire.COUNTER_KINDS and "uplink" not in body:
            body = {**body, "uplink": {"produced": self.seq, "dropped": {}}}
        return wire.Item(kind, seq, 1.0 + seq, body)

    def bye(self, dropped: dict[str, int] | None = None) -> wire.Item:
        counters = {"produced": self.seq + 1, "dropped": dropped or {}}
        return self.item(wire.BYE, {"uplink": counters})


def ledger(stream: str, rank: int, sent: int, received: int, lost: int = 0) -> dict[str, Any]:
    return {"stream": stream, "rank": rank, "sent": sent, "received": received,
            "dropped": {"queue_full": sent - received - lost}, "not_stored": {},
            "lost": lost, "complete": True}  # fmt: skip


def view(tmp_path: Path, clock: list[float] | None = None) -> JobView:
    now = clock if clock is not None else [0.0]
    return JobView(RunStore(tmp_path, "job"), AggregationSettings(), lambda: now[0])


def lines(store: RunStore) -> list[dict[str, Any]]:
    store.flush()
    return [orjson.loads(x) for x in (store.dir / "metrics.jsonl").read_bytes().splitlines()]


def test_windows_are_stored_sent_per_rank_and_judged(tmp_path: Path) -> None:
    job = view(tmp_path)
    nodes = [Node("node0"), Node("node1")]
    outs = []
    for index in range(3):
        for rank in range(8):
            node = nodes[rank // 4]
            body = summary(rank, index, {"loss": 2.0 - index}, {"step_time_seconds/p50": 0.1},
                           world_size=8)  # fmt: skip
            outs += job.take(node.envelope, node.item(wire.WINDOW, body))
    assert len(outs) == 3 * 8 * 2  # each window: its summary and its scalars line, per rank
    assert all(out.per_rank and out.rank >= 0 for out in outs)
    scalars = [o.entry for o in outs if o.entry["kind"] == "scalars" and o.rank == 5]
    assert [(s["step"], s["metrics"]["loss"]) for s in scalars] == [
        (99, 2.0),
        (199, 1.0),
        (299, 0.0),
    ]
    judged = job.judge()
    assert job.judged == 3  # every window complete: all judged
    job_lines = [o.entry for o in judged if o.entry["kind"] == "scalars"]
    assert [x["metrics"]["job/ranks_reporting"] for x in job_lines] == [8.0, 8.0, 8.0]
    assert all(not o.per_rank and o.rank == -1 for o in judged)
    state = job.view()["job"]
    assert [r["rank"] for r in state["ranks"]] == list(range(8))
    assert {r["host"] for r in state["ranks"]} == {"node0", "node1"}
    assert state["extremes"]["loss"]["min"] == 0.0


def test_both_tiers_add_up_per_node(tmp_path: Path) -> None:
    job = view(tmp_path)
    node = Node("node0")
    streams = [ledger("s0", 0, 100, 97, lost=1), ledger("s1", 1, 50, 50)]
    job.take(node.envelope, node.item(wire.HELLO, {"heartbeat_seconds": 2.0}))
    job.take(node.envelope, node.item(wire.ACCOUNTING, {"streams": streams}))
    node.item(wire.HEARTBEAT, {})  # made by the node, lost on the way
    assert job.take(node.envelope, node.bye({"backlog_full": 0})) == []
    accounting = job.view()["job"]["nodes"]["node0"]
    assert accounting["records"] == {"sent": 150, "received": 147, "dropped": 2, "lost": 1,
                                     "not_stored": 0}  # fmt: skip
    assert accounting["uplink"] == {"sent": 4, "received": 3, "dropped": 0, "lost": 1}
    assert accounting["complete"]
    assert job.view()["status"] == "finished"


def test_a_repeated_item_is_not_taken_twice(tmp_path: Path) -> None:
    job = view(tmp_path)
    node = Node("node0")
    item = node.item(wire.WINDOW, summary(0, 0, {"loss": 1.0}))
    assert job.take(node.envelope, item)
    assert job.take(node.envelope, item) == []
    assert len([x for x in lines(job.store) if x["kind"] == "summary"]) == 1


def test_odd_bodies_cost_nothing_else(tmp_path: Path) -> None:
    """Well-typed msgpack of the wrong shape: the view stays whole and run.json writable."""
    job = view(tmp_path)
    node = Node("node0")
    odd = {**summary(0, 0), "metrics": ["not", "a", "map"], "derived": 3}
    job.take(node.envelope, node.item(wire.WINDOW, odd))
    job.take(node.envelope, node.item(wire.EVENT, {"kind": "event", "rank": 0, "body": [1]}))
    bad = [{"stream": "s", "sent": "many"}, {"stream": "t", "dropped": [1]}, 7]
    job.take(node.envelope, node.item(wire.ACCOUNTING, {"streams": bad}))
    job.take(
        node.envelope, node.item(wire.HELLO, {"meta": {"status": "hijacked", "command": ["x"]}})
    )
    assert job.view()["job"]["nodes"]["node0"]["streams"] == []
    assert job.store.write_info()
    info = orjson.loads((job.store.dir / "run.json").read_bytes())
    assert info["status"] == "running" and info["command"] == ["x"]


def test_a_restarted_aggregator_picks_the_ledgers_up(tmp_path: Path) -> None:
    first = view(tmp_path)
    node = Node("node0")
    for _ in range(5):
        first.take(
            node.envelope, node.item(wire.HEARTBEAT, {"uplink": {"produced": 5, "dropped": {}}})
        )
    first.take(node.envelope, node.item(wire.WINDOW, summary(2, 0, {"loss": 1.0})))
    assert first.store.write_info()
    second = view(tmp_path)
    node.item(wire.HEARTBEAT, {})  # in flight when the first one died
    second.take(node.envelope, node.bye())
    uplink = second.view()["job"]["nodes"]["node0"]["uplink"]
    assert uplink == {"sent": 8, "received": 7, "dropped": 0, "lost": 1}
    assert [r["rank"] for r in second.view()["job"]["ranks"]] == [2]


def test_run_json_takes_a_big_view_less_often(tmp_path: Path) -> None:
    clock = [100.0]
    job = view(tmp_path, clock)
    node = Node("node0")
    for rank in range(2000):
        job.take(node.envelope, node.item(wire.WINDOW, summary(rank, 0, {"loss": 1.0})))
    assert job.view_due(clock[0])
    job.wrote_view(clock[0])
    clock[0] += 1.5
    assert not job.view_due(clock[0])  # 2,000 ranks: every 3 s
    clock[0] += 1.6
    assert job.view_due(clock[0])
    job.wrote_view(clock[0])
    job.take(node.envelope, node.bye())
    assert job.view_due(clock[0])  # the last node's bye is written at once


def test_a_node_gone_quiet_without_its_bye_is_named_once(tmp_path: Path) -> None:
    clock = [50.0]
    job = view(tmp_path, clock)
    quiet, done = Node("node0"), Node("node1")
    job.take(quiet.envelope, quiet.item(wire.HEARTBEAT, {}))
    job.take(done.envelope, done.bye())
    clock[0] += 9.0
    assert job.judge() == []
    clock[0] += 2.0  # 11 s: past 5 heartbeats of 2 s and past 10 s
    alerts = [out.entry for out in job.judge()]
    assert [(a["name"], a["attrs"]["host"]) for a in alerts] == [("node_silent", "node0")]
    assert "node agent" in alerts[0]["advice"]
    clock[0] += 30.0
    assert job.judge() == []  # once per silence
    job.take(quiet.envelope, quiet.item(wire.HEARTBEAT, {}))
    clock[0] += 11.0
    assert [out.entry["name"] for out in job.judge()] == ["node_silent"]
    assert job.store.write_info()
    restarted = view(tmp_path, clock)  # an aggregator restarted: nodes are not silent yet
    assert set(restarted.nodes) == {"node0", "node1"}
    assert restarted.judge() == []
    clock[0] += 11.0
    assert [out.entry["attrs"]["host"] for out in restarted.judge()] == ["node0"]
