"""Shared fixtures: settings pointing at a temporary data dir, and the demo engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import Settings
from devtools.databases import fresh_database


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU-marked tests on machines without CUDA."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory shared by the session (the demo checkpoint is built once into it)."""
    return tmp_path_factory.mktemp("vlgate-data")


@pytest.fixture(scope="session")
def settings(data_dir: Path) -> Settings:
    """Settings for the demo model on the CPU."""
    return Settings(model="demo", data_dir=data_dir, device="cpu", hf_offline=True)


@pytest.fixture(scope="session")
def engine(settings: Settings):
    """The demo engine, loaded once through ``from_pretrained``."""
    from worker.loader import load_engine

    return load_engine(settings)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A fresh migrated database, once on SQLite and once on Postgres."""
    yield from fresh_database(request.param, tmp_path)


def store_queued_job(db, **fields) -> str:  # type: ignore[no-untyped-def]
    """Store a session, its user message and a queued job for it; return the job id."""
    from common.ids import new_id, utcnow
    from common.jobspec import JobSpec, StopSpec, TurnSpec
    from common.models import ChatSession, Job, Message

    session = ChatSession(id=new_id("sess"))
    db.add(session)
    db.flush()
    message = Message(session_id=session.id, role="user", text="hi")
    db.add(message)
    db.flush()
    max_tokens = fields.pop("max_tokens", 16)
    fields.setdefault("spec", JobSpec(turns=[TurnSpec(role="user", text="hi")],
                                      stop=StopSpec(max_tokens=max_tokens)).stored())
    job = Job(id=new_id("job"), session_id=session.id, user_message_id=message.id, enqueued_at=utcnow(), **fields)
    db.add(job)
    db.commit()
    return job.id
