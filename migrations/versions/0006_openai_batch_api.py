"""the OpenAI Batch API: /v1 files and what /v1 batches add to a batch

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:00:00

``files`` describes the files of /v1/files (their bytes are on disk under the files directory, never in the
database); ``openai_batches`` holds a /v1 batch's OpenAI fields beside its vlgate batch (same id), with the
lease a web process holds while it validates or finishes it.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _tenant_column() -> sa.Column:
    return sa.Column('tenant', sa.String(length=64), server_default='default', nullable=False)


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'files',
        sa.Column('id', sa.String(length=40), nullable=False),
        _tenant_column(),
        sa.Column('key_id', sa.String(length=40), nullable=True),
        sa.Column('purpose', sa.String(length=32), nullable=False),
        sa.Column('filename', sa.String(length=255), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.create_index('ix_files_tenant_created', ['tenant', 'created_at', 'id'], unique=False)
        batch_op.create_index(batch_op.f('ix_files_expires_at'), ['expires_at'], unique=False)

    op.create_table(
        'openai_batches',
        sa.Column('id', sa.String(length=40), nullable=False),
        _tenant_column(),
        sa.Column('key_id', sa.String(length=40), nullable=True),
        sa.Column('input_file_id', sa.String(length=40), nullable=False),
        sa.Column('endpoint', sa.String(length=40), nullable=False),
        sa.Column('completion_window', sa.String(length=16), nullable=False),
        sa.Column('model', sa.String(length=200), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('metadata', sa.JSON(), nullable=True),
        sa.Column('errors', sa.JSON(), nullable=True),
        sa.Column('output_file_id', sa.String(length=40), nullable=True),
        sa.Column('error_file_id', sa.String(length=40), nullable=True),
        sa.Column('output_expires_s', sa.Integer(), nullable=True),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('input_tokens', sa.Integer(), nullable=False),
        sa.Column('output_tokens', sa.Integer(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('lease_token', sa.String(length=40), nullable=True),
        sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.Column('in_progress_at', sa.DateTime(), nullable=True),
        sa.Column('finalizing_at', sa.DateTime(), nullable=True),
        sa.Column('completed_at', sa.DateTime(), nullable=True),
        sa.Column('failed_at', sa.DateTime(), nullable=True),
        sa.Column('expired_at', sa.DateTime(), nullable=True),
        sa.Column('cancelling_at', sa.DateTime(), nullable=True),
        sa.Column('cancelled_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('openai_batches', schema=None) as batch_op:
        batch_op.create_index('ix_openai_batches_status_lease', ['status', 'lease_expires_at'], unique=False)
        batch_op.create_index('ix_openai_batches_tenant_created', ['tenant', 'created_at', 'id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('openai_batches', schema=None) as batch_op:
        batch_op.drop_index('ix_openai_batches_tenant_created')
        batch_op.drop_index('ix_openai_batches_status_lease')
    op.drop_table('openai_batches')
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_files_expires_at'))
        batch_op.drop_index('ix_files_tenant_created')
    op.drop_table('files')
