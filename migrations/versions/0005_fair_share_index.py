"""an index for claiming batch work round-robin by tenant

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 12:00:00

Workers share the batch queue out by tenant (common/fair_share.py): they find the tenants with waiting
items one index probe each, then each tenant's oldest items, without reading every waiting row.
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_COLUMNS = ['queue', 'status', 'tenant', 'created_at', 'batch_index']


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_queue_status_tenant', _COLUMNS, unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_queue_status_tenant')
