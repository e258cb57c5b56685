"""The gateway's one ``Settings`` (env prefix ``INSTRUCTLOOP_GATEWAY_``).

Validators refuse unsafe combinations with a message that names the fix: outside dev mode the gateway
needs a keys file (``instructloop gateway keys create``), and a plain-text dev key is only allowed in dev
mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode

from instructloop.settings import DEFAULT_MODEL, home_dir, settings_config
from instructloop.streams import DEFAULT_PREFIX
from instructloop.wire import LEARNING_MAX_TOKENS, LEARNING_TEMPERATURE, SERVED_MODEL_NAME

ENV_PREFIX = "INSTRUCTLOOP_GATEWAY_"
DEV_API_KEY = "instructloop-dev-admin-key"
"""The admin key dev mode accepts when no other dev key is set. Never accepted outside dev mode."""


def default_keys_file() -> Path:
    return home_dir() / "gateway" / "keys.jsonl"


class Settings(BaseSettings):
    model_config = settings_config(ENV_PREFIX)

    # ---- network ----------------------------------------------------------------------------------
    host: str = Field(
        default="127.0.0.1",
        description="Interface to listen on. Loopback by default (a laptop); "
        "in a container it must be 0.0.0.0 (the images and the k8s ConfigMap set it), or the "
        "kubelet's probes and the Service are refused.",
    )
    port: int = Field(default=8000, ge=1, le=65535)
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Serve /metrics on this port (same host) and not on `port`, so a NetworkPolicy can "
        "let monitoring in there and nowhere else (k8s sets 9091). Unset: /metrics is on `port`.",
    )
    workers: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes (`gateway run`).")

    # ---- backends (serve replicas or real TGI) ----------------------------------------------------
    backends: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["http://127.0.0.1:8080"],
        description="Base URLs of the TGI-protocol servers, comma-separated or a JSON list.",
    )
    backends_dns: str | None = Field(
        default=None,
        description="Instead of `backends`: a URL whose host name is resolved to every address it has "
        "(A/AAAA records; Kubernetes: a headless Service, one record per ready pod), each address one "
        "replica with the URL's scheme and port, e.g. http://instructloop-serve-pods:8080.",
    )
    backends_dns_refresh_s: float = Field(
        default=5.0, gt=0, description="Seconds between lookups of `backends_dns`."
    )
    backend_token: SecretStr | None = Field(
        default=None,
        description="Bearer token sent to every backend (serve's INSTRUCTLOOP_SERVE_AUTH_TOKEN).",
    )
    backend_timeout_s: float = Field(
        default=120.0, gt=0, description="Total time allowed for one backend call."
    )
    backend_connect_timeout_s: float = Field(default=2.0, gt=0)
    health_interval_s: float = Field(default=2.0, gt=0, description="Seconds between backend health checks.")
    version_retry_rounds: int = Field(
        default=2,
        ge=0,
        le=10,
        description="How many times the choices of one completion are regenerated when they came from "
        "different policy versions (serve swapped between the n requests).",
    )

    # ---- model ------------------------------------------------------------------------------------
    model: str = Field(
        default=DEFAULT_MODEL, description="Tokenizer source: 'default' or an HF folder / hub id."
    )
    served_model_name: str = Field(
        default=SERVED_MODEL_NAME, min_length=1, description="The `model` clients name."
    )

    store_default: bool = Field(
        default=True,
        description="Data governance: whether a completion that does not set OpenAI's `store` is kept "
        "(feedback can refer to it) and logged for the learner. True: instructloop learns from the "
        "traffic it serves unless a caller sends store=false. False (OpenAI's default): only calls that "
        "send store=true, and the labeling page's own completions, become training data "
        "(README: Data governance).",
    )

    # ---- redis, registry --------------------------------------------------------------------------
    redis_url: str | None = Field(default=None, description="Unset = no Redis: feedback answers 503.")
    stream_prefix: str = DEFAULT_PREFIX
    registry_dir: Path = Field(default_factory=lambda: home_dir() / "registry")
    completion_ttl_s: int = Field(
        default=7 * 24 * 3600, gt=0, description="How long feedback can refer to a completion."
    )
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    redis_timeout_s: float = Field(default=1.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with 503s.")

    # ---- security ---------------------------------------------------------------------------------
    dev_mode: bool = Field(default=False, description="Local development only: accepts the dev admin key.")
    dev_api_key: str | None = Field(
        default=None, description="Admin key accepted in dev mode (default: DEV_API_KEY)."
    )
    keys_file: Path | None = Field(default=None, description="JSON-lines file of hashed API keys.")
    rate_limit_per_minute: int = Field(default=600, ge=1, description="Requests per API key per minute.")
    rate_limit_generations_per_minute: int = Field(
        default=2000, ge=1, description="Generations (n × prompts of each completion) per API key per minute."
    )
    rate_limit_tokens_per_minute: int = Field(
        default=1_000_000,
        ge=1,
        description="Tokens per API key per minute, charged at admission: prompt tokens × n "
        "plus max_tokens × generations (the most the request can cost).",
    )
    feedback_rate_limit_per_minute: int = Field(
        default=300, ge=1, description="Feedback calls per API key per minute (besides the request limit)."
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_prompt_chars: int = Field(
        default=32_000, ge=1, description="Characters of one prompt (or rendered chat)."
    )
    max_total_prompt_chars: int = Field(
        default=64_000, ge=1, description="Characters of all prompts of one request together (a list prompt)."
    )
    max_generations: int = Field(
        default=64, ge=1, description="n × prompts of one request: the choices it generates, stores and logs."
    )
    max_prompt_tokens: int = Field(default=4096, ge=1)
    max_tokens_limit: int = Field(default=2048, ge=1, description="Upper bound for `max_tokens`.")
    max_n: int = Field(default=9, ge=1, le=64, description="Upper bound for `n` (K responses to rank).")

    # ---- labeling page (/label, gateway/labeling/) ---------------------------------------------------
    label_k: int = Field(default=4, ge=2, le=9, description="Completions per ranking task (K, 2-9).")
    label_live_prompts: bool = Field(
        default=True,
        description="Labeling tasks may use prompts from live traffic (stored completions); an admin "
        "can turn this off at run time on /label/admin (privacy).",
    )
    label_overlap_rate: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Share of ranking tasks also shown to a second labeler (agreement).",
    )
    label_max_tokens: int = Field(
        default=LEARNING_MAX_TOKENS,
        ge=1,
        description="max_tokens of each labeling completion (default: the learner's rollouts' and gate's).",
    )
    label_temperature: float = Field(
        default=LEARNING_TEMPERATURE,
        ge=0,
        le=2,
        description=(
            "Sampling temperature of labeling completions (default: the learner's rollouts' and gate's)."
        ),
    )

    # ---- logs -------------------------------------------------------------------------------------
    log_level: str = "INFO"
    json_logs: bool = True

    @field_validator("keys_file", "redis_url", "dev_api_key", "backend_token", "backends_dns", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("backends", mode="before")
    @classmethod
    def _split_backends(cls, value):
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                import json

                value = json.loads(value)
            else:
                value = [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("backends")
    @classmethod
    def _check_backends(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(
                f"no backend: set {ENV_PREFIX}BACKENDS to one or more serve URLs, e.g. http://127.0.0.1:8080"
            )
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(
                    f"backend {url!r} is not an http(s) URL: set {ENV_PREFIX}BACKENDS=http://host:port"
                )
        return [url.rstrip("/") for url in value]

    @field_validator("backends_dns")
    @classmethod
    def _check_backends_dns(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"backends_dns {value!r} is not an http(s) URL with a host name: set "
                f"{ENV_PREFIX}BACKENDS_DNS=http://instructloop-serve-pods:8080"
            )
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_backend_source(self) -> Settings:
        if self.backends_dns is not None and "backends" in self.model_fields_set:
            raise ValueError(
                f"both {ENV_PREFIX}BACKENDS and {ENV_PREFIX}BACKENDS_DNS are set: unset one (BACKENDS_DNS "
                "finds the replicas by resolving a name; BACKENDS lists them)"
            )
        if self.metrics_port is not None:
            if self.metrics_port == self.port:
                raise ValueError(
                    f"{ENV_PREFIX}METRICS_PORT equals {ENV_PREFIX}PORT ({self.port}): pick another port, "
                    "or unset METRICS_PORT to serve /metrics on the API port"
                )
            if self.workers > 1:
                raise ValueError(
                    f"{ENV_PREFIX}METRICS_PORT needs {ENV_PREFIX}WORKERS=1 (each worker process has its "
                    "own metrics and they cannot share one port): scale with more gateway pods instead"
                )
        return self

    @model_validator(mode="after")
    def _check_keys(self) -> Settings:
        if not self.dev_mode:
            if self.dev_api_key is not None:
                raise ValueError(
                    f"{ENV_PREFIX}DEV_API_KEY is only accepted with {ENV_PREFIX}DEV_MODE=true; "
                    "for a real deployment unset it and create keys with "
                    "`instructloop gateway keys create --role admin --name NAME`"
                )
            if self.keys_file is None:
                raise ValueError(
                    f"no API keys configured: set {ENV_PREFIX}KEYS_FILE to a keys file made with "
                    "`instructloop gateway keys create --role user --name alice`, "
                    f"or set {ENV_PREFIX}DEV_MODE=true for local development only"
                )
        return self

    @property
    def effective_dev_key(self) -> str | None:
        if not self.dev_mode:
            return None
        return self.dev_api_key or DEV_API_KEY
