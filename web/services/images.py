"""Store normalised images once, by content (sha256), whichever request brings them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.images import NormalizedImage
from common.models import StoredImage
from web.metrics import observe_image


def image_id(sha256: str) -> str:
    """Return the content-derived id of a stored image."""
    return "img_" + sha256[:24]


def store_image(db: Session, image: NormalizedImage) -> str:
    """Store an image once (by sha256) and return its id; a concurrent insert of the same image is fine."""
    observe_image(image)
    existing = db.execute(select(StoredImage.id).where(StoredImage.sha256 == image.sha256)).scalar_one_or_none()
    if existing is not None:
        return existing
    row = StoredImage(
        id=image_id(image.sha256),
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
        existing = db.execute(select(StoredImage.id).where(StoredImage.sha256 == image.sha256)).scalar_one_or_none()
        if existing is None:
            raise
        return existing
    return row.id
