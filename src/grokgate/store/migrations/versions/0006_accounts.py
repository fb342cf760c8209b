"""Accounts that own keys: one balance shared by many keys, each key with its own spending limit and period.

Every token becomes an account with one key: the account takes the token's id, name, creation time, balance and
reserved credits (and the token's are set to 0: an older replica still running finds nothing to spend, instead of
spending twice); the token's rate limits stay on the key. The ledger, the daily usage and the reservations name the
account beside the token (the same id, for every row, also a deleted token's). The accounts' sequence starts past
the highest id the tokens' has handed out, so no account id is one a deleted token had (migration 0004). Stored
responses move from the token's tenant (`token:<id>`) to the account's (`account:<id>`, core/tenancy.py).

Columns are added without rewriting a table (constant defaults, nullable columns).

Revision ID: 0006
Revises: 0005
Create Date: 2027-01-10
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    if dialect == "sqlite":
        # Opens pysqlite's transaction before the DDL, so everything commits with the new revision or not at all
        # (as in 0004).
        op.execute("UPDATE alembic_version SET version_num = version_num")
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("disabled", sa.Boolean, nullable=False),
        sa.Column("rpm", sa.Integer, nullable=True),
        sa.Column("tpm", sa.Integer, nullable=True),
        sa.Column("max_concurrency", sa.Integer, nullable=True),
        sa.Column("balance", sa.BigInteger, nullable=False),
        sa.Column("reserved", sa.BigInteger, nullable=False),
        sa.CheckConstraint("balance >= 0", name="ck_accounts_balance_nonnegative"),
        sa.CheckConstraint("reserved >= 0", name="ck_accounts_reserved_nonnegative"),
        sqlite_autoincrement=True,
    )
    op.add_column("api_tokens", sa.Column("account_id", sa.Integer, nullable=True))
    if dialect == "postgresql":  # SQLite adds no constraint to an existing table; the store never names a missing one
        op.create_foreign_key("fk_api_tokens_account", "api_tokens", "accounts", ["account_id"], ["id"])
    op.add_column("api_tokens", sa.Column("spend_limit", sa.BigInteger, nullable=True))
    op.add_column("api_tokens", sa.Column("limit_period", sa.String(8), nullable=True))
    for name in ("period_start", "period_spent", "period_reserved"):
        op.add_column("api_tokens", sa.Column(name, sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("api_tokens", sa.Column("previous_hash", sa.String(64), nullable=True))
    op.add_column("api_tokens", sa.Column("previous_valid_until", sa.BigInteger, nullable=True))
    op.add_column("api_tokens", sa.Column("rotated_at", sa.BigInteger, nullable=True))
    op.add_column("reservations", sa.Column("account_id", sa.Integer, nullable=True))
    op.add_column("reservations", sa.Column("period_start", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("ledger", sa.Column("account_id", sa.Integer, nullable=True))
    op.add_column("usage_daily", sa.Column("account_id", sa.Integer, nullable=False, server_default="0"))

    op.execute("INSERT INTO accounts (id, name, created_at, disabled, rpm, tpm, max_concurrency, balance, reserved) "
               "SELECT id, name, created_at, " + ("false" if dialect == "postgresql" else "0")
               + ", NULL, NULL, NULL, balance, reserved FROM api_tokens")
    op.execute("UPDATE api_tokens SET account_id = id, balance = 0, reserved = 0")
    op.execute("UPDATE reservations SET account_id = token_id")
    op.execute("UPDATE ledger SET account_id = token_id WHERE token_id IS NOT NULL")
    op.execute("UPDATE usage_daily SET account_id = token_id")
    owner = "'account:' || substr(owner, 7)"
    op.execute(f"UPDATE responses SET owner = {owner} WHERE owner LIKE 'token:%' AND owner NOT LIKE '%#%'")
    op.execute(f"UPDATE responses SET owner = {owner} WHERE owner LIKE 'token:%#deferred'")
    op.create_index("ix_api_tokens_account", "api_tokens", ["account_id"])
    op.create_index("ix_api_tokens_previous_hash", "api_tokens", ["previous_hash"], unique=True)
    op.create_index("ix_ledger_account_created", "ledger", ["account_id", "created_at"])
    _start_accounts_past_tokens(dialect)


def downgrade() -> None:
    raise NotImplementedError("0006 moves balances onto accounts; restore a backup to go back")


def _start_accounts_past_tokens(dialect: str) -> None:
    bind = op.get_bind()
    if dialect == "sqlite":
        seq = bind.execute(sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'api_tokens'")).scalar()
        highest = max(int(seq or 0), int(bind.execute(sa.text("SELECT MAX(id) FROM accounts")).scalar() or 0))
        op.execute("DELETE FROM sqlite_sequence WHERE name = 'accounts'")
        op.execute(sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES ('accounts', :n)").bindparams(n=highest))
        return
    tokens = bind.execute(sa.text("SELECT pg_get_serial_sequence('api_tokens', 'id')")).scalar()
    sequence = bind.execute(sa.text("SELECT pg_get_serial_sequence('accounts', 'id')")).scalar()
    if tokens is None or sequence is None:
        return
    last, called = bind.execute(sa.text(f"SELECT last_value, is_called FROM {tokens}")).one()
    highest = max(int(last) if called else int(last) - 1,
                  int(bind.execute(sa.text("SELECT COALESCE(MAX(id), 0) FROM accounts")).scalar() or 0))
    if highest > 0:
        bind.execute(sa.text("SELECT setval(:sequence, :n)").bindparams(sequence=sequence, n=highest))
