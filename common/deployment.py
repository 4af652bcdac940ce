"""Refuse to start a production deployment that keeps a well-known default password (docs/security.md)."""

from __future__ import annotations

from sqlalchemy.engine import make_url

from common.config import Settings

# The compose file's former default (POSTGRES_PASSWORD=vlgate) and the passwords every scanner tries first.
DEFAULT_DATABASE_PASSWORDS = frozenset({"vlgate", "postgres", "password", "changeme", "secret"})


class UnsafeDeployment(RuntimeError):
    """A production setting that must be changed before the process may start."""


def check_deployment(settings: Settings) -> None:
    """Raise UnsafeDeployment when ``VLGATE_ENVIRONMENT=production`` and the database URL has a default password."""
    if settings.environment != "production":
        return
    password = make_url(settings.sqlalchemy_url).password
    if password is not None and str(password).lower() in DEFAULT_DATABASE_PASSWORDS:
        raise UnsafeDeployment(
            "refusing to start: VLGATE_ENVIRONMENT is 'production' but VLGATE_DATABASE_URL carries a well-known "
            "default password. Set a strong POSTGRES_PASSWORD (URL-safe characters) for the database and in "
            "VLGATE_DATABASE_URL, or set VLGATE_ENVIRONMENT=development on a machine only you can reach.")
