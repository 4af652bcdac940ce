"""Databases and images for tests and benchmarks: a migrated SQLite file or Postgres database, a test image."""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image


def make_image(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30),
               fmt: str = "PNG") -> bytes:
    """Encode a solid-colour test image."""
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def b64_image(size: tuple[int, int] = (96, 64), color: tuple[int, int, int] = (20, 120, 220)) -> str:
    """Encode a solid-colour PNG as the base64 the API takes."""
    return base64.b64encode(make_image(size, color)).decode()


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
