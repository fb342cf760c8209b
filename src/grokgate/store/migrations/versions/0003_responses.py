"""Stored responses of the Responses API; the ledger's endpoint and server-side tool calls.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(100), primary_key=True),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False),
        sa.Column("previous_id", sa.String(100), nullable=True),
        sa.Column("input_items", sa.Text, nullable=False),
        sa.Column("response", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("item_count", sa.Integer, nullable=False),
    )
    op.create_index("ix_responses_expires", "responses", ["expires_at"])
    # Columns with a constant default are added without rewriting the table (PostgreSQL 11+, SQLite), so a
    # large ledger migrates at once: every existing row reads "chat" and 0. Top-ups have no endpoint; they are
    # few, and are set back to null.
    op.add_column("ledger", sa.Column("endpoint", sa.String(16), nullable=True, server_default="chat"))
    op.add_column("ledger", sa.Column("server_tool_calls", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE ledger SET endpoint = NULL WHERE kind = 'topup'")


def downgrade() -> None:
    with op.batch_alter_table("ledger") as batch:  # SQLite drops columns by copying the table
        batch.drop_column("server_tool_calls")
        batch.drop_column("endpoint")
    op.drop_index("ix_responses_expires", "responses")
    op.drop_table("responses")
