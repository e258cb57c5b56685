"""Wire constants: every string or number that crosses a process boundary and two rooms must agree on.

Spelled here once and imported everywhere else (serve, gateway, learner, launcher, labeler).
"""

from __future__ import annotations

POLICY_VERSION_HEADER = "X-Policy-Version"
"""Response header naming the policy version that produced an answer (serve sets it, the gateway forwards it)."""

BASE_VERSION = "base"
"""The version name of the base model, served while no registry version is current."""

UNKNOWN_VERSION = "unknown"
"""What the gateway (and its clients) report when a backend did not say which version answered."""

SERVED_MODEL_NAME = "instructloop"
"""The gateway's default OpenAI ``model`` name (its ``served_model_name`` setting) and ``owned_by``."""

GREEDY_TEMPERATURE = 1e-4
"""Temperatures below this decode greedily: the distribution is numerically greedy there, and dividing
logits by a tiny positive temperature overflows to inf (and softmax to NaN). The gateway maps such a
temperature to greedy decoding; serve clamps any temperature it is given to at least this."""
