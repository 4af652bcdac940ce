"""SQLAlchemy models: sessions, messages, de-duplicated images, jobs (the source of truth), API keys and usage.

Every row a client makes carries its ``tenant`` (the tenant of the key that made it; ``default`` when the
gateway runs open) and the id of that key; lookups are scoped by tenant (``web/auth.py``)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from common.ids import utcnow

DEFAULT_TENANT = "default"  # the owner of everything made while the gateway runs open (no keys)


class Base(DeclarativeBase):
    """Declarative base of every table (Alembic autogenerates from its metadata)."""


def _tenant_column() -> Mapped[str]:
    return mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT, index=True)


def _key_column() -> Mapped[str | None]:
    return mapped_column(String(40), nullable=True)


class ChatSession(Base):
    """A conversation: an ordered list of messages."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    key_id: Mapped[str | None] = _key_column()
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    messages: Mapped[list[Message]] = relationship(
        back_populates="session", order_by="Message.id", cascade="all, delete-orphan", passive_deletes=True
    )


class Message(Base):
    """One turn of a conversation; its images are linked in order."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    session: Mapped[ChatSession] = relationship(back_populates="messages")
    image_links: Mapped[list[MessageImage]] = relationship(
        order_by="MessageImage.position", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def image_ids(self) -> list[str]:
        """Return the ids of this message's images in order."""
        return [link.image_id for link in self.image_links]


class StoredImage(Base):
    """A normalised image (PNG bytes), stored once however many messages use it."""

    __tablename__ = "images"
    # De-duplicated per tenant only: a shared id would let anyone test whether another tenant sent a picture.
    __table_args__ = (UniqueConstraint("tenant", "sha256", name="uq_images_tenant_sha256"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    sha256: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    source_format: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class MessageImage(Base):
    """The link from a message to its images, in order."""

    __tablename__ = "message_images"

    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[str] = mapped_column(ForeignKey("images.id"), index=True)


class Batch(Base):
    """A bulk job: many items (each a Job with ``batch_id``), run on the ``batch`` queue."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    key_id: Mapped[str | None] = _key_column()
    source: Mapped[str] = mapped_column(String(16), default="json")  # "json" | "upload"
    total: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # shared parameters (uploads)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """One generation: its state, lease, result and timings. The primary key is the queue's job id."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_status_lease", "status", "lease_expires_at"),
        Index("ix_jobs_queue_status_created", "queue", "status", "created_at"),
        # Fair share (common/fair_share.py): the tenants with waiting work, and each one's oldest items.
        Index("ix_jobs_queue_status_tenant", "queue", "status", "tenant", "created_at", "batch_index"),
        Index("ix_jobs_batch_index", "batch_id", "batch_index"),
        Index("ix_jobs_key_status", "key_id", "status"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = _tenant_column()
    key_id: Mapped[str | None] = _key_column()
    session_id: Mapped[str | None] = mapped_column(
        ForeignKey("sessions.id", ondelete="SET NULL"), nullable=True, index=True
    )
    user_message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), nullable=True
    )
    batch_id: Mapped[str | None] = mapped_column(
        ForeignKey("batches.id", ondelete="CASCADE"), nullable=True, index=True
    )
    batch_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # A batch item has no session: its single turn is stored on the job itself.
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_ids: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    item_name: Mapped[str | None] = mapped_column(String(255), nullable=True)
    queue: Mapped[str] = mapped_column(String(16), default="chat")
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    # Superseded by ``spec`` (migration 0003); kept for rows written before it.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The job contract (common.jobspec.JobSpec): the only thing a worker reads to run the job.
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    response: Mapped[str | None] = mapped_column(Text, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    error_code: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_message: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)  # of prompt_tokens
    truncated_turns: Mapped[int | None] = mapped_column(Integer, nullable=True)  # left out to fit the context
    cached_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)  # of prompt_tokens: prefix cache hits
    # The worker holding this session's cached prefix (common/affinity.py); others wait a moment before taking it.
    worker_hint: Mapped[str | None] = mapped_column(String(80), nullable=True)
    # Every choice (ChoiceOutcome) when the job asked for several or for log-probabilities; else None.
    choices: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    first_token_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class ApiKey(Base):
    """A client's key: only a hash of its secret is stored; the prefix identifies it in lists and logs."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)  # the public start of the secret
    secret_hash: Mapped[str] = mapped_column(String(64))  # sha256 hex of the whole secret
    admin: Mapped[bool] = mapped_column(default=False)
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)  # requests per minute
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)  # tokens per minute
    max_queued: Mapped[int | None] = mapped_column(Integer, nullable=True)  # unfinished jobs at once
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class UsageDay(Base):
    """What one key (or the open gateway, key ``-``) used on one UTC day."""

    __tablename__ = "usage_days"

    key_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    requests: Mapped[int] = mapped_column(Integer, default=0)
    jobs: Mapped[int] = mapped_column(Integer, default=0)
    images: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)


class StoredFile(Base):
    """A ``/v1`` file (a batch's input or output): its bytes live on disk under ``Settings.files_path``, named by
    its id; never in the database."""

    __tablename__ = "files"
    __table_args__ = (Index("ix_files_tenant_created", "tenant", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT)
    key_id: Mapped[str | None] = _key_column()
    purpose: Mapped[str] = mapped_column(String(32))  # "batch" (uploaded) or "batch_output" (made by a batch)
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True, index=True)


class OpenAIBatch(Base):
    """What ``/v1/batches`` adds to a vlgate batch (same id; its items are the batch's jobs): OpenAI's status
    lifecycle and timestamps, its files, counts and errors, and the lease of the web process working on it."""

    __tablename__ = "openai_batches"
    __table_args__ = (
        Index("ix_openai_batches_status_lease", "status", "lease_expires_at"),
        Index("ix_openai_batches_tenant_created", "tenant", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # also the id of its row in ``batches``
    tenant: Mapped[str] = mapped_column(String(64), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT)
    key_id: Mapped[str | None] = _key_column()
    input_file_id: Mapped[str] = mapped_column(String(40))
    endpoint: Mapped[str] = mapped_column(String(40))
    completion_window: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # validating, in_progress, finalizing, completed, failed, cancelling, cancelled, expired
    status: Mapped[str] = mapped_column(String(16))
    user_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    errors: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    output_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    error_file_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    output_expires_s: Mapped[int | None] = mapped_column(Integer, nullable=True)  # output_expires_after.seconds
    total: Mapped[int] = mapped_column(Integer, default=0)
    completed: Mapped[int] = mapped_column(Integer, default=0)  # frozen when the batch ends (live counts before)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # validations started
    # A web process validating or finishing the batch holds it until lease_expires_at (renewed while it works);
    # the token says which claim it is, so a process that lost its claim cannot write over another's.
    lease_token: Mapped[str | None] = mapped_column(String(40), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    in_progress_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finalizing_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    failed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    expired_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)  # set when its window passed
    cancelling_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
