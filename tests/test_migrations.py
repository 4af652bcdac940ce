"""The Alembic migrations build exactly the schema the models describe, on SQLite and Postgres."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from common.models import Base


def test_migrations_match_the_models(database_url: str) -> None:
    """Autogenerate finds nothing to change after `upgrade head`: no forgotten column, index or constraint."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
