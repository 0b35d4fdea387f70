"""Scalar blocks: a batch's ``scalars`` records as columns, the metric names once.

A trainer logs the same names step after step, so in a batch of 512 records
the names would be packed 512 times and the agent would decode and check
them 512 times. Consecutive ``scalars`` records with the same names (in the
same order) become one block ``[SCALAR_ROWS, names, seqs, ts, steps, rows]``
(protocol version 2); any other record ends the block, so the order of
records is kept. A lone record stays a plain record.
"""

from __future__ import annotations

from typing import Any

from probe import protocol

SCALARS = protocol.SCALARS
SCALAR_ROWS = protocol.SCALAR_ROWS


def to_blocks(records: list[list[Any]]) -> list[list[Any]]:
    """The wire records of one message, with runs of same-named scalars as blocks."""
    out: list[list[Any]] = []
    run: list[list[Any]] = []  # consecutive scalars records with the names of run[0]
    names: tuple[Any, ...] = ()
    for record in records:
        if record[0] == SCALARS:
            body = record[4]
            if run and tuple(body) == names:
                run.append(record)
                continue
            _close(run, out)
            run = [record]
            names = tuple(body)
            continue
        _close(run, out)
        run = []
        out.append(record)
    _close(run, out)
    return out


def _close(run: list[list[Any]], out: list[list[Any]]) -> None:
    if len(run) == 1:
        out.append(run[0])
    elif run:
        out.append(
            [
                SCALAR_ROWS,
                list(run[0][4]),
                [record[1] for record in run],
                [record[2] for record in run],
                [record[3] for record in run],
                [list(record[4].values()) for record in run],
            ]
        )
