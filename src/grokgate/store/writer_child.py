"""The SQLite writer process's side (see store/sqlite_writer.py): `python -m grokgate.store.writer_child`.

It imports as little as it can (no asyncio, no logging, no SQLAlchemy: it is given the compiled SQL), so it
costs about 14 MB (plain SettlementRows come in, so it needs none of grokgate.core).
"""

from __future__ import annotations

import pickle
import signal
import sqlite3
import struct
import sys
from typing import Any, BinaryIO

from grokgate.store.settling import SqliteCursorRunner, charge_and_record

LENGTH = struct.Struct(">I")


def read_frame(stream: BinaryIO) -> Any:
    head = stream.read(LENGTH.size)
    if len(head) < LENGTH.size:
        return None  # the parent closed our input: done
    (size,) = LENGTH.unpack(head)
    return pickle.loads(stream.read(size))


def encode_frame(payload: Any) -> bytes:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return LENGTH.pack(len(data)) + data


def write_frame(stream: BinaryIO, payload: Any) -> None:
    stream.write(encode_frame(payload))
    stream.flush()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    setup = read_frame(source)
    if setup is None:
        return
    try:
        db = sqlite3.connect(setup["path"], isolation_level=None, check_same_thread=False)
        # The same settings as the serving process's connections (store/sql.py).
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000", "foreign_keys=ON"):
            db.execute(f"PRAGMA {pragma}")
        # A path that is not the serving process's database (an empty new file) fails here, at setup, so the
        # parent settles in a thread instead of failing every batch.
        # The ledger's newest columns are named, so a database behind this code's schema fails here too.
        db.execute("SELECT 1, ledger.endpoint, ledger.server_tool_calls, ledger.upstream_cost_ticks, "
                   "usage_daily.upstream_charged, responses.size, accounts.balance, api_tokens.period_spent, "
                   "ledger.account_id, usage_daily.account_id "
                   "FROM accounts, api_tokens, ledger, usage_daily, responses LIMIT 0")
        run = SqliteCursorRunner(db.cursor(), setup["statements"], db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    except Exception as exc:  # reported to the parent
        write_frame(sink, ("error", repr(exc)))
        return
    write_frame(sink, ("ok", None))
    while (batch := read_frame(source)) is not None:
        items, inserts = batch
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in inserts:
                    db.executemany(sql, rows)
                balances = charge_and_record(run, items, {}) if items else ({}, {})
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except Exception as exc:  # reported to the parent, which retries item by item
            write_frame(sink, ("error", repr(exc)))
            continue
        write_frame(sink, ("ok", balances))


if __name__ == "__main__":
    main()
