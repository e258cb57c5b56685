"""Helpers shared by the per-deployable ``Settings`` objects (one per deployable, one env prefix each)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic_settings import SettingsConfigDict

DEFAULT_MODEL = "default"
"""Setting value that means: the embedded SmolLM2-135M-Instruct, prepared offline on first use."""


def home_dir() -> Path:
    """Where instructloop keeps its caches (prepared models) unless told otherwise.

    ``INSTRUCTLOOP_HOME`` overrides; the default is ``~/.cache/instructloop``.
    """
    root = os.environ.get("INSTRUCTLOOP_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "instructloop"
    )
    return Path(root)


def settings_config(prefix: str) -> SettingsConfigDict:
    """The settings config every deployable uses: its own env prefix, an optional .env, no surprises."""
    return SettingsConfigDict(
        env_prefix=prefix,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )
