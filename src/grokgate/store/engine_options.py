"""How grokgate connects to PostgreSQL through a connection pooler (GROKGATE_DATABASE_POOLER).

PgBouncer in transaction mode hands each transaction whichever server connection is free, so nothing may outlive
a transaction on a server connection. What grokgate does is transactions only: every statement runs in one (the
migrations take `pg_advisory_xact_lock`, released at commit: store/sql.py `upgrade`), and it sets no session
state (no SET, session advisory locks, LISTEN, WITH HOLD cursors; the one TEMP TABLE, in migration 0004, is
SQLite's path). What remains is the drivers' prepared statements:

- asyncpg keeps named prepared statements in a per-connection cache (`statement_cache_size`): a statement
  prepared on one server connection and run later on another fails ("prepared statement ... does not exist"),
  and two clients' `__asyncpg_stmt_1__` collide ("... already exists"). Size 0 turns the cache off (asyncpg then
  re-parses in the same exchange rather than trust a statement across a Flush: asyncpg issue 1058).
- SQLAlchemy's asyncpg dialect prepares every statement itself, named and cached the same way
  (`prepared_statement_cache_size`); with the cache off and a unique name each time
  (`prepared_statement_name_func`), no name repeats. The statement is prepared and run inside the transaction,
  so on one server connection. PgBouncer's `server_reset_query = DEALLOCATE ALL` with
  `server_reset_query_always = 1` frees them when the transaction ends (docs/operations.md).

The pooler travels with the database URL (`with_pooler`, a query parameter no driver sees: `engine_args` and
`asyncpg_connect_args` take it off), so every SqlStore made from the settings' URL connects the same way.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

Pooler = Literal["none", "pgbouncer"]
POOLERS: tuple[Pooler, ...] = ("none", "pgbouncer")
_PARAM = "grokgate_pooler"


def _is_postgres(url: str) -> bool:
    return urlsplit(url).scheme.split("+")[0] in ("postgresql", "postgres")


def with_pooler(url: str, pooler: str) -> str:
    """The database URL that connects through `pooler` (settings.database_pooler); `none`: the URL as given."""
    if pooler not in POOLERS:
        raise ValueError(f"unknown database pooler {pooler!r} (one of {', '.join(POOLERS)})")
    if pooler == "none":
        return url
    if not _is_postgres(url):
        raise ValueError(f"GROKGATE_DATABASE_POOLER={pooler} needs a PostgreSQL GROKGATE_DATABASE_URL")
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != _PARAM]
    return urlunsplit(parts._replace(query=urlencode([*query, (_PARAM, pooler)])))


def split_pooler(url: str) -> tuple[str, Pooler]:
    """The URL without the pooler's parameter, and the pooler it named (`none` when it names none)."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    named = [v for k, v in pairs if k == _PARAM]
    if not named:
        return url, "none"
    rest = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in pairs if k != _PARAM])))
    for pooler in POOLERS:
        if pooler == named[-1]:
            return rest, pooler
    raise ValueError(f"unknown database pooler {named[-1]!r} (one of {', '.join(POOLERS)})")


def _statement_name() -> str:
    return f"__grokgate_{uuid.uuid4().hex}__"


def asyncpg_options(pooler: Pooler) -> dict[str, Any]:
    """Keyword arguments of `asyncpg.connect`/`create_pool` for a pooler (for code that talks to asyncpg without
    SQLAlchemy). Such code must not prepare statements of its own with `Connection.prepare()` outside a
    transaction, nor keep them across transactions."""
    return {"statement_cache_size": 0} if pooler == "pgbouncer" else {}


def asyncpg_connect_args(url: str) -> tuple[str, dict[str, Any]]:
    """A store URL (SqlStore.url, `postgresql+asyncpg://...`, maybe naming a pooler) as asyncpg's DSN and the
    keyword arguments for `asyncpg.connect`/`create_pool`."""
    bare, pooler = split_pooler(url)
    parts = urlsplit(bare)
    return urlunsplit(parts._replace(scheme="postgresql")), asyncpg_options(pooler)


# A PostgreSQL that does not answer must not hold a connection attempt (asyncpg's default: 60 s) or a statement
# (none) for long: the group-commit writer waits on them (store/group_commit.py), and requests on the writer.
CONNECT_TIMEOUT_S = 2.0
COMMAND_TIMEOUT_S = 30.0


def engine_args(url: str, *, bounded: bool = True) -> tuple[str, dict[str, Any]]:
    """The URL and keyword arguments of SQLAlchemy's `create_async_engine` for a store URL. `bounded=False`: no
    limit on a statement's time, for migrations (a 0006-style UPDATE of a large ledger, or a replica waiting on
    another's migration lock, may take minutes)."""
    bare, pooler = split_pooler(url)
    if not _is_postgres(bare):
        return bare, {}
    connect: dict[str, Any] = {"timeout": CONNECT_TIMEOUT_S}
    if bounded:
        connect["command_timeout"] = COMMAND_TIMEOUT_S
    if pooler != "none":
        connect.update(asyncpg_options(pooler), prepared_statement_cache_size=0,
                       prepared_statement_name_func=_statement_name)
    return bare, {"connect_args": connect}


def async_engine(url: str, *, bounded: bool = True, **kwargs: Any) -> AsyncEngine:
    """`create_async_engine` for a store URL, with the pooler's options (store/sql.py opens its engine here)."""
    bare, options = engine_args(url, bounded=bounded)
    return create_async_engine(bare, **options, **kwargs)
