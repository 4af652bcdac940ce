"""``keys``: make, list and revoke API keys, on the server's own database (run it where the server runs)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import click

DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _expiry(value: str | None) -> datetime | None:
    """Read ``--expires``: a duration (``30d``, ``12h``) from now, or an ISO date/time in UTC."""
    if value is None:
        return None
    from common.ids import utcnow

    unit = DURATION_UNITS.get(value[-1:].lower())
    if unit and value[:-1].isdigit():
        return utcnow() + timedelta(**{unit: int(value[:-1])})
    try:
        when = datetime.fromisoformat(value.removesuffix("Z"))
    except ValueError:
        raise click.BadParameter("use a duration like 30d, 12h, 90m, or an ISO date like 2027-01-31") from None
    return when.replace(tzinfo=None)


def _db():  # type: ignore[no-untyped-def]
    """Open a session on the configured database (VLGATE_DATABASE_URL, or the SQLite file under VLGATE_DATA_DIR)."""
    from common.config import get_settings
    from common.db import make_engine, make_session_factory

    return make_session_factory(make_engine(get_settings().sqlalchemy_url))()


def _row(key) -> dict:  # type: ignore[no-untyped-def]
    """Describe a key row for listing (never its secret or hash)."""
    from common.access import KeyPublic
    from common.ids import isoformat

    public = KeyPublic(id=key.id, name=key.name, tenant=key.tenant, prefix=key.prefix, admin=key.admin,
                       rpm=key.rpm, tpm=key.tpm, max_queued=key.max_queued).model_dump()
    return {**public, "created_at": isoformat(key.created_at), "expires_at": isoformat(key.expires_at),
            "revoked_at": isoformat(key.revoked_at), "last_used_at": isoformat(key.last_used_at)}


@click.group()
def keys() -> None:
    """Make, list and revoke API keys (on the server's database; needs the server's VLGATE_ settings)."""


@keys.command()
@click.option("--name", required=True, help="Who the key is for, e.g. team-a.")
@click.option("--tenant", help="The tenant whose rows the key reaches. Default: the name.")
@click.option("--admin", is_flag=True, help="May see every tenant, all usage and the detailed health report.")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute (prompt estimate + max_tokens).")
@click.option("--max-queued", type=click.IntRange(min=1), help="Unfinished jobs at once.")
@click.option("--expires", help="A duration (30d, 12h) or an ISO date (UTC).")
def create(name: str, tenant: str | None, admin: bool, rpm: int | None, tpm: int | None, max_queued: int | None,
           expires: str | None) -> None:
    """Make a key and print its secret, once: it is stored only as a hash."""
    from common.keys import KeyLimits, create_key

    expires_at = _expiry(expires)
    with _db() as db:
        made = create_key(db, name.strip(), tenant=(tenant or "").strip() or None, admin=admin,
                          limits=KeyLimits(rpm=rpm, tpm=tpm, max_queued=max_queued), expires_at=expires_at)
        click.echo(made.secret)
        click.echo(f"made {made.key.prefix}… ({made.key.id}) for tenant {made.key.tenant}"
                   f"{', admin' if admin else ''}; the secret above is shown only now", err=True)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_(as_json: bool) -> None:
    """List keys by prefix (never secrets)."""
    from common.keys import list_keys

    with _db() as db:
        rows = [_row(key) for key in list_keys(db)]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(f"{'PREFIX':14} {'NAME':16} {'TENANT':16} {'ADMIN':5} {'RPM':>6} {'TPM':>8} {'QUEUED':>6}  STATE")
    for row in rows:
        state = "revoked" if row["revoked_at"] else (f"expires {row['expires_at']}" if row["expires_at"] else "active")
        admin = "yes" if row["admin"] else ""
        click.echo(f"{row['prefix']:14} {row['name'][:16]:16} {row['tenant'][:16]:16} {admin:5} "
                   f"{row['rpm'] or '-':>6} {row['tpm'] or '-':>8} {row['max_queued'] or '-':>6}  {state}")


@keys.command()
@click.argument("key")
def revoke(key: str) -> None:
    """Revoke a key named by its prefix, id or (unique) name; it is refused from its next request on."""
    from common.keys import revoke_key

    with _db() as db:
        revoked = revoke_key(db, key.strip())
    if revoked is None:
        raise click.ClickException(f"no single key matches {key!r} (use its prefix from `keys list`)")
    click.echo(f"revoked {revoked.prefix}… ({revoked.name})")


@keys.command("new-secret")
def new_secret() -> None:
    """Print a fresh secret for VLGATE_ADMIN_KEY (a deployment's bootstrap admin key)."""
    from common.keys import new_secret as make

    click.echo(make())
