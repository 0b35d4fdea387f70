"""A real agent process under generated hostile input (hypothesis), good records around it.

Every generated message goes to ``outrider agent`` over its ipc socket, followed by a
good record of a well-behaved stream. After each example the agent must be alive and
have stored the good stream up to date; at the end its counters in run.json must name
each rejection by reason exactly as the decoder (the oracle, run here on the same
bytes) says, and every record the decoder accepts must have been stored (a scalar
block, stored or refused, counts as its records).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.ingest.decode import Rejected, ScalarRows, decode
from tests.agent.ingest.hostile import hostile_message
from tests.helpers import AgentProcess, GoodStream, Pusher, lines, run_info

GOOD_RUN = "good-run"
FUZZ_RUNS = ("fuzz-a", "fuzz-b")


@dataclass
class Expected:
    """What the agent must have counted, according to the decoder run on the same bytes."""

    messages: int = 0
    records: int = 0
    rejected_messages: dict[str, int] = field(default_factory=dict)
    rejected_records: dict[str, int] = field(default_factory=dict)
    #: what the input exercised: records refused for a number out of range, blocks
    #: stored, blocks refused
    out_of_range: int = 0
    blocks_stored: int = 0
    block_records_refused: int = 0

    def count(self, table: dict[str, int], reason: str) -> None:
        table[reason] = table.get(reason, 0) + 1


def oracle(raw: bytes, expected: Expected) -> None:
    """Count what the agent will count for ``raw``."""
    expected.messages += 1
    try:
        message = decode(raw)
    except Rejected as rejected:
        expected.count(expected.rejected_messages, rejected.reason)
        return
    expected.records += message.count
    expected.blocks_stored += sum(isinstance(item, ScalarRows) for item in message.records)
    for reason, detail in message.rejected:
        expected.count(expected.rejected_records, reason)
        expected.out_of_range += "2**53-1" in detail or "64-bit" in detail
        expected.block_records_refused += "block" in detail


def test_agent_survives_generated_hostile_input_and_counts_every_rejection(
    tmp_path: Path,
) -> None:
    """Generated bombs, garbage, spoiled records and blocks, seqs, steps and counters past
    their bounds: the agent lives, stores every good record and every accepted one, and
    counts each rejection by the decoder's reason."""
    agent = AgentProcess(tmp_path)
    expected = Expected()
    good = GoodStream(GOOD_RUN)
    try:
        with Pusher(agent.endpoint) as push:

            @settings(max_examples=100)
            @given(st.lists(hostile_message(FUZZ_RUNS), min_size=1, max_size=12))
            def send(messages: list[bytes]) -> None:
                for raw in messages:
                    oracle(raw, expected)
                    push.send(raw)
                    push.send(good.message(1))
                    expected.messages += 1
                    expected.records += 1
                agent.wait_lines(GOOD_RUN, good.sent)

            send()
        assert agent.alive, agent.stderr()
        assert agent.stop() == 0, agent.stderr()
    finally:
        agent.kill()

    stored = lines(agent.run_dir(GOOD_RUN))
    assert [line["seq"] for line in stored] == list(range(good.sent))
    counters = run_info(agent.run_dir(GOOD_RUN))["agent"]
    assert counters["messages"] == expected.messages
    assert counters["rejected_messages"] == expected.rejected_messages
    assert counters["rejected_records"] == expected.rejected_records
    assert counters["records"] == expected.records
    # every accepted record is a line of its run (the ledgers agree)
    fuzz_dirs = [agent.run_dir(run) for run in FUZZ_RUNS if agent.run_dir(run).exists()]
    fuzz_lines = sum(len(lines(run_dir)) for run_dir in fuzz_dirs)
    fuzz_received = sum(s["received"] for d in fuzz_dirs for s in run_info(d)["streams"])
    assert fuzz_lines == fuzz_received == expected.records - good.sent
    assert expected.rejected_messages and expected.rejected_records and fuzz_lines
    assert expected.out_of_range and expected.blocks_stored and expected.block_records_refused
