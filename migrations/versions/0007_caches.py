"""prompt tokens served from the prefix cache, and the worker a session's turn is routed to

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 13:00:00

``cached_tokens`` is reported as OpenAI's ``usage.prompt_tokens_details.cached_tokens``; ``worker_hint`` names
the worker holding the session's cached prefix (common/affinity.py).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op


revision: str = '0007'
down_revision: Union[str, Sequence[str], None] = '0006'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cached_tokens', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('worker_hint', sa.String(length=80), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('worker_hint')
        batch_op.drop_column('cached_tokens')
