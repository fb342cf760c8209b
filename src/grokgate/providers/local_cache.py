"""A host-memory prompt cache of each tenant's own, for the embedded engine when grokgate picks the slots
(providers/local_slots.py).

llama.cpp's host-memory cache restores, into the slot it picks, whichever evicted prompt matches the new one best,
whoever sent it; per tenant grokgate names the slot, which skips that cache, and turns it off. Without it a
conversation whose slot was taken by other conversations has its whole prefix evaluated again on its next turn
(seconds for a few thousand tokens on a CPU). This module keeps evicted prefixes per tenant instead, through
llama.cpp's slot endpoint on its private Unix socket (providers/local.py `_load`):

- Save: before a job overwrites a slot that holds a tenant's evaluated prompt (a job of another tenant, or of the
  same tenant's other conversation), the worker holding the slot has the engine write the slot's KV state to a
  file (`POST /slots/{id}?action=save`), indexed under that tenant and the digests of the messages it holds.
- Restore: a job whose tenant has a saved state sharing more leading messages with its prompt than any idle slot
  of its own goes to the least recently used slot, and the state is loaded into it (`?action=restore`) before the
  job runs with `cache_prompt`. Lookups read only the asking tenant's entries, so a state is only ever restored
  for the tenant that made it: neither `cached_tokens` nor timing says anything about another tenant's prompts.

Both happen in the worker thread that holds the slot (never on the event loop); the engine runs them between
two batches. Files are named by a sequence number (never client text, never reused: a name evicted while another
worker is about to restore it fails that restore instead of loading something else) in a private (0700)
directory, on tmpfs where it has room for the bound, removed at close (or by the next engine, if the process
died first: `_sweep`). The index is bounded by the bytes the
engine reports written (`prompt_cache_ram_mib`): past it the least recently used files are deleted (while a
state is being written the directory holds it on top). A state whose messages lead a newer one of the same
tenant is dropped, since the newer one gives every prompt at least as many messages.

A failed save or restore (the socket gone, the engine refusing a file, a full disk) costs only the cache: the
job runs with a fresh evaluation, and a slot whose restore failed counts as nobody's (llama.cpp clears it).
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import stat
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import orjson

from grokgate.providers.local_slots import Slot, SlotTable, shared_prefix

log = logging.getLogger("grokgate.local")

TMPFS = Path("/dev/shm")
PREFIX = "grokgate-prompts-"


@dataclass(slots=True, eq=False)
class Saved:
    """One saved slot state: whose tokens, the digests of the messages it holds, its file and size."""

    tenant: str
    messages: tuple[bytes, ...]
    name: str
    size: int


class SavedStates:
    """The index of saved states (thread-safe): per tenant, least recently used first, bounded in bytes."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.limit = limit
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, Saved] = OrderedDict()  # by file name
        self._tenants: dict[str, dict[str, Saved]] = {}
        self._next = 0
        self.bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._lru)

    def new_name(self) -> str:
        with self._lock:
            self._next += 1
            return f"{self._next:08x}.bin"

    def best(self, tenant: str, messages: tuple[bytes, ...]) -> tuple[Saved | None, int]:
        """The tenant's own saved state sharing the most leading messages with `messages` (ties: the most
        recently used), and how many; (None, 0) when none shares one."""
        best: Saved | None = None
        shared = 0
        with self._lock:
            for saved in (self._tenants.get(tenant) or {}).values():  # oldest first: a later tie wins
                n = shared_prefix(saved.messages, messages)
                if n and n >= shared:
                    best, shared = saved, n
        return best, shared

    def covers(self, tenant: str, messages: tuple[bytes, ...]) -> bool:
        """Whether a saved state of the tenant holds these messages, or these and more."""
        with self._lock:
            return any(shared_prefix(s.messages, messages) == len(messages)
                       for s in (self._tenants.get(tenant) or {}).values())

    def add(self, tenant: str, messages: tuple[bytes, ...], name: str, size: int) -> None:
        """Index a state just written to `name`; drop the tenant's states it makes useless and, past the bound,
        the least recently used."""
        if size > self.limit:  # could only push out everything else and then itself
            _unlink(self.directory / name)
            return
        with self._lock:
            for older in [s for s in (self._tenants.get(tenant) or {}).values()
                          if shared_prefix(s.messages, messages) == len(s.messages)]:
                self._remove(older)
            saved = Saved(tenant, messages, name, size)
            self._tenants.setdefault(tenant, {})[name] = saved
            self._lru[name] = saved
            self.bytes += size
            while self.bytes > self.limit and self._lru:
                self._remove(next(iter(self._lru.values())))

    def touch(self, saved: Saved) -> None:
        """`saved` was just restored: it is the most recently used."""
        with self._lock:
            if saved.name in self._lru:
                self._lru.move_to_end(saved.name)
                own = self._tenants[saved.tenant]
                own[saved.name] = own.pop(saved.name)

    def drop(self, saved: Saved) -> None:
        with self._lock:
            if saved.name in self._lru:
                self._remove(saved)

    def discard(self, name: str) -> None:
        """Delete the file of a state that was never indexed (its save failed, perhaps after writing part)."""
        _unlink(self.directory / name)

    def _remove(self, saved: Saved) -> None:
        del self._lru[saved.name]
        own = self._tenants[saved.tenant]
        del own[saved.name]
        if not own:
            del self._tenants[saved.tenant]
        self.bytes -= saved.size
        _unlink(self.directory / saved.name)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # the bound is the index's; a file that will not go is logged, not fatal
        log.warning("could not delete a saved prompt state %s: %s", path.name, exc)


