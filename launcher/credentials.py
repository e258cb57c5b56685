"""The local stack's credentials: Redis users with least-privilege ACLs (one per component, each with its
own password) and the bearer token serve requires from the gateway.

``instructloop up`` writes the ACL file (``<run-dir>/redis/users.acl``, mode 0600, passwords stored as
sha256 hashes) and hands each component a ``redis://<user>:<password>@…`` URL; the passwords themselves
live in ``<run-dir>/redis/passwords.json`` (0600) so a restart reuses them. Kubernetes renders the same
rules (``k8s/base/config/users.acl.template``; a test keeps the two equal) from the Secret
``instructloop-redis-users``.

What each user may do (nobody may FLUSHALL, FLUSHDB, CONFIG, DEBUG or touch ACLs except ``admin``):

- ``gateway``: exactly the commands ``gateway/`` issues (``GATEWAY_COMMANDS``, each with where it comes
  from). Keys: its own (``<prefix>:gateway:*``: served completions, idempotency keys, rate limits, the
  labeling page's queue and counters), the two shared labeling keys (guidelines, excluded labelers), the
  completions / comparisons / demonstrations / policies streams: XADD, and XREVRANGE only (the labeling
  page's live prompts and the admin dashboard read the newest entries back; no XRANGE / XREAD, no consumer
  groups, so it can never take or acknowledge the learner's entries); publish on the policy channel. Also
  the empty key (a lone ``~``): the feedback script is passed ``""`` as its idempotency key when there is
  none, and Redis checks every key a script declares.
- ``learner``: consumer groups on every stream (create, read, claim, acknowledge, inspect), the
  dead-letter and policies streams, the policy pointer, publish on the policy channel, and read the
  excluded-labelers hash (HKEYS; ``instructloop/labeling.py``) before each reward-model update.
- ``serve``: read the policy pointer, subscribe to the policy channel. Nothing else.
- ``exporter`` (redis_exporter in k8s): INFO, CONFIG GET, SCAN and read-only stream inspection.
- ``probe``: PING (the kubelet's exec probes, ``up``'s health check).
- ``admin``: an operator's user (backups: BGSAVE, CONFIG SET of AOF rewrites; inspection), everything
  but FLUSHALL / FLUSHDB / DEBUG / SWAPDB.
- ``default``: off: an unauthenticated connection can do nothing (every command answers NOAUTH), and
  nobody can sign in as it. Its rules are nonetheless ``+@all ~* &*``: Redis (7.0.15 here; redis#14541)
  replays the AOF at start as ``default`` and re-checks each MULTI/EXEC against that user's rules, so with
  ``-@all`` every transaction in the AOF (a served completion and its event; every feedback event, which
  the Lua script's effects replicate as MULTI/EXEC) was silently dropped at a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from urllib.parse import quote

from instructloop.labeling import excluded_labelers_key, guidelines_key
from instructloop.streams import DEFAULT_PREFIX, Stream, policy_channel, stream_key

USERS = ("gateway", "learner", "serve", "exporter", "probe", "admin")
DEFAULT_USER_RULES = "+@all ~* &*"
"""Rules of the disabled ``default`` user: only Redis's AOF-loading client runs as it (module docstring)."""
_CONNECT = "-@all +@connection -@admin -@dangerous"

GATEWAY_COMMANDS = {
    # gateway/store.py: MULTI/EXEC pipelines (completion + its event; labeling counters); the two Lua
    # scripts run by EVALSHA, loaded with SCRIPT LOAD when Redis does not know them. The scripts' own calls
    # are checked against the same rules: GET, SET, XADD (feedback), GET, INCRBY, EXPIRE (rate limits).
    "transactions": "+multi +exec +discard",
    "scripts": "+evalsha +script|load",
    "strings": "+get +set +incrby +del +expire",
    "streams": "+xadd +xrevrange",
    # gateway/labeling/store.py: the prompt set, seen prompts, overlap queue, answers, per-labeler counters;
    # the excluded-labelers hash (gateway/labeling/serving.py)
    "sets": "+sadd +smismember +smembers",
    "lists": "+rpush +llen +lrange +lrem",
    "hashes": "+hset +hdel +hexists +hgetall +hincrby",
    # instructloop/registry.py through the admin routes: the policy-changed notification
    "pubsub": "+publish",
}
"""Every Redis command the gateway issues, by kind. The tests run every code path as the ``gateway``
user against this ACL file (``tests/conftest.py`` ``RedisServer``; ``tests/gateway/labeling/test_acl.py``
calls each labeling store method), so a missing one fails a test."""


