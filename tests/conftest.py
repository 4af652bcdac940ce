"""Shared fixtures: settings pointing at a temporary data dir, and the demo engine."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from common.config import Settings


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


def make_image(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30),
               fmt: str = "PNG") -> bytes:
    """Encode a solid-colour test image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def migrate(url: str) -> None:
    """Create the schema the way production does: Alembic upgrade head."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(Path(__file__).resolve().parent.parent / "alembic.ini"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "head")


def fresh_database(kind: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Yield the URL of a new, migrated SQLite file or Postgres database, dropped afterwards."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'vlgate.db'}"
        migrate(url)
        yield url
        return
    import secrets

    from sqlalchemy import create_engine, text

    name = f"vlgate_test_{secrets.token_hex(6)}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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
