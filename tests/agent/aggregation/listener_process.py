"""A stand-in aggregator for the transport tests: a Listener in its own process.

``python -P -m tests.agent.aggregation.listener_process BIND KEYS_DIR|- STATE [RESTORE]``
prints its endpoint, then decodes every message into per-stream ledgers and
writes what it knows to STATE (JSON, replaced atomically) after each burst,
so a test can read it even after SIGKILL. RESTORE is a previous STATE whose
ledgers it continues, like an aggregator restarted from its run.json.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from agent.aggregation import wire
from agent.aggregation.ledger import UplinkLedger
from agent.aggregation.listener import Listener


def main(bind: str, keys: str, state_path: Path, restore: Path | None) -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    listener = Listener(bind, keys_dir=None if keys == "-" else Path(keys))
    ledgers: dict[str, UplinkLedger] = {}
    streams: dict[str, dict[str, Any]] = {}  # per agent id: order and window checks
    if restore is not None:
        for summary in orjson.loads(restore.read_bytes())["ledgers"]:
            ledger = UplinkLedger(summary["job"], summary["node"], summary["agent"], summary["pid"])
            ledger.restore(summary)
            ledgers[ledger.agent] = ledger
    rejected: dict[str, int] = {}
    messages = 0
    print(listener.endpoint, flush=True)
    last_write = 0.0
    changed = True
    while not stop:
        if listener.wait(50):
            for raw in listener.burst():
                messages += 1
                changed = True
                try:
                    message = wire.decode(raw)
                except wire.Rejected as exc:
                    rejected[exc.reason] = rejected.get(exc.reason, 0) + 1
                    continue
                for reason, _ in message.rejected:
                    rejected[reason] = rejected.get(reason, 0) + 1
                agent = message.envelope["agent"]
                ledger = ledgers.get(agent)
                if ledger is None:
                    ledger = ledgers[agent] = UplinkLedger.from_envelope(message.envelope)
                seen = streams.setdefault(
                    agent, {"last_seq": -1, "out_of_order": 0, "windows": 0, "last_i": -1}
                )
                for item in message.items:
                    ledger.observe(item)
                    if item.seq <= seen["last_seq"]:
                        seen["out_of_order"] += 1
                    seen["last_seq"] = item.seq
                    if item.kind == wire.WINDOW:
                        seen["windows"] += 1
                        if item.body.get("i", -1) <= seen["last_i"]:
                            seen["out_of_order"] += 1
                        seen["last_i"] = item.body.get("i", -1)
        now = time.monotonic()
        if changed or now - last_write > 0.2:
            state = {
                "endpoint": listener.endpoint,
                "messages": messages,
                "rejected": rejected,
                "counters": listener.counters(),
                "ledgers": [ledger.summary() for ledger in ledgers.values()],
                "streams": streams,
            }
            temporary = state_path.with_suffix(".tmp")
            temporary.write_bytes(orjson.dumps(state))
            os.replace(temporary, state_path)
            last_write, changed = now, False
    listener.close()


if __name__ == "__main__":
    main(
        sys.argv[1],
        sys.argv[2],
        Path(sys.argv[3]),
        Path(sys.argv[4]) if len(sys.argv) > 4 else None,
    )
