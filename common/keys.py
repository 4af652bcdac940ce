"""API keys: made with a random secret shown once, stored as a hash, found by their public prefix.

A secret looks like ``vlg_<8 hex>_<43 url-safe chars>``; the part up to the second underscore is the
prefix, stored in clear so lists and logs can name a key without holding its secret. Secrets have 256
random bits, so one sha256 is enough to store them (a slow password hash protects guessable secrets, not
these), and the stored hash is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.ids import new_id, utcnow
from common.models import ApiKey

SECRET_PREFIX = "vlg_"


@dataclass(frozen=True)
class KeyLimits:
    """A key's quotas; None means unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_queued: int | None = None


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: the row and the secret, which exists nowhere else."""

    key: ApiKey
    secret: str


def hash_secret(secret: str) -> str:
    """Return the stored form of a secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def prefix_of(secret: str) -> str | None:
    """Return a secret's public prefix (``vlg_1a2b3c4d``), or None if it is not shaped like ours."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    head, sep, rest = secret[len(SECRET_PREFIX):].partition("_")
    if not sep or len(head) != 8 or not rest or len(secret) > 200:
        return None
    return SECRET_PREFIX + head


def create_key(db: Session, name: str, *, tenant: str | None = None, admin: bool = False,
               limits: KeyLimits = KeyLimits(), expires_at: datetime | None = None) -> NewKey:
    """Make a key for a tenant (default: one named like the key) and commit it; the secret is returned once."""
    secret = new_secret()
    prefix = prefix_of(secret)
    key = ApiKey(id=new_id("key"), name=name, tenant=tenant or name, prefix=prefix, secret_hash=hash_secret(secret),
                 admin=admin, rpm=limits.rpm, tpm=limits.tpm, max_queued=limits.max_queued,
                 expires_at=expires_at, created_at=utcnow())
    db.add(key)
    db.commit()
    return NewKey(key=key, secret=secret)


def find_key(db: Session, secret: str) -> ApiKey | None:
    """Return the key this secret belongs to (revoked or expired ones too), or None."""
    prefix = prefix_of(secret)
    if prefix is None:
        return None
    key = db.execute(select(ApiKey).where(ApiKey.prefix == prefix)).scalar_one_or_none()
    if key is None or not hmac.compare_digest(key.secret_hash, hash_secret(secret)):
        return None
    return key


def list_keys(db: Session) -> list[ApiKey]:
    """Return every key, newest first."""
    return list(db.execute(select(ApiKey).order_by(ApiKey.created_at.desc())).scalars())


def revoke_key(db: Session, id_or_prefix: str) -> ApiKey | None:
    """Revoke a key named by its id, prefix or name (if unique); return it, or None if there is no such key."""
    matches = db.execute(
        select(ApiKey).where((ApiKey.id == id_or_prefix) | (ApiKey.prefix == id_or_prefix)
                             | (ApiKey.name == id_or_prefix))
    ).scalars().all()
    if len(matches) != 1:
        return None
    key = matches[0]
    db.execute(update(ApiKey).where(ApiKey.id == key.id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow()))
    db.commit()
    db.refresh(key)
    return key


def any_key(db: Session) -> bool:
    """Tell whether any key was ever made (from then on, keys are required)."""
    return (db.scalar(select(func.count()).select_from(ApiKey)) or 0) > 0


def ensure_key(db: Session, secret: str, name: str = "bootstrap-admin", tenant: str = "admin") -> ApiKey:
    """Make sure an admin key with this secret exists (the bootstrap key of a deployment); return it."""
    prefix = prefix_of(secret)
    if prefix is None or len(secret) < 40:
        raise ValueError("the bootstrap admin key must look like vlg_<8 hex>_<32+ random characters>; "
                         "make one with `python -m vlgate_cli keys new-secret`")
    existing = find_key(db, secret)
    if existing is not None:
        return existing
    key = ApiKey(id=new_id("key"), name=name, tenant=tenant, prefix=prefix, secret_hash=hash_secret(secret),
                 admin=True, created_at=utcnow())
    try:
        db.add(key)
        db.commit()
    except IntegrityError:  # another web process made it first, or the prefix belongs to another key
        db.rollback()
        existing = find_key(db, secret)
        if existing is None:
            raise ValueError(f"the bootstrap admin key's prefix {prefix} belongs to another key") from None
        return existing
    return key


def new_secret() -> str:
    """Return a fresh secret in our format, for a bootstrap key made outside the database."""
    return f"{SECRET_PREFIX}{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
