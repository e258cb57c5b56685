"""Wire constants: every string or number that crosses a process boundary and two rooms must agree on.

Spelled here once and imported everywhere else (serve, gateway, learner, launcher, labeler).
"""

from __future__ import annotations

POLICY_VERSION_HEADER = "X-Policy-Version"
"""Response header naming the policy version that produced an answer (serve sets it, the gateway forwards
it)."""

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

LEARNING_TEMPERATURE = 0.7
"""Sampling temperature of the loop's own generations: PPO rollouts, the gate's samples and the labeling
page's completions, so the reward model is trained on, optimised against and judged on answers drawn the same
way; a little under 1 keeps a small model's samples on topic."""

LEARNING_MAX_TOKENS = 64
"""``max_tokens`` of those generations (rollouts and the gate cut a prompt's answers at its traffic's
``max_tokens`` where that is smaller): long enough for a short answer, short enough for a CPU round."""

REQUEST_ID_HEADER = "X-Request-Id"
"""The gateway's per-request id: taken from the client when sane, else made up; echoed on every answer and
written into every log line about the request (every 5xx is logged with it)."""

SERVE_KEEP_ALIVE_S = 75
"""How long serve keeps an idle HTTP connection open. It must exceed ``BACKEND_KEEP_ALIVE_S``: a client that
keeps idle connections longer than the server reuses one the server is closing at that moment and gets
"Server disconnected" (a 502 at the gateway)."""

BACKEND_KEEP_ALIVE_S = 30
"""How long the gateway keeps an idle connection to a serve replica for reuse (below
``SERVE_KEEP_ALIVE_S``)."""
