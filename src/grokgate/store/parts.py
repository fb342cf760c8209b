"""What SqlStore (store/sql.py) gives the parts mixed into it: each part (store/group_commit.py, holds.py,
instances.py, keys_sql.py, prices_sql.py) declares the rest of what it uses beside these."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine


class StorePart:
    write: Callable[[Callable[[Connection], Any]], Awaitable[Any]]  # store/group_commit.py GroupCommit.write

    @property
    def engine(self) -> AsyncEngine:
        raise NotImplementedError

    @property
    def dialect(self) -> str:
        raise NotImplementedError
