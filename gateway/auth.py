"""API keys: bearer tokens with a role (user < labeler < admin), stored hashed.

A key is ``il-`` + 43 url-safe random characters (256 bits), so a plain sha256 is a sound way to store
it. The keys file holds one JSON object per line (``key_id``, ``name``, ``role``, ``sha256``,
``created_at``); ``key_id`` is the first 16 hex digits of the hash: it names the caller in logs and
streams without revealing the key. Lookups go through ``key_id`` and the full hash is then compared with
``hmac.compare_digest``. The file is re-read when it changes, so new keys work without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

log = logging.getLogger(__name__)

KEY_PREFIX = "il-"


class Role(str, Enum):
    user = "user"
    labeler = "labeler"
    admin = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANK = {Role.user: 0, Role.labeler: 1, Role.admin: 2}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller."""

    key_id: str
    name: str
    role: Role


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key_hash: str) -> str:
    return key_hash[:16]


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str
    role: Role
    sha256: str
    created_at: float


def append_key(path: Path, *, name: str, role: Role) -> tuple[str, KeyRecord]:
    """Create a key, append its hash to ``path`` (created 0600) and return (the key, its record).

    The key itself is never written anywhere: the caller prints it once.
    """
    if not name or len(name) > 128 or any(c in name for c in "\n\r"):
        raise ValueError("key name must be 1-128 characters on one line")
    key = generate_key()
    digest = hash_key(key)
    record = KeyRecord(key_id=key_id_of(digest), name=name, role=role, sha256=digest, created_at=time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
        line = json.dumps(
            {
                "key_id": record.key_id,
                "name": name,
                "role": role.value,
                "sha256": digest,
                "created_at": round(record.created_at, 3),
            }
        )
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return key, record


def read_keys(path: Path) -> list[KeyRecord]:
    """Parse a keys file; a malformed line raises ``ValueError`` naming the line."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            raw = json.loads(line)
            digest = str(raw["sha256"]).lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("sha256 must be 64 hex digits")
            records.append(
                KeyRecord(
                    key_id=key_id_of(digest),
                    name=str(raw.get("name", "")),
                    role=Role(raw["role"]),
                    sha256=digest,
                    created_at=float(raw.get("created_at", 0.0)),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{number}: malformed key entry ({exc}); fix or remove the line") from exc
    return records


class KeyStore:
    """Authenticates bearer keys against the keys file (plus the dev key in dev mode)."""

    def __init__(self, keys_file: Path | None, dev_key: str | None = None, reload_interval_s: float = 1.0):
        self.keys_file = keys_file
        self.reload_interval_s = reload_interval_s
        self._by_id: dict[str, KeyRecord] = {}
        self._dev: dict[str, KeyRecord] = {}
        if dev_key:
            digest = hash_key(dev_key)
            self._dev[key_id_of(digest)] = KeyRecord(key_id_of(digest), "dev-admin", Role.admin, digest, 0.0)
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.reload_interval_s:
            return
        with self._lock:
            self._checked = now
            if self.keys_file is None:
                return
            try:
                mtime = self.keys_file.stat().st_mtime_ns
            except FileNotFoundError:
                if self._by_id:
                    log.warning(
                        "keys file disappeared; no key accepted", extra={"keys_file": str(self.keys_file)}
                    )
                self._by_id, self._mtime = {}, None
                return
            if mtime == self._mtime:
                return
            try:
                records = read_keys(self.keys_file)
            except ValueError as exc:
                log.error("keys file unreadable; keeping the previous keys", extra={"error": str(exc)})
                return
            self._by_id = {r.key_id: r for r in records}
            self._mtime = mtime
            log.info("keys loaded", extra={"keys": len(records), "keys_file": str(self.keys_file)})

    def __len__(self) -> int:
        return len(self._by_id) + len(self._dev)

    def authenticate(self, key: str) -> Principal | None:
        self._reload()
        digest = hash_key(key)
        record = self._by_id.get(key_id_of(digest)) or self._dev.get(key_id_of(digest))
        # Always compare the full hash in constant time, also when no record matched.
        expected = record.sha256 if record is not None else "0" * 64
        if hmac.compare_digest(digest, expected) and record is not None:
            return Principal(key_id=record.key_id, name=record.name, role=record.role)
        return None
