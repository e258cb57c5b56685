"""The TGI wire protocol (pydantic models only): requests, responses, stream events, errors, /info.

Field names, order and meaning follow text-generation-inference's OpenAPI schema (``GenerateRequest``,
``GenerateParameters``, ``GenerateResponse``, ``StreamResponse``, ``Info``, ``ErrorResponse``) so the
``text-generation`` client parses our answers. Additions: ``policy_version`` on every response and event.

Validators raise ``ValueError`` with a message *without* the field name; the app's error handler prefixes
the field (``Input validation error: `temperature`: must be strictly positive``) and answers 422.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, Field, field_validator

from serve.sampling import SamplingParams


class GenerateParameters(BaseModel):
    adapter_id: str | None = None
    """The policy version that must answer (a registry version name or ``base``); unset = the current one."""
    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any | None = None
    max_new_tokens: int | None = Field(default=None, description="None = min(server default, what fits)")
    repetition_penalty: float | None = None
    return_full_text: bool | None = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False

    @field_validator("max_new_tokens", "top_k", "truncate")
    @classmethod
    def _strictly_positive_int(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError("must be strictly positive")
        return value

    @field_validator("temperature", "repetition_penalty")
    @classmethod
    def _strictly_positive_float(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("must be strictly positive")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value < 1.0:
            raise ValueError("must be > 0.0 and < 1.0")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        if value is not None and not 0 <= value < 2**64:
            raise ValueError("must be between 0 and 2^64 - 1")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop sequences must not be empty strings")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only best_of = 1 is supported by this server")
        return value

    @field_validator("typical_p")
    @classmethod
    def _typical_p(cls, value: float | None) -> float | None:
        if value is not None and value != 1.0:
            raise ValueError("typical sampling is not supported by this server")
        return value

    @field_validator("frequency_penalty")
    @classmethod
    def _frequency_penalty(cls, value: float | None) -> float | None:
        if value is not None and value != 0.0:
            raise ValueError("frequency_penalty is not supported by this server (use repetition_penalty)")
        return value

    @field_validator("top_n_tokens")
    @classmethod
    def _top_n_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError("must be >= 0")
        return value

    @field_validator("watermark")
    @classmethod
    def _unsupported_flag(cls, value: bool) -> bool:
        if value:
            raise ValueError("is not supported by this server (must be false)")
        return value

    @field_validator("grammar")
    @classmethod
    def _unsupported_value(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("is not supported by this server (must be null)")
        return value

    def to_sampling_params(self) -> SamplingParams:
        return SamplingParams(
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )


class GenerateRequest(BaseModel):
    inputs: str | list[int] = Field(
        description="The prompt text, or (our extension) its token ids, generated from exactly as given"
    )
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False

    @field_validator("inputs", mode="before")
    @classmethod
    def _text_or_ids(cls, value: Any) -> Any:
        if not isinstance(value, (str, list)):
            raise ValueError("must be a string or a list of token ids")
        return value

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, value: str | list[int]) -> str | list[int]:
        if not value:
            raise ValueError("cannot be empty")
        if isinstance(value, list) and min(value) < 0:
            raise ValueError("token ids must be >= 0")
        return value


class FinishReason(str, Enum):
    length = "length"
    eos_token = "eos_token"
    stop_sequence = "stop_sequence"


class PrefillToken(BaseModel):
    """One input token serve generated from (``decoder_input_details``), with its logprob given the tokens
    before it under the version that answered (null for the first token, as TGI)."""

    id: int
    text: str
    logprob: float | None = None


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = None
    special: bool


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    prefill: list[PrefillToken] = Field(default_factory=list)
    tokens: list[Token] = Field(default_factory=list)
    top_tokens: list[list[Token]] = Field(default_factory=list)
    """Per generated token, the request's ``top_n_tokens`` most likely tokens (empty when it asked none)."""
    prefill_top_tokens: list[list[Token]] = Field(default_factory=list, exclude_if=lambda value: not value)
    """Our extension: with ``decoder_input_details`` and ``top_n_tokens``, per prompt token the most likely
    tokens at its position (empty for the first); left out otherwise."""


class GenerateResponse(BaseModel):
    generated_text: str
    details: Details | None = None
    policy_version: str


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None = None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] = Field(default_factory=list)
    generated_text: str | None = None
    details: StreamDetails | None = None
    policy_version: str


class ErrorType(str, Enum):
    validation = "validation"
    generation = "generation"
    overloaded = "overloaded"
    incomplete_generation = "incomplete_generation"


class ErrorResponse(BaseModel):
    error: str
    error_type: ErrorType


class Info(BaseModel):
    model_id: str
    model_sha: str | None = None
    model_dtype: str
    model_device_type: str
    model_pipeline_tag: str | None = "text-generation"
    max_concurrent_requests: int
    max_best_of: int = 1
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_size: int
    max_client_batch_size: int = 1
    router: str = "instructloop-serve"
    version: str
    sha: str | None = None
    docker_label: str | None = None
    policy_version: str
    policy_versions_in_flight: list[str] = Field(default_factory=list)
    policy_versions_loaded: list[str] = Field(
        default_factory=list,
        description="versions a request can name "
        "without a load: the LRU and the adapters attached to the base",
    )
