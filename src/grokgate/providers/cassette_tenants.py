"""Cassettes recorded before accounts (migration 0006) carried over to their account.

Until 0006 a tenant was a token, `token:<id>`; now it is the account that owns the key, `account:<id>`, and 0006
gave every token an account of the same id (store/migrations/versions/0006_accounts.py). A tenant's cassettes live
in a directory named by a digest of its id (core/cassette.py `tenant_dir`), so a token's recordings sit where its
account never looks. `carry_over` moves each directory labelled `token:<id>` (its `.tenant` file) to the directory
of `account:<id>`, relabelled; the server runs it once per start on the directory it records to or replays from
(app.py), and `grokgate cassettes` on the one it reads. No id of a later account or key is a token's of before
0006, so nothing is given to another tenant.

Safe to repeat and to interrupt: the directory is renamed whole when the account has none yet (one rename), and
its label rewritten after (a directory already in place with the old label is relabelled on the next run). When the
account already has a directory (it recorded after the upgrade, before this ran), each cassette file is moved into
it; a cassette of the same name is kept as `<name>-pre-accounts.jsonl` beside it, never overwritten. Nothing is
deleted but a directory left empty. Run it while no older server records into the same directory.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from grokgate.core.cassette import TENANTS, tenant_dir
from grokgate.providers.cassette_store import TENANT_LABEL

log = logging.getLogger("grokgate.replay")

_TOKEN = re.compile(r"token:(\d+)")
CARRIED_SUFFIX = "-pre-accounts"


def carry_over(root: Path) -> list[tuple[Path, Path]]:
    """Move every pre-0006 token's cassettes under `root` to its account's directory; the (from, to) directories
    moved or merged. Errors are logged and leave that directory as it was."""
    tenants = root / TENANTS
    if not tenants.is_dir():
        return []
    moved = []
    for directory in sorted(p for p in tenants.glob("t-*") if p.is_dir()):
        try:
            whose = (directory / TENANT_LABEL).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        match = _TOKEN.fullmatch(whose)
        if match is None:
            continue
        account = f"account:{match.group(1)}"
        target = tenants / tenant_dir(account)
        try:
            if target == directory:  # renamed by an interrupted run: only the label is left to write
                _label(target, account)
                continue
            if not target.exists():
                os.rename(directory, target)
                _label(target, account)
            else:
                _merge(directory, target)
        except OSError as exc:
            log.error("the cassettes of %s (%s) could not be carried over to %s: %s", whose, directory, account, exc)
            continue
        log.warning("cassettes of %s carried over to %s (%s -> %s)", whose, account, directory.name, target.name)
        moved.append((directory, target))
    return moved


def _label(directory: Path, tenant: str) -> None:
    """Write the directory's `.tenant` label whole (a new file renamed over the old one)."""
    fresh = directory / (TENANT_LABEL + ".new")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(tenant + "\n")
    os.replace(fresh, directory / TENANT_LABEL)


def _merge(source: Path, target: Path) -> None:
    """Move `source`'s cassettes into `target` (which exists), none overwritten; remove `source` if left empty."""
    for path in sorted(source.glob("*.jsonl")):
        destination = target / path.name
        if destination.exists():
            destination = target / f"{path.stem}{CARRIED_SUFFIX}.jsonl"
            if destination.exists():
                log.error("%s is kept in %s: %s exists in %s", path.name, source, destination.name, target)
                continue
        os.rename(path, destination)
    leftovers = [p for p in source.iterdir() if p.name != TENANT_LABEL and not p.name.endswith(".lock")]
    if not leftovers:
        for p in source.iterdir():
            p.unlink()
        source.rmdir()
