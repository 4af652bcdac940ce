"""Read, fork and delete conversations, and serve their stored images."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, selectinload

from common.bus import TokenBus
from common.errors import ApiError
from common.ids import is_id, isoformat, new_id, utcnow
from common.models import ChatSession, Job, Message, MessageImage, StoredImage
from common.schemas import MessagePublic, SessionDeleted, SessionPublic
from web.auth import owned, owner
from web.services.jobs import cancel_job


class SessionFork(BaseModel):
    """Body of ``POST /api/sessions/<id>/fork``."""

    model_config = ConfigDict(extra="forbid")
    before: int | None = Field(None, ge=0, description="Copy the messages before this 0-based index (all when "
                                                       "omitted); the copy must end after an answer, not a question.")


def _load(db: Session, session_id: str) -> ChatSession:
    """Return one of the caller's conversations with its messages, or raise 404 ``session_not_found``."""
    if not is_id("sess", session_id):
        raise ApiError("session_not_found", f"Session {session_id} does not exist.")
    chat = db.execute(
        select(ChatSession)
        .where(ChatSession.id == session_id, owned(ChatSession))
        .options(selectinload(ChatSession.messages).selectinload(Message.image_links))
    ).scalar_one_or_none()
    if chat is None:
        raise ApiError("session_not_found", f"Session {session_id} does not exist.")
    return chat


def fork_session(db: Session, session_id: str, fork: SessionFork) -> SessionPublic:
    """Copy a conversation's first messages into a new one (to edit a question or regenerate an answer there)."""
    chat = _load(db, session_id)
    count = len(chat.messages) if fork.before is None else fork.before
    if count > len(chat.messages):
        raise ApiError("invalid_request", f"before={count} is past the conversation's {len(chat.messages)} messages.")
    if count and chat.messages[count - 1].role == "user":
        # Its answer (maybe still being written) belongs to the original conversation.
        raise ApiError("invalid_request", f"before={count} would end the copy on a question without its answer.")
    now = utcnow()
    copy = ChatSession(id=new_id("sess"), created_at=now, updated_at=now, **owner())
    db.add(copy)
    for message in chat.messages[:count]:
        copy.messages.append(Message(
            role=message.role, text=message.text, job_id=message.job_id, created_at=message.created_at,
            image_links=[MessageImage(position=link.position, image_id=link.image_id) for link in message.image_links],
        ))
    db.commit()
    return get_session(db, copy.id)


def get_session(db: Session, session_id: str) -> SessionPublic:
    """Return a conversation's turns in order, or raise 404 ``session_not_found``."""
    chat = _load(db, session_id)
    return SessionPublic(
        session_id=chat.id,
        created_at=isoformat(chat.created_at) or "",
        messages=[
            MessagePublic(role=m.role, text=m.text, image_ids=m.image_ids, job_id=m.job_id,
                          created_at=isoformat(m.created_at) or "")
            for m in chat.messages
        ],
    )


def delete_session(db: Session, bus: TokenBus, session_id: str) -> SessionDeleted:
    """Cancel a conversation's unfinished jobs and delete it with its messages (images are shared, so kept)."""
    mine = select(ChatSession.id).where(ChatSession.id == session_id, owned(ChatSession))
    if not is_id("sess", session_id) or db.execute(mine).first() is None:
        raise ApiError("session_not_found", f"Session {session_id} does not exist.")
    pending = db.execute(
        select(Job.id).where(Job.session_id == session_id, Job.status.in_(("queued", "running")))
    ).scalars().all()
    for job_id in pending:
        cancel_job(db, bus, job_id)
    # A core delete: the database cascades to messages and their image links and detaches the jobs,
    # which stay as the record of what ran.
    db.execute(delete(ChatSession).where(ChatSession.id == session_id))
    db.commit()
    return SessionDeleted(session_id=session_id, deleted=True)


def get_image(db: Session, image_id: str) -> bytes:
    """Return one of the caller's stored images as PNG bytes, or raise 404."""
    found = select(StoredImage.data).where(StoredImage.id == image_id, owned(StoredImage))
    data = db.execute(found).scalar_one_or_none() if is_id("img", image_id) else None
    if data is None:
        raise ApiError("not_found", f"Image {image_id} does not exist.")
    return data
