"""A million hostile messages through a real agent: it must live, count and store.

Why: the agent's promise is that no input can stop it (docs/protocol.md, "What the
agent refuses"). This script pushes ``--messages`` generated messages (default
1,000,000) at a real ``outrider agent`` process on an ipc socket, statistics and
alerts on: garbage, truncated and bit-flipped messages, msgpack bombs (an array32
header claiming 2**32 - 1 elements, a map16 claiming more pairs than it holds,
4 GiB strings, 100,000 levels of nesting), wrong versions and envelopes, wrong types
in every field, NaN/negative/huge steps, sequence numbers and probe counters (up to
2**64 - 1), unicode and 10 kB metric names, replayed and reordered sequence numbers,
too many records, oversized messages, scalar blocks (version 2) good, spoiled in one
place, past the record limit and inside version 1 messages, and records of every kind
that are fine. A good stream sends one record after every few hostile messages.

The decoder, run here on the same bytes, is the oracle: the agent's counters in
run.json (``agent.rejected_messages`` / ``rejected_records``, ``records``) must equal
what it says, reason by reason (a block counts as its records, stored or refused), and
every good record must be in metrics.jsonl exactly once. Messages are drawn from a
pool made once (``--seed``) and, one in three, mutated on the way (a flipped byte, a
cut).

Exit status: 0 when the agent lived, counted every rejection as the oracle did and
stored every good record; 1 otherwise.

    python bench/fuzz_agent.py                  # 1,000,000 messages
    python bench/fuzz_agent.py --quick          # 50,000, a few seconds
"""

from __future__ import annotations

import argparse
import math
import random
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import orjson
import zmq
from _common import machine, print_table, short_ipc_endpoint, start_agent, stop_agent

from agent.ingest.decode import Rejected, decode
from agent.store.registry import MAX_OPEN_RUNS
from probe import protocol

GOOD_RUN = "fuzz-good"
RUNS = tuple(f"fuzz-{i}" for i in range(4))
GOOD_EVERY = 10  # a good record after this many hostile messages
#: seqs and probe counts are integers of 0..2**53-1, steps 64-bit (docs/protocol.md)
HUGE = (2**53 - 1, 2**53, 2**62 - 1, 2**63 - 1, 2**63, 2**64 - 1)
HOSTILE_VALUES: tuple[Any, ...] = (
    None,
    True,
    False,
    -1,
    0,
    2**31,
    -(2**63),
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x",
    "é" * 300,
    "x" * 10_000,
    b"",
    b"\x00\xff",
    [],
    [1, [2, [3]]],
    {},
    {"k": {"k": {"k": 1}}},
    msgpack.ExtType(7, b"\x01"),
    msgpack.Timestamp(0),
    *HUGE,
)


def envelope(run: str, stream: str, **changes: Any) -> dict[str, Any]:
    env = {
        "run": run,
        "stream": stream,
        "rank": 0,
        "local_rank": 0,
        "world_size": 1,
        "host": "fuzz",
        "pid": 1,
    }
    env.update(changes)
    return env


def pack(version: Any, env: Any, records: Any) -> bytes:
    return msgpack.packb([version, env, records], use_bin_type=True)  # type: ignore[no-any-return]


