"""Cassettes on disk: whose they are, how large they may grow, how they are appended to and looked up
(docs/replay.md; the line format is core/cassette.py's).

- Scope. Shared, a cassette is `DIR/<name>.jsonl` for every caller; per tenant, `DIR/tenants/<digest>/<name>.jsonl`
  (core/cassette.py `tenant_dir`), with a `.tenant` file naming the tenant for `grokgate cassettes list`.
- Files are created 0600 and directories 0700: a cassette holds prompts and answers.
- Bounds. Before a request goes to the backend, the cassette and its directory must have room for its request
  (`reserve`, else a 507 `cassette_full`); the sizes are running figures kept from one scan of the directory and
  every append, corrected when a write finds its file changed by someone else. An answer that would still pass a
  bound is not written (counted and logged).
- Appends go to one writer thread per store, in order, each under `fcntl.flock` on `<name>.jsonl.lock`, the lock
  `grokgate cassettes prune` takes while it rewrites the file. An append never reads the cassette.
- Lookups run in reader threads from an index of line offsets by request key, kept up to date by this process's own
  appends and re-read (only the new lines when the file grew) when someone else changed the file. A miss compares
  the request with at most `CANDIDATES` recent recordings of its model, each comparison bounded.
- A line that cannot be parsed is logged (with its number) and skipped by lookups, never removed.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, Counter

from grokgate.core.cassette import (
    HEADER,
    TENANTS,
    Exchange,
    canonical,
    key_of,
    miss,
    model_of,
    request_text,
    tenant_dir,
)
from grokgate.core.errors import GatewayError
from grokgate.core.events import JSONObject
from grokgate.schemas.chat import ChatCompletionRequest

log = logging.getLogger("grokgate.replay")

LOCK_SUFFIX = ".lock"
TENANT_LABEL = ".tenant"
CANDIDATES = 16  # recent distinct requests of a model a miss is compared with
CANDIDATE_BYTES = 16 * 1024 * 1024  # recorded lines one miss may read and parse, in all
LINE_OVERHEAD = 512  # what a line adds to its request, at least (for a reservation)

Reason = Literal["cassette", "directory"]


@dataclass(frozen=True, slots=True)
class CassetteBounds:
    """Whose cassettes a request reads and writes (`shared`: everyone's; else its tenant's own), and how large they
    may grow (settings.max_cassette_bytes, max_cassette_dir_bytes)."""

    shared: bool = True
    max_bytes: int = 64 * 1024 * 1024
    max_dir_bytes: int = 1024**3


@dataclass(frozen=True, slots=True)
class Where:
    """One cassette: its directory (the shared one, or a tenant's under it) and name."""

    directory: Path
    name: str
    tenant: str | None = None  # None: shared

    @property
    def path(self) -> Path:
        return self.directory / f"{self.name}.jsonl"


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request's canonical form, serialized once (in a worker thread: a prompt may be megabytes)."""

    request: JSONObject
    text: bytes
    key: str
    model: str | None


def canonical_of(request: ChatCompletionRequest) -> JSONObject:
    """The request's canonical form (core/cassette.py `canonical`): its body as it is forwarded, fields grokgate does
    not know included, without how it is delivered; the caller's own output cap (the request is never rewritten:
    the cap held at admission is the Call's)."""
    native = request.responses_body
    if native is not None:
        return canonical({}, None, native)
    chat: JSONObject = request.model_dump(mode="json", by_alias=True, exclude_none=True)
    return canonical(chat, request.output_limit, None)


def prepare(request: ChatCompletionRequest) -> Prepared:
    wanted = canonical_of(request)
    text = request_text(wanted)
    return Prepared(wanted, text, key_of(text), model_of(wanted))


@dataclass(frozen=True, slots=True)
class Found:
    """What a lookup found: the exchange to replay, or nothing (then `miss`, when asked for)."""

    prepared: Prepared
    exchange: Exchange | None
    miss: GatewayError | None = None


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


@contextmanager
def cassette_lock(path: Path) -> Iterator[None]:
    """The lock every writer of a cassette holds: the recording servers' appends and `grokgate cassettes prune`'s
    rewrite (flock on `<name>.jsonl.lock` beside it; never deleted, so two holders always lock the same file)."""
    fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def scan_lines(fd: int, start: int = 0) -> Iterator[tuple[int, bytes, Exchange | None, str | None]]:
    """Each complete line of an open cassette from `start`: (offset, raw line, its exchange or None, why not). A
    last line without its newline is being written: it is not yielded."""
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(start)
        offset = start
        for raw in f:
            if not raw.endswith(b"\n"):
                return
            if not raw.strip():
                yield offset, raw, None, None
            else:
                try:
                    yield offset, raw, Exchange.from_json(json.loads(raw)), None
                except (ValueError, RecursionError) as exc:  # JSON (or UTF-8) errors are ValueErrors
                    yield offset, raw, None, str(exc)[:200] or type(exc).__name__
            offset += len(raw)


def read_cassette(path: Path) -> Iterator[Exchange]:
    """The exchanges of a cassette file; a line that is not one is reported in the log (a hand edit) and skipped."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for number, (_, _, exchange, problem) in enumerate(scan_lines(fd), 1):
            if exchange is not None:
                yield exchange
            elif problem is not None:
                log.warning("line %d of %s cannot be parsed (%s): skipped, kept in the file", number, path, problem)
    finally:
        os.close(fd)


class _Index:
    """Where each recording of a cassette file is: line offsets by request key, recent comparable requests by model
    (the miss search's candidates), the models seen. `seen` is the file's (inode, size, mtime) when last checked;
    `size` the bytes indexed (complete lines)."""

    __slots__ = ("by_key", "count", "ino", "lines", "models", "recent", "seen", "size")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.size = 0
        self.seen: tuple[int, int, int] = (ino, -1, -1)
        self.lines = 0
        self.count = 0
        self.by_key: dict[str, list[tuple[int, int]]] = {}
        self.recent: dict[str, OrderedDict[str, tuple[int, int]]] = {}
        self.models: dict[str, None] = {}

    def add(self, offset: int, length: int, exchange: Exchange) -> None:
        self.count += 1
        self.by_key.setdefault(exchange.key, []).append((offset, length))
        model = exchange.model_name
        if model:
            self.models.setdefault(model)
        if exchange.request is None:
            return  # a failure keeps no request to compare with
        for group in (model or "", "*"):
            recent = self.recent.setdefault(group, OrderedDict())
            recent[exchange.key] = (offset, length)
            recent.move_to_end(exchange.key)
            if len(recent) > CANDIDATES:
                recent.popitem(last=False)

    def candidates(self, model: str | None) -> list[tuple[int, int]]:
        """The most recent distinct recordings of `model` (else of any model), newest first."""
        recent = self.recent.get(model or "") or self.recent.get("*") or OrderedDict()
        return list(reversed(recent.values()))


@dataclass(slots=True)
class _Cassette:
    lock: threading.Lock = field(default_factory=threading.Lock)
    index: _Index | None = None
    turns: dict[str, int] = field(default_factory=dict)  # the next recording of each key to replay


@dataclass(slots=True)
class _Dir:
    """A directory's sizes as last known: each cassette file's and their sum, plus what requests in flight hold."""

    files: dict[str, int]
    total: int
    pending: dict[str, int] = field(default_factory=dict)
    pending_total: int = 0


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


class CassetteStore:
    """The cassettes under one directory (shared, or one directory per tenant)."""

    def __init__(self, directory: Path, bounds: CassetteBounds | None = None, *,
                 registry: CollectorRegistry | None = None) -> None:
        self.directory = directory
        self.bounds = bounds or CassetteBounds()
        self.refused = Counter("grokgate_cassette_refused", "Requests refused before the backend because their "
                               "recording would pass a bound (reason: cassette or directory)", ["reason"],
                               registry=registry)
        self.unrecorded = Counter("grokgate_cassette_unrecorded", "Exchanges served but not written (reason: an "
                                  "answer past a bound, or an I/O error)", ["reason"], registry=registry)
        # One writer thread: appends land in the order they were made. Readers look up and search misses.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="grokgate-cassette-writer")
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="grokgate-cassette-reader")
        self._lock = threading.Lock()  # guards the dictionaries below and the sizes; never held during I/O
        self._dirs: dict[Path, _Dir] = {}
        self._cassettes: dict[Path, _Cassette] = {}
        self._made: set[Path] = set()

    def where(self, tenant: str, name: str) -> Where:
        if self.bounds.shared:
            return Where(self.directory, name)
        return Where(self.directory / TENANTS / tenant_dir(tenant), name, tenant)

    def _cassette(self, path: Path) -> _Cassette:
        with self._lock:
            found = self._cassettes.get(path)
            if found is None:
                found = self._cassettes[path] = _Cassette()
            return found

    # -- recording ------------------------------------------------------------------------------------------------

    async def prepare(self, request: ChatCompletionRequest) -> Prepared:
        return await asyncio.get_running_loop().run_in_executor(self._readers, prepare, request)

    async def reserve(self, where: Where, size: int) -> GatewayError | None:
        """Room for a request's line, held until it is written or released; else the 507 that refuses it."""
        if where.directory not in self._dirs:
            await asyncio.get_running_loop().run_in_executor(self._readers, self._load_dir, where.directory)
        bounds = self.bounds
        with self._lock:
            d = self._dirs[where.directory]
            held = d.files.get(where.name, 0) + d.pending.get(where.name, 0)
            reason: Reason | None = None
            if held + size > bounds.max_bytes:
                reason = "cassette"
            elif d.total + d.pending_total + size > bounds.max_dir_bytes:
                reason = "directory"
            else:
                d.pending[where.name] = d.pending.get(where.name, 0) + size
                d.pending_total += size
                return None
        self.refused.labels(reason).inc()
        return self._full(where, reason, size)

    def _full(self, where: Where, reason: Reason, size: int) -> GatewayError:
        whose = "this tenant's cassettes" if where.tenant is not None else "the cassette directory"
        if reason == "cassette":
            message = (f"The cassette '{where.name}' is full: recording this request ({size} bytes or more) would "
                       f"take it past {self.bounds.max_bytes} bytes (GROKGATE_MAX_CASSETTE_BYTES). Prune it "
                       f"(grokgate cassettes prune) or record into another cassette.")
        else:
            message = (f"The cassettes are full: recording this request ({size} bytes or more) would take {whose} "
                       f"past {self.bounds.max_dir_bytes} bytes (GROKGATE_MAX_CASSETTE_DIR_BYTES). Prune them "
                       f"(grokgate cassettes prune) or raise the bound.")
        return GatewayError(507, "cassette_full", message, param=HEADER if reason == "cassette" else None)

    def release(self, where: Where, size: int) -> None:
        with self._lock:
            d = self._dirs.get(where.directory)
            if d is None or not size:
                return
            left = d.pending.get(where.name, 0) - size
            if left > 0:
                d.pending[where.name] = left
            else:
                d.pending.pop(where.name, None)
            d.pending_total -= size

    def _load_dir(self, directory: Path) -> None:
        """The sizes of a directory's cassettes: one scan, the first time it is recorded into."""
        files: dict[str, int] = {}
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.name.endswith(".jsonl") and entry.is_file(follow_symlinks=False):
                        files[entry.name[:-len(".jsonl")]] = entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            pass
        with self._lock:
            self._dirs.setdefault(directory, _Dir(files, sum(files.values())))

    async def append(self, where: Where, exchange: Exchange, text: bytes | None, reserved: int) -> None:
        """Write one exchange in the writer thread (in order with every other append), and wait for it: a client
        that hangs up meanwhile does not stop the write."""
        future = self._writer.submit(self._append, where, exchange, text, reserved)
        await asyncio.shield(asyncio.wrap_future(future))

    def _append(self, where: Where, exchange: Exchange, text: bytes | None, reserved: int) -> None:
        self.release(where, reserved)
        try:
            line = exchange.line(text)
            written = self._write(where, line, exchange)
        except OSError:  # a full disk must not fail the request being served
            log.exception("could not append to the cassette %s", where.path)
            self.unrecorded.labels("error").inc()
            return
        if written is not None:
            self.unrecorded.labels(written).inc()
            log.warning("an exchange of %d bytes was not recorded in %s: it would pass the %s bound (%s)",
                        len(line), where.path, written, "GROKGATE_MAX_CASSETTE_BYTES" if written == "cassette"
                        else "GROKGATE_MAX_CASSETTE_DIR_BYTES")

    def _write(self, where: Where, line: bytes, exchange: Exchange) -> Reason | None:
        """Append one line under the cassette's lock; the bound it would pass instead, if any."""
        self._make_dirs(where)
        if where.directory not in self._dirs:
            self._load_dir(where.directory)
        path = where.path
        with cassette_lock(path):
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                before = os.fstat(fd)
                # A last line without its newline (a crash mid-write) must not swallow this one.
                data = line if before.st_size == 0 or os.pread(fd, 1, before.st_size - 1) == b"\n" else b"\n" + line
                with self._lock:
                    d = self._dirs[where.directory]
                    d.total += before.st_size - d.files.get(where.name, 0)  # someone else's change, if any
                    d.files[where.name] = before.st_size
                    if before.st_size + len(data) > self.bounds.max_bytes:
                        return "cassette"
                    if d.total + len(data) > self.bounds.max_dir_bytes:
                        return "directory"
                    d.files[where.name] += len(data)
                    d.total += len(data)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                after = os.fstat(fd)
            finally:
                os.close(fd)
        self._indexed(path, before, after, len(data) - len(line), exchange)
        return None

    def _indexed(self, path: Path, before: os.stat_result, after: os.stat_result, gap: int,
                 exchange: Exchange) -> None:
        """Add an appended line to the file's index, when this process has one and the file was as indexed: no
        re-read for its own appends. Otherwise the next lookup finds the file changed and reads what is new."""
        cassette = self._cassettes.get(path)
        # Not while a lookup holds the index (it may be reading a large file): appends do not wait on lookups.
        if cassette is None or not cassette.lock.acquire(blocking=False):
            return
        try:
            index = cassette.index
            if index is None or index.seen != _stamp(before) or index.size != before.st_size or gap:
                return
            index.add(before.st_size, after.st_size - before.st_size, exchange)
            index.lines += 1
            index.size = after.st_size
            index.seen = _stamp(after)
        finally:
            cassette.lock.release()

    def _make_dirs(self, where: Where) -> None:
        """The cassette's directory, each level this process creates 0700; a tenant's is labelled with its id."""
        if where.directory in self._made:
            return
        missing = []
        current = where.directory
        while not current.is_dir():
            missing.append(current)
            current = current.parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
        if where.tenant is not None:
            try:
                fd = os.open(where.directory / TENANT_LABEL, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(where.tenant + "\n")
        self._made.add(where.directory)

    async def flush(self) -> None:
        """Wait for every append made so far."""
        await asyncio.wrap_future(self._writer.submit(lambda: None))

    # -- replaying ------------------------------------------------------------------------------------------------

    async def find(self, where: Where, request: ChatCompletionRequest, *, search: bool) -> Found:
        """This request's next recording (in recorded order, then from the first again); on a miss, with `search`,
        the replay_miss naming the nearest difference. In a reader thread."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._find, where, request, search)

    def _find(self, where: Where, request: ChatCompletionRequest, search: bool) -> Found:
        prepared = prepare(request)
        path = where.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return Found(prepared, None, miss(where.name, [], prepared.request) if search else None)
        try:
            cassette = self._cassette(path)
            with cassette.lock:
                index = self._fresh(cassette, fd, path)
                lines = index.by_key.get(prepared.key)
                if lines:
                    turn = cassette.turns.get(prepared.key, 0)
                    cassette.turns[prepared.key] = turn + 1
                    offset, length = lines[turn % len(lines)]
                candidates = [] if lines or not search else index.candidates(prepared.model)
                count = index.count
            if lines:
                try:
                    return Found(prepared, Exchange.from_json(json.loads(os.pread(fd, length, offset))))
                except (ValueError, RecursionError):  # the file was rewritten in place under the same size
                    log.warning("the recording at byte %d of %s changed: replayed as a miss", offset, path)
                    return Found(prepared, None, miss(where.name, [], prepared.request, recordings=count)
                                 if search else None)
            if not search:
                return Found(prepared, None)
            return Found(prepared, None, miss(where.name, self._requests(fd, candidates), prepared.request,
                                              recordings=count))
        finally:
            os.close(fd)

    @staticmethod
    def _requests(fd: int, candidates: list[tuple[int, int]]) -> list[JSONObject]:
        """The candidates' requests, newest first, within CANDIDATE_BYTES of lines read."""
        budget = CANDIDATE_BYTES
        out: list[JSONObject] = []
        for offset, length in candidates:
            if length > budget:
                continue
            budget -= length
            try:
                exchange = Exchange.from_json(json.loads(os.pread(fd, length, offset)))
            except (ValueError, RecursionError):
                continue
            if exchange.request is not None:
                out.append(exchange.request)
        return out

    def _fresh(self, cassette: _Cassette, fd: int, path: Path) -> _Index:
        """The file's index, brought up to date (the caller holds the cassette's lock): as it is when the file is
        as last seen; its new lines when it only grew; read again when it was replaced or rewritten."""
        st = os.fstat(fd)
        index = cassette.index
        if index is not None and index.seen == _stamp(st):
            return index
        grew = (index is not None and index.ino == st.st_ino and st.st_size > index.size
                and (index.size == 0 or os.pread(fd, 1, index.size - 1) == b"\n"))
        if index is None or not grew:
            index = _Index(st.st_ino)
        for offset, raw, exchange, problem in scan_lines(fd, index.size):
            index.lines += 1
            if exchange is not None:
                index.add(offset, len(raw), exchange)
            elif problem is not None:
                log.warning("line %d of %s cannot be parsed (%s): skipped, kept in the file", index.lines, path,
                            problem)
            index.size = offset + len(raw)
        index.seen = _stamp(st)
        cassette.index = index
        return index

    def models(self) -> list[str]:
        """Every model recorded in the cassettes this store serves (the shared ones, or every tenant's)."""
        if self.bounds.shared:
            directories = [self.directory]
        else:
            directories = sorted(p for p in (self.directory / TENANTS).glob("t-*") if p.is_dir())
        names: dict[str, None] = {}
        for directory in directories:
            for path in sorted(directory.glob("*.jsonl")):
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    cassette = self._cassette(path)
                    with cassette.lock:
                        names.update(self._fresh(cassette, fd, path).models)
                finally:
                    os.close(fd)
        return list(names)


__all__ = ["CassetteBounds", "CassetteStore", "Found", "Prepared", "Where", "canonical_of", "cassette_lock",
           "read_cassette", "scan_lines"]
