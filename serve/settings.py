"""serve's one Settings object (env prefix ``INSTRUCTLOOP_SERVE_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings

from instructloop.settings import DEFAULT_MODEL, settings_config
from instructloop.streams import DEFAULT_PREFIX


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = settings_config("INSTRUCTLOOP_SERVE_")

    model: str = Field(
        DEFAULT_MODEL, description="`default` (embedded SmolLM2-135M-Instruct), an HF folder or hub id"
    )
    device: str = Field("auto", description="`auto` (cuda if present, else cpu), `cpu`, `cuda`, `cuda:1`…")
    dtype: str = Field(
        "auto", description="`auto` (bfloat16 on cuda, float32 on cpu), float32, bfloat16, float16"
    )
    host: str = Field(
        "127.0.0.1",
        description="Bind address. Anything but loopback needs auth_token (the "
        "container images and k8s set 0.0.0.0 and the token)",
    )
    port: int = 8080
    auth_token: SecretStr | None = Field(
        None,
        description="Shared bearer token the gateway sends "
        "(INSTRUCTLOOP_GATEWAY_BACKEND_TOKEN); all routes but /health and "
        "/metrics need it",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve /metrics (only) on this port, "
        "so monitoring can be let in there and nowhere else (None/0 = off)",
    )
    max_batch_size: int = Field(16, description="Sequences decoded together (all versions)")
    max_queue: int = Field(64, description="Requests waiting to join the batch; more are refused with 429")
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    default_max_new_tokens: int = Field(100, description="Used when a request sets no max_new_tokens")
    max_stop_sequences: int = 4
    max_top_n_tokens: int = Field(5, description="Most `top_n_tokens` a request may ask for (TGI's default)")
    registry_dir: Path | None = Field(
        None, description="Policy registry root; unset = serve the base model only"
    )
    redis_url: str | None = Field(None, description="Redis holding the current-policy key and channel")
    stream_prefix: str = DEFAULT_PREFIX
    poll_interval_s: float = Field(1.0, description="How often the current pointer is read (also with Redis)")
    swap_retry_s: float = Field(
        60.0, description="A version that failed to load is retried after this (doubling)"
    )
    prefetch_candidates: bool = Field(
        True,
        description="Load + validate the newest candidate version before it "
        "is promoted, so promotion is a switch (one more model in memory)",
    )
    max_loaded_versions: int = Field(
        4,
        description="Policy versions kept loaded for requests naming one "
        "(`parameters.adapter_id`), least recently used evicted; an adapter version "
        "costs its LoRA tensors, a full-weight version a whole model",
    )
    torch_threads: int | None = Field(
        None, description="torch.set_num_threads on CPU (None = torch's default)"
    )
    log_level: str = "INFO"
    json_logs: bool = True

    @field_validator("auth_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.auth_token is None and not is_loopback(self.host):
            raise ValueError(
                f"serve would listen on {self.host} with no auth: set INSTRUCTLOOP_SERVE_AUTH_TOKEN "
                "(and the same value as the gateway's INSTRUCTLOOP_GATEWAY_BACKEND_TOKEN), or bind "
                "INSTRUCTLOOP_SERVE_HOST=127.0.0.1"
            )
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1 (INSTRUCTLOOP_SERVE_MAX_BATCH_SIZE)")
        if self.max_loaded_versions < 0:
            raise ValueError("max_loaded_versions must be >= 0 (INSTRUCTLOOP_SERVE_MAX_LOADED_VERSIONS)")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0 (INSTRUCTLOOP_SERVE_MAX_QUEUE)")
        if not 0 < self.max_input_tokens < self.max_total_tokens:
            raise ValueError(
                "need 0 < max_input_tokens < max_total_tokens "
                "(INSTRUCTLOOP_SERVE_MAX_INPUT_TOKENS / _MAX_TOTAL_TOKENS)"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.redis_url and self.registry_dir is None:
            raise ValueError(
                "redis_url is set but registry_dir is not: set INSTRUCTLOOP_SERVE_REGISTRY_DIR to "
                "the registry the current-policy pointer refers to"
            )
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        return self
