"""Stream names and the wire form of a stream entry.

Each entry has one field, ``event``, holding the event's JSON, so every entry is self-contained and
versioned by its schema. Stream keys share a configurable prefix so several deployments can share a Redis.
"""

from __future__ import annotations

from enum import Enum

EVENT_FIELD = "event"
DEFAULT_PREFIX = "instructloop"


class Stream(str, Enum):
    completions = "completions"
    comparisons = "comparisons"
    demonstrations = "demonstrations"
    policies = "policies"
    dead_letter = "dead-letter"


def stream_key(stream: Stream | str, prefix: str = DEFAULT_PREFIX) -> str:
    name = stream.value if isinstance(stream, Stream) else stream
    return f"{prefix}:stream:{name}"


def policy_channel(prefix: str = DEFAULT_PREFIX) -> str:
    """Pub/sub channel announcing a change of the current policy (message = the version). A notification
    only: the registry's ``CURRENT`` file is the pointer itself."""
    return f"{prefix}:policy:changed"
