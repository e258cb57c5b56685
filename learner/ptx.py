"""Pretraining batches for the ptx term of PPO-ptx (paper eq. 2: γ·E_{x~D_pretrain}[log π(x)]).

``PtxSource`` turns a text corpus into fixed-length token windows and hands out seeded random batches.
The corpus is, in order of precedence:

- a ``.txt`` (or any text) file: one document, or several separated by blank lines;
- a folder of ``.txt`` files (read recursively, sorted);
- a folder written by ``datasets.Dataset.save_to_disk``, or any path ``datasets.load_dataset`` reads
  offline (a folder of json/csv/parquet files, or a hub dataset already in the local cache), using the
  ``text_field`` column;
- nothing (``None``): the corpus shipped in ``learner/data/`` (see ``learner/data/README.md``), so PPO-ptx
  works offline on a fresh machine.

Documents are tokenized once, joined with EOS, and cut into windows of ``seq_len`` tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).parent / "data" / "ptx_corpus.txt"
"""The shipped default pretraining corpus (self-written English prose; see learner/data/README.md)."""


def _split_documents(text: str) -> list[str]:
    documents = [block.strip() for block in text.split("\n\n")]
    return [doc for doc in documents if doc]


def load_documents(path: str | Path | None = None, text_field: str = "text", max_documents: int | None = None) -> list[str]:
    """The documents of a corpus (see the module docstring for what ``path`` may be)."""
    if path is None:
        path = DEFAULT_CORPUS
    source = Path(path).expanduser()
    documents: list[str]
    if source.is_file():
        documents = _split_documents(source.read_text(encoding="utf-8"))
    elif source.is_dir() and any(source.rglob("*.txt")) and not (source / "dataset_info.json").exists():
        documents = []
        for file in sorted(source.rglob("*.txt")):
            documents.extend(_split_documents(file.read_text(encoding="utf-8")))
    else:
        documents = _load_hf_dataset(str(path), text_field)
    if max_documents is not None:
        documents = documents[:max_documents]
    if not documents:
        raise ValueError(f"the ptx corpus {path} holds no text")
    return documents


def _load_hf_dataset(path: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets comes with trl
        raise ValueError(f"ptx corpus {path!r}: not a file or folder, and `datasets` is not installed") from error
    source = Path(path).expanduser()
    try:
        if (source / "dataset_info.json").exists() or (source / "state.json").exists():
            dataset = datasets.load_from_disk(str(source))
        else:
            dataset = datasets.load_dataset(path, split="train")
    except Exception as error:
        raise ValueError(
            f"cannot load the ptx corpus {path!r}: give a text file, a folder of .txt files, a folder saved "
            f"with Dataset.save_to_disk, or a dataset already in the local HF cache ({error})"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    if text_field not in dataset.column_names:
        raise ValueError(f"ptx dataset {path!r} has no column {text_field!r} (columns: {dataset.column_names})")
    return [text for text in dataset[text_field] if text and text.strip()]


class PtxSource:
    """Seeded random batches of ``batch_size`` windows of ``seq_len`` tokens from a text corpus."""

    def __init__(
        self,
        tokenizer,
        path: str | Path | None = None,
        seq_len: int = 128,
        batch_size: int = 4,
        seed: int = 0,
        text_field: str = "text",
        max_tokens: int = 2_000_000,
    ):
        if seq_len < 2 or batch_size < 1:
            raise ValueError("PtxSource needs seq_len >= 2 and batch_size >= 1")
        self.path = str(path) if path is not None else str(DEFAULT_CORPUS)
        self.seq_len = seq_len
        self.batch_size = batch_size
        documents = load_documents(path, text_field)
        eos = tokenizer.eos_token_id
        stream: list[int] = []
        for doc in documents:
            stream.extend(tokenizer(doc, add_special_tokens=False).input_ids)
            stream.append(eos)
            if len(stream) >= max_tokens:
                break
        n_windows = len(stream) // seq_len
        if n_windows < 1:
            raise ValueError(f"the ptx corpus {self.path} has {len(stream)} tokens, fewer than seq_len={seq_len}")
        self.windows = torch.tensor(stream[: n_windows * seq_len], dtype=torch.long).view(n_windows, seq_len)  # (W, T)
        self.generator = torch.Generator().manual_seed(seed)
        log.info("ptx corpus loaded", extra={"path": self.path, "documents": len(documents),
                                             "tokens": len(stream), "windows": n_windows})

    @property
    def num_tokens(self) -> int:
        return self.windows.numel()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (batch_size, seq_len); windows drawn with replacement."""
        rows = torch.randint(0, self.windows.size(0), (self.batch_size,), generator=self.generator)
        input_ids = self.windows[rows]  # (B, T)
        return input_ids, torch.ones_like(input_ids)

    def fixed_batch(self, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` consecutive windows from ``offset`` (for a stable held-out measure of the ptx NLL)."""
        input_ids = self.windows[offset : offset + n]
        return input_ids, torch.ones_like(input_ids)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
