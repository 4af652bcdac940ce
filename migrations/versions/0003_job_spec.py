"""job spec, choices, image tokens and truncated turns

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 07:00:00

Every job now carries its JobSpec (common/jobspec.py), the only thing a worker reads. Jobs that are
still queued or running at upgrade time get one built from the old fields (a session's turns up to
the job's user message, or a batch item's single turn), so none is stranded by the upgrade.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")


def _spec(turns: list[dict], params: dict) -> dict:
    """Build a version-1 spec from a pre-0003 job's turns and flat parameters."""
    sampling = {k: params[k] for k in _SAMPLING if k in params}
    stop = {"max_tokens": params.get("max_tokens", 512), "min_tokens": params.get("min_tokens", 0),
            "strings": params.get("stop") or []}
    return {"version": 1, "turns": turns, "sampling": sampling, "stop": stop}


def _backfill() -> None:
    """Give every unfinished job a spec built from the fields older workers read."""
    bind = op.get_bind()
    jobs = sa.table("jobs", sa.column("id"), sa.column("status"), sa.column("session_id"),
                    sa.column("user_message_id"), sa.column("prompt"), sa.column("image_ids", sa.JSON),
                    sa.column("params", sa.JSON), sa.column("spec", sa.JSON))
    messages = sa.table("messages", sa.column("id"), sa.column("session_id"), sa.column("role"), sa.column("text"))
    links = sa.table("message_images", sa.column("message_id"), sa.column("position"), sa.column("image_id"))
    pending = bind.execute(sa.select(jobs).where(jobs.c.status.in_(("queued", "running")))).mappings().all()
    for job in pending:
        if job["prompt"] is not None and job["session_id"] is None:
            turns = [{"role": "user", "text": job["prompt"], "image_ids": list(job["image_ids"] or [])}]
        elif job["session_id"] is not None and job["user_message_id"] is not None:
            rows = bind.execute(sa.select(messages).where(messages.c.session_id == job["session_id"],
                                                          messages.c.id <= job["user_message_id"])
                                .order_by(messages.c.id)).mappings().all()
            turns = []
            for row in rows:
                images = bind.execute(sa.select(links.c.image_id).where(links.c.message_id == row["id"])
                                      .order_by(links.c.position)).scalars().all()
                turns.append({"role": row["role"], "text": row["text"], "image_ids": list(images)})
        else:
            continue  # its conversation is gone: the worker fails it with a clear error
        if turns:
            bind.execute(sa.update(jobs).where(jobs.c.id == job["id"])
                         .values(spec=_spec(turns, dict(job["params"] or {}))))


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('spec', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('choices', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('image_tokens', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('truncated_turns', sa.Integer(), nullable=True))
    _backfill()


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('truncated_turns')
        batch_op.drop_column('image_tokens')
        batch_op.drop_column('choices')
        batch_op.drop_column('spec')