class Generators:
    """Hand-rolled generators, one per kind of trouble; each returns one message."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.values = HOSTILE_VALUES
        self.seq = 0

    def run(self) -> str:
        return self.rng.choice(RUNS)

    def stream(self) -> str:
        return self.rng.choice(("a", "b", "c"))

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def name(self) -> str:
        rng = self.rng
        return rng.choice(
            (
                f"loss/{rng.randrange(50)}",
                "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 40))),
                "n" * protocol.MAX_NAME_CHARS,
                "n" * (protocol.MAX_NAME_CHARS + 1),
                "x" * 10_000,
                "",
                "🚀/ünïcødé",
            )
        )

    def good_record(self) -> list[Any]:
        rng, seq, t = self.rng, self.next_seq(), time.time()
        kind = rng.choice(
            ("scalars", "scalars", "scalars", "text", "event", "config", "tensor", "histogram")
        )
        step = rng.choice((None, rng.randrange(10**6), -rng.randrange(100), 2**62 - 1))
        if kind == "scalars":
            body = {f"m/{rng.randrange(30)}": rng.choice((rng.random(), 7, math.nan, -math.inf))}
            return [protocol.SCALARS, seq, t, step, body]
        if kind == "text":
            return [
                protocol.TEXT,
                seq,
                t,
                step,
                {"name": "sample", "text": "t" * rng.randrange(99)},
            ]
        if kind == "event":
            attrs = {"path": "ckpt.pt", "n": rng.randrange(9)}
            return [protocol.EVENT, seq, t, step, {"name": "ckpt", "attrs": attrs}]
        if kind == "config":
            return [protocol.CONFIG, seq, t, None, {"params": {"lr": rng.random(), "d": [1, 2]}}]
        data = struct.pack("<4d", rng.random(), -1.7e308, 1.7e308, math.nan)
        body: dict[str, Any] = {"name": "w", "dtype": "float64", "shape": [4], "data": data}
        if kind == "histogram":
            body.update({"as": "histogram", "bins": rng.choice((8, 512, 10**6))})
        return [protocol.TENSOR, seq, t, step, body]

    def block(self, rows: int = 0, width: int = 0) -> list[Any]:
        """A good scalar block: ``rows`` records (2-9 when 0) of ``width`` metrics."""
        rng, t = self.rng, time.time()
        rows = rows or rng.randrange(2, 10)
        names = [f"m/{i}" for i in range(width or rng.randrange(1, 12))]
        first = self.seq + 1
        self.seq += rows
        seqs = list(range(first, first + rows))
        values = (rng.random(), 7, math.nan, -math.inf)
        return [
            protocol.SCALAR_ROWS,
            names,
            seqs,
            [t] * rows,
            [rng.choice((None, seq, -seq, 2**63 - 1)) for seq in seqs],
            [[rng.choice(values) for _ in names] for _ in seqs],
        ]

    # -- one method per kind of trouble -------------------------------------------------
    def good_kinds(self) -> bytes:
        records = [self.good_record() for _ in range(self.rng.randrange(1, 8))]
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), records)

    def garbage(self) -> bytes:
        return self.rng.randbytes(self.rng.randrange(0, 200))

    def truncated(self) -> bytes:
        whole = self.good_kinds()
        return whole[: self.rng.randrange(len(whole))]

    def flipped(self) -> bytes:
        data = bytearray(self.good_kinds())
        for _ in range(self.rng.randrange(1, 5)):
            data[self.rng.randrange(len(data))] = self.rng.randrange(256)
        return bytes(data)

    def bomb(self) -> bytes:
        head = b"\x93\x01" + msgpack.packb(envelope(self.run(), self.stream()))
        return self.rng.choice(
            (
                head + b"\xdd\xff\xff\xff\xff",  # array32 claiming 2**32 - 1 records
                head + b"\xdf\xff\xff\xff\xff",  # map32 claiming 2**32 - 1 pairs
                head + b"\x91\x95\xa7scalars\x01\xcb" + bytes(8) + b"\x00\xde\xff\xff\xa1a",
                head + b"\x91\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
                head + b"\x91\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
                b"\xdd\xff\xff\xff\xff",
                b"\x93\x01" + b"\x91" * 100_000 + b"\xc0",  # 100,000 levels deep
                head + b"\x91" * 100_000 + b"\xc0",
            )
        )

    def wrong_version(self) -> bytes:
        version = self.rng.choice((0, 3, -1, "1", 2.0, None, [1], 2**64 - 1))
        return pack(version, envelope(self.run(), self.stream()), [self.good_record()])

    def bad_envelope(self) -> bytes:
        env: Any = envelope(self.run(), self.stream())
        key = self.rng.choice(protocol.ENVELOPE_KEYS)
        env[key] = self.rng.choice((*self.values, "../etc", "a/b", ".x", "r" * 200))
        if self.rng.random() < 0.2:
            env = self.rng.choice(self.values)
        return pack(protocol.VERSION, env, [self.good_record()])

    def wrong_types(self) -> bytes:
        records = []
        for _ in range(self.rng.randrange(1, 6)):
            record = self.good_record()
            where = self.rng.randrange(6)
            value = self.rng.choice(self.values)
            if where < 5:
                record[where] = value
            elif record[4]:
                record[4][self.rng.choice(list(record[4]))] = value
            records.append(record)
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), records)

    def numbers(self) -> bytes:
        rng, t = self.rng, time.time()
        seq = rng.choice((self.next_seq(), -1, -(2**63), *HUGE))
        step = rng.choice((None, -5, -(2**63), *HUGE, math.nan, math.inf, 1.5))
        value = rng.choice((math.nan, math.inf, -math.inf, 1e308, -0.0, 2**63 - 1, -(2**63)))
        t = rng.choice((t, math.nan, -math.inf, 0.0, 1e300, -1.0))
        record = [protocol.SCALARS, seq, t, step, {"v": value}]
        if rng.random() < 0.3:  # a probe counter or the drops' sum at or past 2**53 - 1
            count = rng.choice((-1, *HUGE))
            kind = rng.choice((protocol.BYE, protocol.PROBE_STATS))
            body: dict[str, Any] = rng.choice(
                (
                    {"produced": count, "sent": 1},
                    {"invalid_values": count},
                    {"internal_errors": count},
                    {"dropped": {"queue_full": count, "no_agent": rng.choice(HUGE)}},
                )
            )
            record = [kind, self.next_seq(), time.time(), None, body]
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), [record])

    def names(self) -> bytes:
        metrics = {self.name(): 1.0 for _ in range(self.rng.randrange(1, 12))}
        record = [protocol.SCALARS, self.next_seq(), time.time(), 0, metrics]
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), [record])

    def replayed(self) -> bytes:
        """Sequence numbers replayed and out of order (accepted: counted by the ledgers)."""
        seqs = [self.rng.randrange(1000) for _ in range(self.rng.randrange(1, 6))]
        t = time.time()
        records = [[protocol.SCALARS, seq, t, seq, {"replayed": 1.0}] for seq in seqs]
        return pack(protocol.VERSION, envelope(self.run(), "replay"), records)

    def deep(self) -> bytes:
        value: Any = 1
        for _ in range(self.rng.choice((8, 9, 30))):
            value = {"k": value}
        record = [protocol.CONFIG, self.next_seq(), time.time(), None, {"params": value}]
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), [record])

    def too_many_records(self) -> bytes:
        t = time.time()
        records = [
            [protocol.SCALARS, i, t, 0, {"a": 1.0}]
            for i in range(protocol.MAX_RECORDS_PER_MESSAGE + 1)
        ]
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), records)

    def good_blocks(self) -> bytes:
        """Scalar blocks as the probe sends them, plain records between them."""
        records: list[Any] = []
        for _ in range(self.rng.randrange(1, 4)):
            records.append(self.block())
            if self.rng.random() < 0.5:
                records.append(self.good_record())
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), records)

    def spoiled_blocks(self) -> bytes:
        """A block spoiled in one place between two good ones: refused whole, each of its
        records counted."""
        rng = self.rng
        block = self.block()
        names, seqs, steps, rows = block[1], block[2], block[4], block[5]
        where = rng.randrange(9)
        if where < 6:  # the kind, or a whole column
            block[where] = rng.choice(self.values)
        elif where == 6:  # one name, seq, t, step or row
            column = block[rng.randrange(1, 6)]
            column[rng.randrange(len(column))] = rng.choice(self.values)
        elif where == 7:  # one value of one row
            row = rows[rng.randrange(len(rows))]
            row[rng.randrange(len(row))] = rng.choice(self.values)
        else:
            fault = rng.randrange(6)
            if fault == 0:  # a seq at or past 2**53
                seqs[rng.randrange(len(seqs))] = rng.choice((-1, *HUGE))
            elif fault == 1:  # a step past 64 bits
                steps[rng.randrange(len(steps))] = rng.choice((2**63, 2**64 - 1))
            elif fault == 2:  # one row of the wrong width
                rows[rng.randrange(len(rows))] = [1.0] * (len(names) + rng.choice((-1, 1)))
            elif fault == 3:  # a duplicated name
                names.append(names[0])
                for row in rows:
                    row.append(1.0)
            elif fault == 4:  # ts one short
                block[3].pop()
            elif rng.random() < 0.5:  # a field too many
                block.append(None)
            else:  # one too few
                block.pop()
        records = [self.block(), block, self.block()]
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), records)

    def oversized_blocks(self) -> bytes:
        """Blocks at or past the record limit of a message, or with too many names."""
        limit = protocol.MAX_RECORDS_PER_MESSAGE
        records = self.rng.choice(
            (
                lambda: [self.block(limit + 1, 1)],  # more seqs than an array may hold
                lambda: [self.good_record(), self.block(limit, 1)],  # one past the limit
                lambda: [self.block(limit // 2, 2), self.block(limit // 2 + 1, 2)],
                lambda: [self.block(4, protocol.MAX_METRICS_PER_RECORD + 1)],
                lambda: [self.block(limit, 1)],  # exactly the limit: stored
            )
        )()
        return pack(protocol.VERSION, envelope(self.run(), self.stream()), records)

    def v1_blocks(self) -> bytes:
        """Blocks in a version 1 message (older probes have no blocks): each is one bad
        record, the plain records beside them are kept."""
        rng = self.rng
        records = [self.block() if rng.random() < 0.5 else self.good_record() for _ in range(4)]
        return pack(1, envelope(self.run(), self.stream()), records)

    def new_runs(self) -> bytes:
        """Fresh run ids: past the open-run cap they are refused (too_many_runs)."""
        run = f"many-{self.rng.randrange(10**9)}"
        return pack(protocol.VERSION, envelope(run, "s"), [self.good_record()])


#: kind of trouble -> (weight, pool size)
MIX: dict[str, tuple[float, int]] = {
    "good_kinds": (10, 4000),
    "garbage": (8, 4000),
    "truncated": (8, 4000),
    "flipped": (10, 4000),
    "bomb": (4, 200),
    "wrong_version": (4, 1000),
    "bad_envelope": (8, 2000),
    "wrong_types": (16, 6000),
    "numbers": (10, 4000),
    "names": (8, 3000),
    "replayed": (6, 2000),
    "deep": (4, 1000),
    "too_many_records": (1, 20),
    "new_runs": (1, 200),
    "good_blocks": (8, 3000),
    "spoiled_blocks": (10, 4000),
    "oversized_blocks": (0.05, 20),  # a few hundred: each holds thousands of records
    "v1_blocks": (4, 1000),
}


class Oracle:
    """What the agent must count, from the decoder run on the same bytes here."""

    def __init__(self) -> None:
        self.messages = 0
        self.records = 0
        self.rejected_messages: Counter[str] = Counter()
        self.rejected_records: Counter[str] = Counter()
        self.open_runs: set[str] = set()

    def judge(self, raw: bytes) -> None:
        """Count what the agent must count for ``raw``."""
        self.messages += 1
        try:
            message = decode(raw)
        except Rejected as rejected:
            self.rejected_messages[rejected.reason] += 1
            return
        for reason, _ in message.rejected:  # a refused block: one per record
            self.rejected_records[reason] += 1
        if message.records:
            run = message.envelope["run"]
            if run not in self.open_runs and len(self.open_runs) >= MAX_OPEN_RUNS:
                self.rejected_messages["too_many_runs"] += 1
                return
            self.open_runs.add(run)
            self.records += message.count  # a block counts as its records


def mutate(raw: bytes, rng: random.Random) -> bytes:
    if not raw:
        return raw
    if rng.random() < 0.5:
        return raw[: rng.randrange(len(raw))]
    data = bytearray(raw)
    data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def _rss_mb(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return math.nan


def good_records_stored(run_dir: Path) -> tuple[int, int]:
    """(distinct good seqs stored, duplicate lines) of the good stream."""
    seen: Counter[int] = Counter()
    with open(run_dir / "metrics.jsonl", "rb") as metrics:
        for line in metrics:
            entry = orjson.loads(line)
            if entry.get("stream") == "good":
                seen[entry["seq"]] += 1
    return len(seen), sum(n - 1 for n in seen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="hostile messages")
    parser.add_argument("--quick", action="store_true", help="50,000 messages")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--oversized", type=int, default=3, help="messages over 16 MiB")
    args = parser.parse_args()
    total = 50_000 if args.quick else args.messages
    rng = random.Random(args.seed)
    generators = Generators(rng)
    print(f"machine: {machine()}")
    started = time.perf_counter()
    kinds = list(MIX)
    pools: dict[str, list[bytes]] = {}
    for kind, (_, size) in MIX.items():
        make: Callable[[], bytes] = getattr(generators, kind)
        pools[kind] = [make() for _ in range(size)]
    print(
        f"pool: {sum(map(len, pools.values())):,} messages in {time.perf_counter() - started:.1f} s"
    )

    oracle = Oracle()
    sent_by_kind: Counter[str] = Counter()
    good_sent = 0
    with tempfile.TemporaryDirectory(prefix="fz-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        endpoint = short_ipc_endpoint(tmp)
        agent = start_agent(endpoint, tmp / "runs", tmp / "agent.log")
        context = zmq.Context()
        push = context.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 5000)
        push.setsockopt(zmq.SNDTIMEO, 30_000)
        push.connect(endpoint)
        good_env = envelope(GOOD_RUN, "good")
        crashed = False
        choices = rng.choices(kinds, weights=[MIX[k][0] for k in kinds], k=total)
        oversized_at = {rng.randrange(total) for _ in range(args.oversized)}
        sending = time.perf_counter()
        sent_seconds = drained_seconds = rss_mb = math.nan
        stuck = False
        try:
            for i, kind in enumerate(choices):
                raw = rng.choice(pools[kind])
                if rng.random() < 1 / 3:
                    raw = mutate(raw, rng)
                if i in oversized_at:
                    kind, size = "oversized", protocol.MAX_MESSAGE_BYTES + 1024
                    body = {"name": "big", "dtype": "uint8", "shape": [size], "data": bytes(size)}
                    raw = pack(1, good_env, [[protocol.TENSOR, 0, time.time(), 0, body]])
                oracle.judge(raw)
                push.send(raw, copy=len(raw) < 65536)
                sent_by_kind[kind] += 1
                if i % GOOD_EVERY == 0:
                    record = [protocol.SCALARS, good_sent, time.time(), good_sent, {"loss": 1.0}]
                    good = pack(protocol.VERSION, good_env, [record])
                    oracle.judge(good)
                    push.send(good)
                    good_sent += 1
                if i % 50_000 == 0 and agent.poll() is not None:
                    crashed = True
                    break
        except zmq.Again:  # 30 s without room on the socket: the agent stopped reading
            stuck = True
        try:
            sent_seconds = time.perf_counter() - sending
            # the agent has everything before the good stream's last record once it is stored
            deadline = time.monotonic() + 300
            run_dir = tmp / "runs" / GOOD_RUN
            while not crashed and time.monotonic() < deadline:
                if agent.poll() is not None:
                    crashed = True
                    break
                if (run_dir / "metrics.jsonl").exists():
                    stored, _ = good_records_stored(run_dir)
                    if stored >= good_sent:
                        break
                time.sleep(0.5)
            drained_seconds = time.perf_counter() - sending
            rss_mb = _rss_mb(agent.pid)
        finally:
            push.close(linger=0 if stuck else 5000)
            context.term()
            crashed = crashed or stuck or agent.poll() is not None
            stop_agent(agent, timeout=120)
        status = agent.returncode
        log = (tmp / "agent.log").read_text(errors="replace")
        info = orjson.loads((run_dir / "run.json").read_bytes()) if not crashed else {}
        stored, duplicates = good_records_stored(run_dir) if run_dir.exists() else (0, 0)
        streams = sum(
            len(orjson.loads(path.read_bytes()).get("streams", []))
            for path in (tmp / "runs").glob("*/run.json")
        )

    counters = info.get("agent", {})
    print(
        f"\n{sum(sent_by_kind.values()):,} hostile messages and {good_sent:,} good records sent "
        f"in {sent_seconds:.1f} s; all handled after {drained_seconds:.1f} s"
    )
    print_table(
        ["kind of trouble", "sent"], [[k, f"{n:,}"] for k, n in sorted(sent_by_kind.items())]
    )
    rows = []
    ok = not crashed and status == 0
    for table, expected in (
        ("rejected_messages", oracle.rejected_messages),
        ("rejected_records", oracle.rejected_records),
    ):
        counted = counters.get(table, {})
        for reason in sorted(set(expected) | set(counted)):
            match = expected.get(reason, 0) == counted.get(reason, 0)
            ok = ok and match
            rows.append(
                [
                    f"{table}: {reason}",
                    f"{expected.get(reason, 0):,}",
                    f"{counted.get(reason, 0):,}",
                    "yes" if match else "NO",
                ]
            )
    for name, expected_n, counted_n in (
        ("messages", oracle.messages, counters.get("messages")),
        ("records stored", oracle.records, counters.get("records")),
    ):
        match = expected_n == counted_n
        ok = ok and match
        rows.append([name, f"{expected_n:,}", f"{counted_n or 0:,}", "yes" if match else "NO"])
    print()
    print_table(["counter", "oracle", "agent", "equal"], rows)
    missing = good_sent - stored
    ok = ok and missing == 0 and duplicates == 0
    print(
        f"\nagent crashes: {int(crashed or status != 0)} (exit status {status}); good records: "
        f"{good_sent:,} sent, {stored:,} stored, {missing:,} missing, {duplicates:,} duplicated; "
        f"metric values over the name cap: {counters.get('metric_values_over_cap', 0):,}"
    )
    print(f"agent RSS when done: {rss_mb:.0f} MB; stream ledgers in the run stores: {streams:,}")
    if not ok:
        print("FAILED\n--- agent log (tail) ---\n" + log[-3000:])
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
