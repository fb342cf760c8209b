"""Alembic environment. grokgate passes an open connection in `config.attributes["connection"]`."""

from __future__ import annotations

from alembic import context

from grokgate.store.schema import metadata

config = context.config


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("run migrations through `grokgate db upgrade` (it supplies the connection)")
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


run()
