"""Instances of a shared database (PostgreSQL): heartbeats, and the release of what dead ones held; mixed into
SqlStore (store/sql.py).

Each serving replica renews its row in `instances`; the living release the reservations of an instance whose
heartbeat is older than `dead_after_seconds` (killed, or rescheduled under a new instance id), by the database's
clock.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from sqlalchemy import ColumnElement, Connection, Interval, delete, func, literal, or_, select, update

from grokgate.core.accounts import now_ms
from grokgate.store.batch import dialect_insert, release_held
from grokgate.store.parts import StorePart
from grokgate.store.schema import instances, reservations

log = logging.getLogger("grokgate.store")


class InstancesMixin(StorePart):
    """Mixed into SqlStore, which sets these up (store/sql.py)."""

    owner: str
    heartbeat_seconds: float
    dead_after_seconds: float
    _beaten: bool

    async def reclaim(self, *, owner: str | None = None, older_than_ms: int | None = None) -> int:
        """Release reservations left by a crash: this owner's, or any older than the cut-off."""
        conditions: list[ColumnElement[bool]] = []
        if owner is not None:
            conditions.append(reservations.c.owner == owner)
        if older_than_ms is not None:
            conditions.append(reservations.c.created_at < now_ms() - older_than_ms)
        if not conditions:
            return 0
        count = int(await self.write(lambda conn: release_held(conn, or_(*conditions))))
        if count:
            log.warning("released reservations left by an earlier run", extra={"count": count})
        return count

    # -- instances: heartbeats, and the reservations of dead ones ---------------------------------------------

    def _stale(self) -> ColumnElement[bool]:
        """Another instance whose heartbeat is older than dead_after, by the database's clock (replicas'
        clocks may disagree; the database's is the one they share)."""
        limit = literal(timedelta(seconds=self.dead_after_seconds), Interval())
        return (instances.c.heartbeat_at < func.now() - limit) & (instances.c.owner != self.owner)

    async def _heartbeats(self) -> None:
        """Beat every heartbeat_seconds; sweep alongside, in its own task, so a sweep waiting on the writer
        (a busy group commit, a lock held by another replica) never delays a beat."""
        sweep: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(self.heartbeat_seconds)
                try:
                    await self._beat()
                except Exception:  # the database may be briefly away: keep beating
                    log.warning("instance heartbeat failed", exc_info=True)
                if sweep is None or sweep.done():
                    sweep = asyncio.create_task(self._sweep_logged(), name="store-sweep")
        finally:
            if sweep is not None:
                sweep.cancel()
                await asyncio.gather(sweep, return_exceptions=True)

    async def _sweep_logged(self) -> None:
        try:
            await self._sweep()
        except Exception:
            log.warning("releasing dead instances' reservations failed", exc_info=True)

    async def _beat(self) -> None:
        """Renew our heartbeat, on its own connection: a backlog of the writer must not make us look dead."""
        async with self.engine.begin() as conn:
            renewed = (await conn.execute(update(instances).where(instances.c.owner == self.owner)
                                          .values(heartbeat_at=func.now()))).rowcount
            if not renewed:
                stmt = dialect_insert(self.dialect, instances).values(
                    owner=self.owner, heartbeat_at=func.now(), started_at=func.now())
                await conn.execute(stmt.on_conflict_do_update(index_elements=["owner"],
                                                              set_={"heartbeat_at": func.now()}))
        if not renewed and self._beaten:
            log.error("this instance (%s) was taken for dead (no heartbeat for %.3g s): its reservations were "
                      "released, so requests in flight are charged without them", self.owner,
                      self.dead_after_seconds)
        self._beaten = True

    async def _sweep(self) -> int:
        """Release the reservations of instances that stopped beating (killed, or rescheduled under a new
        instance id, so no restart of theirs would release them), then forget those instances. A read
        first: the usual answer is "nobody is dead", and that costs no write."""
        async with self.engine.connect() as conn:
            dead = (await conn.execute(select(instances.c.owner).where(self._stale()))).scalars().all()
        if not dead:
            return 0
        stale = self._stale()

        def op(conn: Connection) -> int:
            # The staleness is checked again inside the transaction: an instance that beat since is alive.
            count = release_held(conn, reservations.c.owner.in_(select(instances.c.owner).where(stale)))
            conn.execute(delete(instances).where(stale))
            return count

        count = int(await self.write(op))
        log.log(logging.WARNING if count else logging.INFO,
                "released the reservations of instances with no heartbeat for %.3g s", self.dead_after_seconds,
                extra={"count": count, "instances": sorted(dead)})
        return count

    async def _retire(self) -> None:
        owner = self.owner

        def op(conn: Connection) -> int:
            count = release_held(conn, reservations.c.owner == owner)
            conn.execute(delete(instances).where(instances.c.owner == owner))
            return count

        count = int(await self.write(op))
        if count:
            log.warning("released reservations still held at shutdown", extra={"count": count})
