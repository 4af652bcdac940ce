"""Store normalised images once per tenant, by content (sha256), whichever request brings them.

De-duplication never crosses tenants: a shared content-derived id would let one tenant test whether
another had sent a given picture.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.images import NormalizedImage
from common.models import StoredImage
from web.metrics import observe_image

# Built once: a Core select on the table (every image submission runs it; the ORM's per-call work cost more).
_IMAGES = StoredImage.__table__.c
EXISTING = select(_IMAGES.id).where(_IMAGES.tenant == bindparam("tenant"), _IMAGES.sha256 == bindparam("sha256"))


def image_id(tenant: str, sha256: str) -> str:
    """Return the id of a tenant's stored image: derived from both, so an id reveals nothing across tenants."""
    return "img_" + hashlib.sha256(f"{tenant}\n{sha256}".encode()).hexdigest()[:24]


def store_image(db: Session, image: NormalizedImage, tenant: str) -> str:
    """Store a tenant's image once (by sha256) and return its id; a concurrent insert of the same image is fine."""
    observe_image(image)
    mine = {"tenant": tenant, "sha256": image.sha256}
    existing = db.execute(EXISTING, mine).scalar_one_or_none()
    if existing is not None:
        return existing
    row = StoredImage(
        id=image_id(tenant, image.sha256),
        tenant=tenant,
        sha256=image.sha256,
        data=image.data,
        width=image.width,
        height=image.height,
        size_bytes=len(image.data),
        source_format=image.source_format[:16],
    )
    try:
        # A savepoint, so losing the race to another request does not abort our transaction.
        with db.begin_nested():
            db.add(row)
    except IntegrityError:
        existing = db.execute(EXISTING, mine).scalar_one_or_none()
        if existing is None:
            raise
        return existing
    return row.id
