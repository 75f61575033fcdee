"""API keys: each belongs to one project (what it may see) or is an admin key (it manages keys).

A key is ``tf-`` + 32 random bytes (URL-safe base64), shown once when it is made; the database
keeps only its SHA-256. A plain hash is the right tool for a random 256-bit secret (GitHub and
Stripe store their tokens the same way): slow password hashes (bcrypt, argon2) exist to stretch
guessable human passwords, and would only slow every request here. Lookups compare hashes in
the database's index; the key itself is never stored, logged or returned again.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from ..errors import TuneforgeError
from .db import ApiKey, Project, new_id, now


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(db, project: str | None, name: str = "", admin: bool = False) -> tuple[str, ApiKey]:
    """A new key for ``project`` (made if new), or an admin key; returns (the key, its row)."""
    if not admin and not project:
        raise TuneforgeError("a key belongs to a project: pass --project NAME (or --admin for a key that manages keys)")
    key = "tf-" + secrets.token_urlsafe(32)
    with db.write() as s:
        project_id = None
        if project:
            row = s.execute(select(Project).where(Project.name == project)).scalar_one_or_none()
            if row is None:
                row = Project(id=new_id("proj"), name=project, created_at=now())
                s.add(row)
                s.flush()
            project_id = row.id
        record = ApiKey(id=new_id("key"), project_id=project_id, name=name or "", prefix=key[:10], hash=hash_key(key),
                        admin=admin, created_at=now())
        s.add(record)
    return key, record


def list_keys(db) -> list[dict]:
    with db.read() as s:
        rows = s.execute(select(ApiKey, Project.name).outerjoin(Project, ApiKey.project_id == Project.id)
                         .order_by(ApiKey.created_at)).all()
        return [{"id": k.id, "project": name, "name": k.name, "prefix": k.prefix + "...", "admin": k.admin,
                 "created_at": int(k.created_at), "revoked": k.revoked_at is not None} for k, name in rows]


def revoke_key(db, key_id: str) -> None:
    with db.write() as s:
        row = s.get(ApiKey, key_id)
        if row is None:
            raise TuneforgeError(f"no API key with id {key_id}; `tuneforge service keys list` shows the ids")
        if row.revoked_at is None:
            row.revoked_at = now()


def identify(db, key: str | None) -> ApiKey | None:
    """The live key row for a presented key, or None."""
    if not key:
        return None
    with db.read() as s:
        row = s.execute(select(ApiKey).where(ApiKey.hash == hash_key(key))).scalar_one_or_none()
    if row is None or row.revoked_at is not None:
        return None
    return row
