"""The upstream's own cost of a request beside grokgate's price: xAI reports `usage.cost_in_usd_ticks` (1 USD = 1e10
ticks) on every chat and Responses answer. The ledger keeps it per request; the daily aggregates count the requests
that had one, its sum, and what grokgate charged for those same requests (`grokgate usage` shows the drift).

Columns with a constant default are added without rewriting the table (PostgreSQL 11+, SQLite).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("ledger", sa.Column("upstream_cost_ticks", sa.BigInteger, nullable=True))
    for name in ("upstream_requests", "upstream_cost_ticks", "upstream_charged"):
        op.add_column("usage_daily", sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_daily") as batch:  # SQLite drops columns by copying the table
        for name in ("upstream_charged", "upstream_cost_ticks", "upstream_requests"):
            batch.drop_column(name)
    with op.batch_alter_table("ledger") as batch:
        batch.drop_column("upstream_cost_ticks")
