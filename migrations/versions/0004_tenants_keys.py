"""tenants, API keys and daily usage

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 09:30:00

Every session, job, batch and image gets the tenant that owns it (rows made before keys existed belong
to the ``default`` tenant, which is the open gateway's) and, where a key made it, that key's id. Images
are de-duplicated per tenant from now on, so the unique constraint moves from ``sha256`` to
``(tenant, sha256)``.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# 0001 left the sha256 constraint unnamed: SQLite's batch mode names it by this convention to drop it.
_SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _tenant_column() -> sa.Column:
    return sa.Column('tenant', sa.String(length=64), server_default='default', nullable=False)


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'api_keys',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('name', sa.String(length=100), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('prefix', sa.String(length=32), nullable=False),
        sa.Column('secret_hash', sa.String(length=64), nullable=False),
        sa.Column('admin', sa.Boolean(), nullable=False),
        sa.Column('rpm', sa.Integer(), nullable=True),
        sa.Column('tpm', sa.Integer(), nullable=True),
        sa.Column('max_queued', sa.Integer(), nullable=True),
        sa.Column('expires_at', sa.DateTime(), nullable=True),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('last_used_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('prefix'),
    )
    op.create_index('ix_api_keys_tenant', 'api_keys', ['tenant'], unique=False)
    op.create_table(
        'usage_days',
        sa.Column('key_id', sa.String(length=40), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('tenant', sa.String(length=64), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('jobs', sa.Integer(), nullable=False),
        sa.Column('images', sa.Integer(), nullable=False),
        sa.Column('prompt_tokens', sa.Integer(), nullable=False),
        sa.Column('completion_tokens', sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint('key_id', 'day'),
    )
    op.create_index('ix_usage_days_tenant', 'usage_days', ['tenant'], unique=False)
    for table in ('sessions', 'batches', 'jobs'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(_tenant_column())
            batch_op.add_column(sa.Column('key_id', sa.String(length=40), nullable=True))
            batch_op.create_index(f'ix_{table}_tenant', ['tenant'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_key_status', ['key_id', 'status'], unique=False)
    sqlite = op.get_bind().dialect.name == 'sqlite'
    with op.batch_alter_table('images', schema=None, naming_convention=_SQLITE_NAMES if sqlite else None) as batch_op:
        batch_op.add_column(_tenant_column())
        batch_op.drop_constraint('uq_images_sha256' if sqlite else 'images_sha256_key', type_='unique')
        batch_op.create_unique_constraint('uq_images_tenant_sha256', ['tenant', 'sha256'])
        batch_op.create_index('ix_images_tenant', ['tenant'], unique=False)


def downgrade() -> None:
    """Downgrade schema (images of several tenants with the same content would break the old constraint)."""
    with op.batch_alter_table('images', schema=None) as batch_op:
        batch_op.drop_index('ix_images_tenant')
        batch_op.drop_constraint('uq_images_tenant_sha256', type_='unique')
        batch_op.create_unique_constraint('uq_images_sha256', ['sha256'])
        batch_op.drop_column('tenant')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_key_status')
    for table in ('jobs', 'batches', 'sessions'):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(f'ix_{table}_tenant')
            batch_op.drop_column('key_id')
            batch_op.drop_column('tenant')
    op.drop_index('ix_usage_days_tenant', table_name='usage_days')
    op.drop_table('usage_days')
    op.drop_index('ix_api_keys_tenant', table_name='api_keys')
    op.drop_table('api_keys')