class SlotActionFailed(Exception):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class SlotFiles:
    """llama.cpp's slot endpoint (tools/server: `POST /slots/{id}?action=save|restore`), over its Unix socket."""

    def __init__(self, socket_path: str, api_key: str, timeout: float = 600.0) -> None:
        self._socket_path = socket_path
        self._api_key = api_key
        # The engine answers between two batches; a batch of a long prompt on a slow CPU can take a minute.
        self._timeout = timeout

    def save(self, slot: int, name: str) -> int:
        """Write `slot`'s state to `name`; the bytes written."""
        return _count(self._post(slot, "save", name), "n_written")

    def restore(self, slot: int, name: str) -> int:
        """Load `name` into `slot`; the tokens it restored."""
        return _count(self._post(slot, "restore", name), "n_restored")

    def _post(self, slot: int, action: str, name: str) -> dict[str, object]:
        conn = _UnixConnection(self._socket_path, self._timeout)
        try:
            # One connection per call, closed after it: the listener has one thread, which a kept-alive
            # connection would hold.
            conn.request("POST", f"/slots/{slot}?action={action}", body=orjson.dumps({"filename": name}),
                         headers={"Authorization": f"Bearer {self._api_key}", "Content-Type": "application/json",
                                  "Connection": "close"})
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise SlotActionFailed(f"{action}: {exc!r}") from exc
        finally:
            conn.close()
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise SlotActionFailed(f"{action}: HTTP {response.status}, not JSON") from exc
        if response.status != 200 or not isinstance(answer, dict) or "error" in answer:
            raise SlotActionFailed(f"{action}: HTTP {response.status}: {body[:200]!r}")
        return answer


def _count(answer: dict[str, object], key: str) -> int:
    value = answer.get(key)
    return value if isinstance(value, int) else 0


class TenantPromptCache:
    """What a worker does around a job (providers/local.py `_run`): `lookup` before it takes a slot, `keep` once
    it holds one, `fill` just before the job runs."""

    def __init__(self, table: SlotTable, states: SavedStates, files: SlotFiles) -> None:
        self._table = table
        self.states = states
        self._files = files
        self.saves = 0
        self.restores = 0
        self.failures = 0

    def lookup(self, tenant: str, messages: tuple[bytes, ...]) -> tuple[Saved | None, int]:
        return self.states.best(tenant, messages)

    def keep(self, slot: Slot, tenant: str, messages: tuple[bytes, ...]) -> None:
        """Save what `slot` holds, if a job of `tenant` with `messages` is about to overwrite it and no saved
        state holds as much of it."""
        holder, held = slot.tenant, slot.messages
        if holder is None or not held:
            return
        if holder == tenant and shared_prefix(held, messages) == len(held):
            return  # the job continues it: what the slot holds after it holds this too
        if self.states.covers(holder, held):
            return
        name = self.states.new_name()
        try:
            size = self._files.save(slot.id, name)
            if size <= 0:
                raise SlotActionFailed("save: nothing written")
        except SlotActionFailed as exc:
            self.failures += 1
            self.states.discard(name)
            log.warning("could not save a prompt state (slot %d): %s", slot.id, exc)
            return
        self.saves += 1
        self.states.add(holder, held, name, size)

    def fill(self, slot: Slot, tenant: str, messages: tuple[bytes, ...], saved: Saved | None) -> bool:
        """Restore `saved` (the tenant's, from `lookup`) into `slot` if it gives the job more than the slot holds;
        whether the slot now holds the tenant's own tokens, which the job may then reuse."""
        own = slot.tenant == tenant
        if saved is None or saved.tenant != tenant:  # (lookup never returns another tenant's; say so here too)
            return own
        if own and shared_prefix(slot.messages, messages) >= shared_prefix(saved.messages, messages):
            return True
        try:
            if self._files.restore(slot.id, saved.name) <= 0:
                raise SlotActionFailed("restore: nothing restored")
        except SlotActionFailed as exc:
            # The engine may have cleared the slot, or loaded part of the file: nobody's to reuse.
            self.failures += 1
            self._table.hold(slot, None, ())
            self.states.drop(saved)
            log.warning("could not restore a prompt state (slot %d): %s", slot.id, exc)
            return False
        self.restores += 1
        self.states.touch(saved)
        self._table.hold(slot, tenant, saved.messages)
        return True


def private_directory(limit: int) -> Path:
    """A new 0700 directory for saved states: on tmpfs when it has room for `limit` bytes, else in the temporary
    directory (a small /dev/shm, as in a default container, would fail most saves). Its name carries the process
    id, so that a later engine can remove what one that did not close left behind."""
    parent = Path(tempfile.gettempdir())
    try:
        st = os.statvfs(TMPFS)
        if st.f_bavail * st.f_frsize >= limit and os.access(TMPFS, os.W_OK):
            parent = TMPFS
    except OSError:
        pass
    _sweep(parent)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=parent))


def _sweep(parent: Path) -> None:
    """Remove the directories of engines whose process is gone (killed before `close`): on tmpfs they would hold
    memory until a reboot. Only this user's; a process id reused since only keeps its directory longer."""
    try:
        found = [p for p in parent.iterdir() if p.name.startswith(PREFIX)]
    except OSError:
        return
    for path in found:
        pid = path.name[len(PREFIX):].partition("-")[0]
        if not (pid.isascii() and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            st = path.lstat()
            if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:  # alive (another user's process: PermissionError), or gone meanwhile
            continue