def acl_rules(prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
    """Each user's ACL rules (everything after ``user NAME on <password>``)."""
    streams = " ".join(
        f"~{stream_key(s, prefix)}"
        for s in (Stream.completions, Stream.comparisons, Stream.demonstrations, Stream.policies)
    )
    channel = f"&{policy_channel(prefix)}"
    pointer = f"~{prefix}:policy:*"
    labeling = f"~{guidelines_key(prefix)} ~{excluded_labelers_key(prefix)}"
    return {
        "gateway": f"{_CONNECT} {' '.join(GATEWAY_COMMANDS.values())} "
        f"~{prefix}:gateway:* {labeling} {streams} ~ {channel}",
        "learner": f"{_CONNECT} +multi +exec +discard +get +set +publish +xadd +xtrim +xlen +xinfo +xgroup "
        f"+xreadgroup +xautoclaim +xclaim +xack +xpending +xrange +hkeys ~{prefix}:stream:* {pointer} "
        f"%R~{excluded_labelers_key(prefix)} {channel}",
        "serve": f"{_CONNECT} +get +subscribe +unsubscribe %R~{prefix}:policy:* {channel}",
        "exporter": f"{_CONNECT} +info +config|get +client|list +slowlog|get +slowlog|len +latency|latest "
        "+dbsize +scan +type +xinfo +xlen +memory|usage %R~* &*",
        "probe": "-@all +ping",
        "admin": "+@all -flushall -flushdb -debug -swapdb ~* &*",
    }


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def _acl_text(hashes: dict[str, str], prefix: str) -> str:
    lines = [f"user default off resetkeys resetchannels {DEFAULT_USER_RULES}"]
    for user, rules in acl_rules(prefix).items():
        lines.append(f"user {user} on #{hashes[user]} resetkeys resetchannels {rules}")
    return "\n".join(lines) + "\n"


def acl_file_text(passwords: dict[str, str], prefix: str = DEFAULT_PREFIX) -> str:
    """The ACL file (``aclfile``): ``default`` off, every user with the sha256 of its password."""
    return _acl_text({user: password_hash(passwords[user]) for user in USERS}, prefix)


def acl_template_text(prefix: str = DEFAULT_PREFIX) -> str:
    """The same file with ``@<USER>_SHA256@`` placeholders: ``k8s/base/config/users.acl.template``, which
    the Redis pod's init container fills from the Secret (``k8s/base/config/render-acl.sh``)."""
    header = (
        "# Generated by `python -m launcher.credentials` from launcher/credentials.py "
        "(a test keeps them equal).\n"
        "# k8s/base/config/render-acl.sh replaces each @<USER>_SHA256@ with the sha256 of that user's\n"
        "# password from the Secret instructloop-redis-users; Redis then loads the result (aclfile).\n"
    )
    return header + _acl_text({user: f"@{user.upper()}_SHA256@" for user in USERS}, prefix)


def ensure_passwords(path: Path) -> dict[str, str]:
    """One random password per user, kept in ``path`` (0600) across restarts."""
    if path.exists():
        stored = json.loads(path.read_text())
        if all(stored.get(user) for user in USERS):
            return stored
    passwords = {user: secrets.token_hex(24) for user in USERS}
    write_private(path, json.dumps(passwords, indent=2) + "\n")
    return passwords


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600), never briefly wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        os.fchmod(handle.fileno(), 0o600)
        handle.write(text)


def user_url(host: str, port: int, user: str, password: str, db: int = 0) -> str:
    return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{db}"


def secure_redis(redis_dir: Path, port: int, maxmemory: str) -> tuple[list[str], dict[str, str]]:
    """For the redis-server ``up`` starts: extra arguments (ACL file, maxmemory, noeviction) and each
    component's URL (gateway, learner, serve, probe) with its own user and password."""
    passwords = ensure_passwords(redis_dir / "passwords.json")
    acl_file = redis_dir / "users.acl"
    write_private(acl_file, acl_file_text(passwords))
    args = [
        "--protected-mode",
        "yes",
        "--aclfile",
        str(acl_file),
        "--maxmemory",
        maxmemory,
        "--maxmemory-policy",
        "noeviction",
    ]
    return args, {
        user: user_url("127.0.0.1", port, user, passwords[user])
        for user in ("gateway", "learner", "serve", "probe")
    }


def ensure_serve_token(path: Path) -> str:
    """The bearer token serve requires and the gateway sends (``path``, 0600, kept across restarts)."""
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    token = secrets.token_hex(32)
    write_private(path, token + "\n")
    return token


if __name__ == "__main__":
    print(acl_template_text(), end="")
